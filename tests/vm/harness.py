"""A small qemu VM with a pure cgroup v2 kernel, to test sbx's delegated cgroup path.

Why: this host's cgroup2 tree has no memory, pids or cpu controller (they are bound to
cgroup v1), so the delegated cgroup v2 limit path cannot be exercised here directly.
See DESIGN.md, "Testing cgroup v2 on a machine without it".

What it boots:
- Debian's stock kernel, the `linux-image-6.1.0-*-amd64` package that
  `linux-image-amd64` depends on, fetched once with `apt-get download` and unpacked
  with `dpkg -x`. The uncompressed vmlinux is cut out of vmlinuz (its xz payload) and
  booted directly through qemu's PVH entry, which skips the in-guest decompression.
- An uncompressed initramfs written here in Python: the host's static busybox, the
  virtio-pci, 9p and overlay modules with their dependencies, and a small /init.
- qemu `q35`, software emulation (TCG; `microvm` hangs on some boots under TCG), two
  vCPUs, 1 GiB of RAM, no network device, no display, the serial console in a file.
- The host's `/` shared read-only over virtio-9p and made writable inside the VM with
  an overlay whose upper layer is a tmpfs: /usr/bin/python3, /opt/sbx/venv, the
  checkout and files the host wrote under /tmp before the boot are the host's, and
  writes (HOME, /tmp, /var/tmp, anywhere) stay in the VM's RAM. The host side is
  cached without revalidation: what the host changes during a run may not show.
- A second 9p share, a fresh host temporary directory per run, carries the script in
  and the command's stdout, stderr and exit status out.

Inside the VM, as root: proc, sysfs, devtmpfs, devpts, a tmpfs /run, cgroup2
at /sys/fs/cgroup with `nsdelegate` (v1 disabled with `cgroup_no_v1=all`), the memory,
pids and cpu controllers enabled down to a systemd-like delegated subtree
`user.slice/user-UID.slice/user@UID.service/app.slice/sbx-vm.scope`, which is handed
to the test uid as systemd's `Delegate=yes` does (the directory and the files listed in
/sys/kernel/cgroup/delegate are chowned). The script then starts as that uid (host's
`setpriv`), *alone* in the delegated scope, with a clean environment: PATH, HOME, USER,
LOGNAME, LANG, XDG_RUNTIME_DIR (/run/user/UID, mode 0700), SBX_VM_CGROUP (the scope's
absolute path) and whatever the caller passes. Controllers are available in the
scope but not enabled in its subtree_control: to enable them the scope must first be
emptied (the no-internal-processes rule), e.g. `mkdir $SBX_VM_CGROUP/sh && echo $$ >
$SBX_VM_CGROUP/sh/cgroup.procs`. To start a supervisor such as `sbx exec` the way
`systemd-run --user --scope -p Delegate=yes` would, alone in a fresh delegated scope,
prefix it with `sbx-vm-scope` (on PATH):

    r = run_in_vm("cd / && sbx-vm-scope /opt/sbx/venv/bin/python -m sandbox exec "
                  "--memory 64M -- /bin/true", env={"PYTHONPATH": checkout})

How long: the first call downloads about 70 MB and prepares the images (about 10 s,
cached under /var/tmp/sbx-vm for root, else $XDG_CACHE_HOME/sbx-vm or ~/.cache/sbx-vm;
$SBX_VM_CACHE overrides). Each run then boots in about 6 s on this two-CPU host at a
load average near 1 (3.8 s of kernel, 0.6 s of modules and mounts, the rest qemu and
stage 2), and in 10 to 15 s at load averages of 7 to 20; see VMResult.boot_s.
Commands run slowly under TCG: a dynamically linked program takes about 0.15 s to
start, Python 0.5 to 1 s, one `sbx exec` 7 to 15 s, the OOM smoke script 13 to 20 s.

What it needs: qemu-system-x86_64 (Debian's qemu-system-x86), /bin/busybox from
busybox-static, apt-get and dpkg with the Debian archive reachable the first time, and
host files readable by qemu (run the suite as root to share everything).

Public API: `run_in_vm()` returns a `VMResult`; `unavailable_reason()` says why qemu
cannot run here (or None); `prepare_image()` builds or finds the cached kernel and
initramfs. Harness failures raise `VMError` (`VMTimeout` when the deadline passed);
the command's own failure is just a non-zero `VMResult.returncode`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import lzma
import os
import pwd
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"
# Top-level modules; their dependencies are added from each module's .modinfo.
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DEFAULT_TEST_USER = "sbxtest"
JOB_DIR_IN_VM = "/run/sbx-vm"
VM_MEMORY_MIB = 1024
VM_CPUS = 2
# cgroup_no_v1=all: a pure cgroup v2 kernel. panic=-1 with qemu's -no-reboot: if init
# dies, qemu exits at once. cryptomgr.notests: the crypto self-tests cost about 0.6 s
# of emulated CPU and test nothing sbx depends on.
KERNEL_ARGS = (
    "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init cgroup_no_v1=all "
    "nokaslr mitigations=off no_timer_check tsc=reliable random.trust_cpu=on "
    "cryptomgr.notests"
)
CONSOLE_TAIL_CHARS = 3000
POLL_INTERVAL_S = 0.02


class VMError(RuntimeError):
    """The VM could not be prepared, booted or run (not the command's fault)."""


class VMTimeout(VMError):
    """The whole VM (boot, command, power-off) outlived its deadline and was killed."""


@dataclass(frozen=True)
class VMImage:
    kernel_version: str
    vmlinux: Path
    initramfs: Path


@dataclass(frozen=True)
class VMResult:
    returncode: int
    stdout: str
    stderr: str
    boot_s: float  # qemu start until the command starts (host clock)
    command_s: float  # the command alone (guest clock)
    total_s: float  # qemu start until qemu exited (host clock)
    console: str = field(repr=False, default="")


# --------------------------------------------------------------------------------------
# Is qemu usable here?


def unavailable_reason() -> str | None:
    """None when qemu can run here, else a sentence saying why not and what to do."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return (f"{QEMU} is not installed: install Debian's qemu-system-x86 "
                "(setup.sh does)")
    try:
        probe = subprocess.run([qemu, "-version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{qemu} -version could not run: {exc}"
    if probe.returncode != 0:
        return f"{qemu} -version failed: {probe.stderr.decode(errors='replace')[:300]}"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing: install Debian's busybox-static (setup.sh does)"
    return None


# --------------------------------------------------------------------------------------
# Preparing the kernel and the initramfs (once, cached)


def cache_dir() -> Path:
    if "SBX_VM_CACHE" in os.environ:
        return Path(os.environ["SBX_VM_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/tmp/sbx-vm")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sbx-vm"


@functools.cache
def prepare_image() -> VMImage:
    """The cached kernel and initramfs, building whatever is missing. Once per process:
    asking apt which kernel is current takes seconds on a loaded host."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = _kernel_package_name()
        version = package.removeprefix("linux-image-")
        kdir = root / version
        if not (kdir / "vmlinux").is_file():
            _unpack_kernel(package, kdir)
        initramfs = kdir / f"initramfs-{_initramfs_key(kdir)}.cpio"
        if not initramfs.is_file():
            _write_initramfs(kdir, initramfs)
    return VMImage(version, kdir / "vmlinux", initramfs)


def _kernel_package_name() -> str:
    """The versioned kernel package the meta package depends on, e.g.
    linux-image-6.1.0-57-amd64 (asks apt's local lists; updates them once if empty)."""
    name = _apt_depends(KERNEL_META_PACKAGE)
    if name is None and os.geteuid() == 0:
        log.info("apt knows no %s; running apt-get update", KERNEL_META_PACKAGE)
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        name = _apt_depends(KERNEL_META_PACKAGE)
    if name is not None:
        return name
    cached = sorted(p.name for p in cache_dir().glob("*-amd64") if p.is_dir())
    if cached:
        log.warning("apt cannot resolve %s; using the cached kernel %s",
                    KERNEL_META_PACKAGE, cached[-1])
        return f"linux-image-{cached[-1]}"
    raise VMError(
        f"cannot find which kernel {KERNEL_META_PACKAGE} depends on "
        "(apt-cache depends gave nothing): run `apt-get update` as root, "
        "on a Debian or Ubuntu host with its archive reachable"
    )


def _apt_depends(meta: str) -> str | None:
    try:
        out = subprocess.run(["apt-cache", "depends", meta], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Depends: (linux-image-[0-9][^\s]*)", out)
    return found.group(1) if found else None


def _unpack_kernel(package: str, kdir: Path) -> None:
    """Download the package, keep vmlinux, the config and the modules we need."""
    log.info("downloading and unpacking %s into %s", package, kdir)
    with tempfile.TemporaryDirectory(dir=kdir.parent, prefix="unpack-") as tmp:
        got = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp,
                             capture_output=True, text=True, timeout=600)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise VMError(f"apt-get download {package} failed (exit {got.returncode}): "
                          f"{got.stderr.strip()[-500:]}; check the Debian archive is "
                          "reachable and apt's lists are current (apt-get update)")
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tree)], check=True, timeout=600)
        version = package.removeprefix("linux-image-")
        staging = Path(tmp) / "out"
        (staging / "modules").mkdir(parents=True)
        vmlinuz = (tree / "boot" / f"vmlinuz-{version}").read_bytes()
        (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz))
        shutil.copy(tree / "boot" / f"config-{version}", staging / "config")
        _copy_module_closure(tree / "lib" / "modules" / version, staging / "modules")
        staging.rename(kdir)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: find a compressed payload whose contents start
    with the ELF magic (the idea of the kernel tree's scripts/extract-vmlinux). Only
    xz and gzip are tried: Debian's amd64 kernels are xz."""
    for magic, inflate in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08\x00", _gunzip)):
        start = bzimage.find(magic)
        while start != -1:
            try:
                payload = inflate(bzimage[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                payload = b""
            if payload.startswith(b"\x7fELF"):
                return payload
            start = bzimage.find(magic, start + 1)
    raise VMError("no xz or gzip payload holding an ELF kernel found in vmlinuz")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _copy_module_closure(moddir: Path, dest: Path) -> None:
    """Copy WANTED_MODULES and everything they depend on, and write `load-order`
    (dependencies first), the order insmod needs them in."""
    by_name = {_module_name(p): p for p in moddir.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in by_name:
            chain = " <- ".join(path)
            raise VMError(f"kernel module {name} (needed by {chain}) is not in "
                          f"{moddir}; is it built in or renamed in this kernel?")
        for dep in modinfo_depends(by_name[name].read_bytes()):
            visit(dep, (dep, *path))
        order.append(name)

    for wanted in WANTED_MODULES:
        visit(wanted, (wanted,))
    for name in order:
        shutil.copy(by_name[name], dest / f"{name}.ko")
    (dest / "load-order").write_text("\n".join(order) + "\n")


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` list of an uncompressed ELF64 kernel module's .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise VMError("not an uncompressed little-endian ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for index in range(shnum):
        name, offset, size = header(index)
        if ko[strtab + name:].startswith(b".modinfo\x00"):
            for entry in ko[offset:offset + size].split(b"\x00"):
                if entry.startswith(b"depends="):
                    deps = entry.removeprefix(b"depends=").decode()
                    return [d.replace("-", "_") for d in deps.split(",") if d]
            return []
    return []


# The initramfs's /init (busybox ash, PID 1). It builds the root and hands over to the
# per-run stage 2 script from the job share; any failure powers the VM off at once.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "SBX-VM-FAIL: $*"
    dmesg | tail -n 20
    echo o > /proc/sysrq-trigger
    sleep 10
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
ninep=trans=virtio,version=9p2000.L,msize=262144
# The host's / is read-only and does not change during a run: cache it all.
mount -t 9p -o $ninep,ro,cache=loose hostroot /lower || fail "mount the host's / (9p)"
mount -t tmpfs -o mode=0755 upper /upper || fail "mount the overlay's tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work \
    root /newroot || fail "mount the overlay root"
mount -t tmpfs -o mode=0755 run /newroot/run || fail "mount /run"
mkdir -p /newroot/run/sbx-vm
# The job share is written by both sides while the VM runs: no caching.
mount -t 9p -o $ninep,cache=none job /newroot/run/sbx-vm || fail "mount the job share"
# Stage 2 runs in a copy of busybox's shell, which runs its own applets first whatever
# PATH says: a dynamically linked host program costs about 150 ms to start under TCG,
# an applet a few ms.
mkdir -p /newroot/run/sbx-vm-tools
cp /bin/busybox /newroot/run/sbx-vm-tools/busybox
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /run/sbx-vm-tools/busybox sh /run/sbx-vm/stage2.sh
"""


def _initramfs_key(kdir: Path) -> str:
    digest = hashlib.sha256(INIT_SCRIPT.encode())
    digest.update(BUSYBOX.read_bytes())
    digest.update((kdir / "modules" / "load-order").read_bytes())
    return digest.hexdigest()[:12]


def _write_initramfs(kdir: Path, dest: Path) -> None:
    log.info("writing initramfs %s", dest)
    entries: list[tuple[str, int, bytes, int]] = []  # name, mode, data, rdev
    for name in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot", "lib",
                 "lib/modules"):
        entries.append((name, 0o040755, b"", 0))
    entries.append(("dev/console", 0o020600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes(), 0))
    entries.append(("init", 0o100755, INIT_SCRIPT.encode(), 0))
    for module in sorted((kdir / "modules").iterdir()):
        entries.append((f"lib/modules/{module.name}", 0o100644, module.read_bytes(), 0))
    partial = dest.with_suffix(".partial")
    partial.write_bytes(newc_archive(entries))
    partial.rename(dest)


def newc_archive(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the kernel's `newc` format, owned by root, mtime 0."""
    out = bytearray()
    trailer = ("TRAILER!!!", 0, b"", 0)
    for inode, (name, mode, data, rdev) in enumerate([*entries, trailer], start=1):
        encoded = name.encode() + b"\x00"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev),
                  os.minor(rdev), len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        out += b"\x00" * (-len(out) % 4) + data
        out += b"\x00" * (-len(out) % 4)
    return bytes(out)


# --------------------------------------------------------------------------------------
# Running a command


def run_in_vm(
    script: str,
    as_uid: int | None = None,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    memory_mib: int = VM_MEMORY_MIB,
    cpus: int = VM_CPUS,
) -> VMResult:
    """Boot the VM, run `script` with /bin/sh as `as_uid` (default: the `sbxtest`
    account's uid; 0 runs it as root) in a delegated cgroup v2 scope, power off.

    `timeout_s` bounds the whole VM, boot included; past it qemu is killed and
    VMTimeout raised. `env` is added to the script's clean environment."""
    reason = unavailable_reason()
    if reason is not None:
        raise VMError(reason)
    image = prepare_image()
    uid = _default_uid() if as_uid is None else as_uid
    with tempfile.TemporaryDirectory(prefix="sbx-vm-job-") as tmp:
        job = Path(tmp)
        _write_job(job, script, uid, env or {})
        return _boot(image, job, timeout_s, memory_mib, cpus)


def _write_job(job: Path, script: str, uid: int, env: dict[str, str]) -> None:
    """The job share as the VM sees it at /run/sbx-vm: readable by the test user."""
    os.chmod(job, 0o755)
    (job / "script.sh").write_text(script)
    (job / "stage2.sh").write_text(stage2_script(uid, env))
    (job / "bin").mkdir(mode=0o755)
    (job / "bin" / "sbx-vm-scope").write_text(SCOPE_HELPER)
    os.chmod(job / "bin" / "sbx-vm-scope", 0o755)


# On the script's PATH. The script's own shell stays in its scope, so a supervisor it
# starts cannot enable controllers there; under systemd one would start it with
# `systemd-run --user --scope -p Delegate=yes`, and this does the same by hand.
SCOPE_HELPER = r"""#!/bin/sh
# sbx-vm-scope COMMAND [ARG...]: run COMMAND alone in a new delegated scope beside
# $SBX_VM_CGROUP, as `systemd-run --user --scope -p Delegate=yes COMMAND` does.
set -eu
scope="${SBX_VM_CGROUP%/*}/run-$$.scope"
mkdir "$scope"
echo $$ > "$scope/cgroup.procs"
exec "$@"
"""


def _default_uid() -> int:
    try:
        return pwd.getpwnam(DEFAULT_TEST_USER).pw_uid
    except KeyError:
        return 1000


def scope_path(uid: int) -> str:
    """The delegated cgroup the script starts in, relative to /sys/fs/cgroup."""
    return f"user.slice/user-{uid}.slice/user@{uid}.service/app.slice/sbx-vm.scope"


def stage2_script(uid: int, extra_env: dict[str, str]) -> str:
    """Stage 2, run by busybox's shell as PID 1 in the VM's final root."""
    try:
        entry = pwd.getpwuid(uid)
        user, gid, home = entry.pw_name, entry.pw_gid, entry.pw_dir
        groups = "--init-groups"
    except KeyError:
        user, gid, home, groups = f"u{uid}", uid, f"/tmp/home-{uid}", "--clear-groups"
    scope = f"/sys/fs/cgroup/{scope_path(uid)}"
    env = {
        "PATH": f"{JOB_DIR_IN_VM}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
                ":/sbin:/bin",
        "HOME": home, "USER": user, "LOGNAME": user, "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": f"/run/user/{uid}", "SBX_VM_CGROUP": scope,
        **extra_env,
    }
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    # The host's setpriv: busybox's cannot change uids.
    drop = "" if uid == 0 else f"/usr/bin/setpriv --reuid={uid} --regid={gid} {groups} "
    return STAGE2_TEMPLATE.format(
        uid=uid, gid=gid, home=shlex.quote(home), scope=shlex.quote(scope),
        drop=drop, env=assignments, job=JOB_DIR_IN_VM,
    )


STAGE2_TEMPLATE = r"""set -u
job={job}
fail() {{
    echo "SBX-VM-FAIL: $*"
    echo "$*" > $job/failed
    echo o > /proc/sysrq-trigger
    sleep 10
}}
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 shm /dev/shm || fail "mount /dev/shm"
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || fail "mount cgroup2"

# Controllers down to the delegated scope, then hand the scope (and its two parents
# inside user@UID.service) to the user as systemd's Delegate=yes does.
controllers="+memory +pids +cpu"
scope={scope}
dir=/sys/fs/cgroup
for part in $(echo "${{scope#/sys/fs/cgroup/}}" | tr / ' '); do
    echo "$controllers" > $dir/cgroup.subtree_control \
        || fail "enable controllers in $dir"
    dir=$dir/$part
    mkdir $dir || fail "mkdir $dir"
done
delegate() {{
    chown {uid}:{gid} "$1" || fail "chown $1"
    for f in $(cat /sys/kernel/cgroup/delegate); do
        if [ -e "$1/$f" ]; then chown {uid}:{gid} "$1/$f" || fail "chown $1/$f"; fi
    done
}}
delegate $scope/../..
delegate $scope/..
delegate $scope

mkdir -p /run/user/{uid} {home}
chown {uid}:{gid} /run/user/{uid} || fail "chown /run/user/{uid}"
chmod 0700 /run/user/{uid}
[ "$(stat -c %u {home})" = {uid} ] || chown {uid}:{gid} {home}

cat /proc/uptime > $job/started
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' move $scope \
    env -i {env} {drop}/bin/sh $job/script.sh \
    < /dev/null > $job/stdout 2> $job/stderr
echo $? > $job/rc
cat /proc/uptime > $job/finished
sync
echo o > /proc/sysrq-trigger
sleep 10
"""


def qemu_command(image: VMImage, job: Path, memory_mib: int, cpus: int) -> list[str]:
    share = "local,security_model=none,multidevs=remap"
    return [
        QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "max",
        "-smp", str(cpus), "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none", "-monitor", "none",
        "-serial", f"file:{job / 'console.log'}",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs),
        "-append", KERNEL_ARGS,
        "-fsdev", f"{share},id=hostroot,path=/,readonly=on",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"{share},id=job,path={job}",
        "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
    ]


def _boot(image: VMImage, job: Path, timeout_s: float, memory_mib: int,
          cpus: int) -> VMResult:
    command = qemu_command(image, job, memory_mib, cpus)
    log.debug("starting %s", shlex.join(command))
    started_at = time.monotonic()
    deadline = started_at + timeout_s
    with open(job / "qemu.err", "wb") as qemu_err:
        qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                stdout=qemu_err, stderr=qemu_err)
    boot_s = None
    try:
        while qemu.poll() is None:
            if boot_s is None and (job / "started").exists():
                boot_s = time.monotonic() - started_at
            if time.monotonic() > deadline:
                raise VMTimeout(f"the VM ran longer than {timeout_s:.0f} s and was "
                                f"killed{_diagnostics(job)}")
            time.sleep(POLL_INTERVAL_S)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    total_s = time.monotonic() - started_at
    return _collect(job, qemu.returncode, boot_s, total_s)


def _collect(job: Path, qemu_rc: int, boot_s: float | None,
             total_s: float) -> VMResult:
    if not (job / "rc").exists():
        raise VMError(f"the VM stopped (qemu exit {qemu_rc}) before the command "
                      f"finished{_diagnostics(job)}")
    started = float((job / "started").read_text().split()[0])
    finished = float((job / "finished").read_text().split()[0])
    return VMResult(
        returncode=int((job / "rc").read_text()),
        stdout=(job / "stdout").read_text(errors="replace"),
        stderr=(job / "stderr").read_text(errors="replace"),
        boot_s=boot_s if boot_s is not None else total_s,
        command_s=finished - started,
        total_s=total_s,
        console=_read(job / "console.log"),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _diagnostics(job: Path) -> str:
    parts = []
    for name in ("failed", "qemu.err", "stdout", "stderr", "console.log"):
        text = _read(job / name).strip()
        if text:
            parts.append(f"\n--- {name} ---\n{text[-CONSOLE_TAIL_CHARS:]}")
    return "".join(parts) or " (no console output)"
