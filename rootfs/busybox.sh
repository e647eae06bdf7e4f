#!/bin/sh
# Build a tiny root filesystem from Debian's busybox-static: one static binary, a
# symlink per applet at its usual path, and the few files programs expect. No root
# needed.
#
#   rootfs/busybox.sh OUT          a directory (must not exist yet)
#   rootfs/busybox.sh OUT.tar.gz   a tarball (.tar, .tar.gz or .tar.xz)
#
# BUSYBOX names the binary to use (default: the busybox on PATH, which must be
# statically linked: the image has no C library).
set -eu

out=${1:?usage: busybox.sh OUT_DIR | OUT.tar[.gz|.xz]}
busybox=${BUSYBOX:-$(command -v busybox || true)}
if [ -z "$busybox" ]; then
    echo "busybox.sh: busybox not found (apt-get install busybox-static)" >&2
    exit 2
fi
if ! "$busybox" --list-full >/dev/null 2>&1; then
    echo "busybox.sh: $busybox does not list its applets (--list-full)" >&2
    exit 2
fi
case "$(file -L "$busybox" 2>/dev/null || echo static)" in
    *dynamically*)
        echo "busybox.sh: $busybox is dynamically linked; install busybox-static" >&2
        exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/sbx-busybox.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root=$work/root
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" \
    "$root/root" "$root/home" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" \
    "$root/var/tmp" "$root/work"
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"

# One symlink per applet, relative so it also resolves outside the sandbox. Made by
# one python3 process: ~400 `ln` forks take seconds on a loaded machine.
"$busybox" --list-full | python3 -c '
import os, sys
root = sys.argv[1]
for applet in sys.stdin.read().split():
    if applet == "bin/busybox" or "/" not in applet:
        continue
    up = "../" * applet.count("/")
    os.symlink(up + "bin/busybox", os.path.join(root, applet))
' "$root"

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:sandbox user:/home:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
user:x:1000:
nogroup:x:65534:
GROUP
echo "sbx busybox image ($("$busybox" | head -n 1))" >"$root/etc/issue"

case "$out" in
    *.tar.xz) tar --numeric-owner -C "$root" -cf - . | xz -T0 >"$out" ;;
    *.tar.gz) tar --numeric-owner -C "$root" -cf - . | gzip >"$out" ;;
    *.tar) tar --numeric-owner -C "$root" -cf "$out" . ;;
    *)
        [ -e "$out" ] && { echo "busybox.sh: $out exists" >&2; exit 2; }
        mv "$root" "$out" ;;
esac
echo "busybox.sh: wrote $out" >&2
