#!/bin/sh
# Build a Debian minbase root filesystem with debootstrap and export it as a tarball
# that `sbx rootfs import` takes. Needs root (debootstrap creates device nodes and
# chroots); the import afterwards does not.
#
#   rootfs/debian-minbase.sh OUT.tar.xz [SUITE]
#
# SUITE defaults to bookworm. The mirror is the one apt on this machine already uses
# (read from /etc/apt at run time); set SBX_DEBIAN_MIRROR to override it.
set -eu

out=${1:?usage: debian-minbase.sh OUT.tar[.gz|.xz] [SUITE]}
suite=${2:-bookworm}

if [ "$(id -u)" -ne 0 ]; then
    echo "debian-minbase.sh: debootstrap needs root; run it as root or with sudo" >&2
    exit 2
fi
command -v debootstrap >/dev/null || {
    echo "debian-minbase.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
}

# The first main-archive URI apt is configured with: deb822 "URIs:" lines in
# *.sources files, then one-line "deb URI SUITE ..." entries. Security and update
# archives are skipped: debootstrap wants the main archive.
apt_mirror() {
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] && awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] && awk '$1 == "deb" { for (i = 2; i <= NF; i++)
            if ($i !~ /^\[/ && $i !~ /=/ && $i !~ /\]$/) { print $i; break } }' "$f"
    done
}
mirror=${SBX_DEBIAN_MIRROR:-$(apt_mirror | grep -v -e '-security' -e '-updates' \
    | grep '/debian/\?$' | head -n 1)}
if [ -z "$mirror" ]; then
    echo "debian-minbase.sh: no Debian mirror found in /etc/apt; set SBX_DEBIAN_MIRROR" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/sbx-debootstrap.XXXXXX")
trap 'rm -rf "$work" "$out.part"' EXIT INT TERM

echo "debian-minbase.sh: debootstrap --variant=minbase $suite from $mirror" >&2
debootstrap --variant=minbase "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || {
    tail -n 20 "$work/log" >&2
    echo "debian-minbase.sh: debootstrap failed (full log above, last 20 lines)" >&2
    exit 1
}
# Package caches are not part of an image.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*

case "$out" in
    *.tar.xz) compress="xz -T0 -6" ;;
    *.tar.gz) compress="gzip -6" ;;
    *.tar) compress="cat" ;;
    *) echo "debian-minbase.sh: OUT must end in .tar, .tar.gz or .tar.xz" >&2; exit 2 ;;
esac
tar --numeric-owner -C "$work/root" -cf - . | $compress >"$out.part"
mv "$out.part" "$out"
echo "debian-minbase.sh: wrote $out ($(du -h "$out" | cut -f1))" >&2
