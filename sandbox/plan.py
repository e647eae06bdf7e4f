"""The pure layer: profile + command line -> a frozen Plan. No syscalls here.

Everything the kernel layer will do is decided here and can be unit-tested to the
byte: the exact uid_map text, the mounts in order, the limits with their units.
"""

from __future__ import annotations

import os

from .errors import UsageError
from .record import record

DEFAULT_UID = 1000
DEFAULT_GID = 1000
# The host id a root caller's payload runs as when no subordinate range exists:
# never host root (0), and an id that owns nothing (nobody/nogroup).
ROOT_CALLER_HOST_ID = 65534
HOSTNAME = "sbx"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

# The host's /usr family: bound read-only, or recreated as symlinks where the host
# has merged /usr (Debian 12: /bin -> usr/bin and so on).
USR_FAMILY = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The parts of /etc a dynamically linked program, CPython, gcc and node need to start.
ETC_BINDS = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "localtime",
    "alternatives",
    "ssl",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
    "gcc",
)
DEV_NODES = ("null", "zero", "full", "random", "urandom")


@record(frozen=True)
class IdMap:
    """One line of /proc/PID/uid_map or gid_map: inside, outside, count."""

    inside: int
    outside: int
    count: int = 1

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}\n"


@record(frozen=True)
class IdPlan:
    uid: int  # the payload's uid inside the sandbox
    gid: int
    uid_map: tuple[IdMap, ...]
    gid_map: tuple[IdMap, ...]
    # True: the maps span a subordinate range and are written by newuidmap and
    # newgidmap (setuid helpers); False: written directly by the supervisor.
    use_helpers: bool = False

    @property
    def switch_to(self) -> tuple[int, int] | None:
        """The host (uid, gid) a root caller's sandbox processes switch to first."""
        if self.use_helpers or self.uid_map[0].outside == 0:
            return None
        return self.uid_map[0].outside, self.gid_map[0].outside

    @property
    def init_is_root(self) -> bool:
        """sbx's init runs as root inside (an id of the caller's range on the host)."""
        return self.use_helpers

    @property
    def uid_map_text(self) -> str:
        return "".join(m.line() for m in self.uid_map)

    @property
    def gid_map_text(self) -> str:
        return "".join(m.line() for m in self.gid_map)


@record(frozen=True)
class Mount:
    """One step of building the new root, applied in order.

    kind: "root-tmpfs" or "root-overlay" (the new root itself, always first; an
    overlay's source is its lower directories joined with ':'), "tmpfs", "bind"
    (source is a host path), "proc", "symlink" (source is the link's text), "file"
    (data is written into a new file), "dir".
    target is an absolute path inside the sandbox.
    """

    kind: str
    target: str
    source: str = ""
    readonly: bool = True
    data: str = ""
    size_bytes: int = 0
    inodes: int = 0
    mode: int = 0o755
    owner: tuple[int, int] | None = None  # (uid, gid) inside, for tmpfs roots
    devices: bool = False  # a bind of device nodes: the only mounts without nodev


@record(frozen=True)
class Limits:
    wall_timeout_s: float | None = None
    cpu_time_s: float | None = None
    memory_max_bytes: int | None = None
    pids_max: int | None = None
    cpus: float | None = None
    output_max_bytes: int | None = None
    fsize_max_bytes: int | None = None
    nofile_max: int | None = None
    tmpfs_size_bytes: int = 64 << 20
    tmpfs_inodes: int = 16384


@record(frozen=True)
class Stdio:
    stdin_path: str | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    # Capture stdout/stderr into the result (--json, --result, the API).
    capture: bool = False
    # Feed these bytes as stdin (API and batch); excludes stdin_path.
    stdin_data: bytes | None = None


@record(frozen=True)
class Plan:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    ids: IdPlan
    mounts: tuple[Mount, ...]
    limits: Limits
    stdio: Stdio = Stdio()
    cwd: str = "/box"
    hostname: str = HOSTNAME
    seccomp_policy: str | None = None  # path of an OCI seccomp JSON policy
    require_cgroup: bool = False
    profile: str = "default"
    box_dir: str | None = None  # host directory bound at /box, if any
    rootfs: str = "host"
    # Files written into the run's fresh /box before the payload starts: (path
    # relative to /box, bytes), in order.
    files: tuple[tuple[str, bytes], ...] = ()

    @property
    def caller_paths(self) -> tuple[str, ...]:
        """Host directories the sandbox binds from the caller's view (--dir, an
        image's layers), made reachable before any credential change (see
        kernel/mounts.py)."""
        paths = (self.box_dir,) if self.box_dir else ()
        if self.mounts and self.mounts[0].kind == "root-overlay":
            paths += tuple(self.mounts[0].source.split(":"))
        return paths

    @property
    def runs_warm(self) -> bool:
        """Whether a warm sandbox (sandbox/warm.py) can run this plan: not with an
        image root (its overlay upper layer is per run) nor with --dir (a host path is
        bound from the caller's view, which a warm sandbox no longer has)."""
        return self.rootfs == "host" and self.box_dir is None

    @property
    def warm_key(self) -> tuple | None:
        """What a warm sandbox must share with this plan to run it: the id maps and
        the read-only part of the root; None when it cannot run warm."""
        if not self.runs_warm:
            return None
        return (self.ids, template_mounts(self.mounts))


# The mounts made afresh for each run, which a warm sandbox's template leaves as
# empty directories: everything a payload can write to, and its /proc.
RUN_TARGETS = ("/dev/shm", "/proc", "/tmp", "/box")


def template_mounts(mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    """A warm sandbox's root: the plan's mounts with each of RUN_TARGETS left as an
    empty directory (made where it is mounted in the plan's order)."""
    return tuple(Mount("dir", m.target) if m.target in RUN_TARGETS else m for m in mounts)


def run_only_mounts(mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    """The mounts a warm sandbox makes for each run, in the plan's order."""
    return tuple(m for m in mounts if m.target in RUN_TARGETS)


def check_box_files(files: object) -> tuple[tuple[str, bytes], ...]:
    """Files for /box as (relative path, bytes) pairs, from a mapping or from pairs
    whose contents are bytes or str (UTF-8). Raises UsageError for a path that is not
    a plain relative one (no "", "." or ".." parts), for a name given twice, and for
    a file that would also have to be a directory."""
    if isinstance(files, dict):
        pairs = list(files.items())
    elif isinstance(files, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in files
    ):
        pairs = list(files)
    else:
        raise UsageError("files: give a mapping of path in /box -> bytes or str")
    checked, names = [], set()
    for name, content in pairs:
        parts = name.split("/") if isinstance(name, str) and "\0" not in name else [""]
        if any(p in ("", ".", "..") for p in parts):
            raise UsageError(
                f"file name {name!r} must be a plain relative path in /box "
                "(no leading or doubled '/', no '.' or '..')"
            )
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise UsageError(f"file {name!r}: its content must be bytes or str")
        if name in names:
            raise UsageError(f"file {name!r} is given twice")
        names.add(name)
        checked.append((name, bytes(content)))
    for name in names:
        parts = name.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in names:
                raise UsageError(
                    f"file {'/'.join(parts[:n])!r} would also be the directory of {name!r}"
                )
    return tuple(checked)


def box_files(files: object, box_dir: str | None, limits: Limits) -> tuple:
    """A plan's files for /box, checked (check_box_files, check_box_fits); files and
    --dir cannot both fill /box."""
    checked = check_box_files(files or ())
    if checked and box_dir is not None:
        raise UsageError("files and dir both fill /box: write the files into the dir")
    check_box_fits(checked, limits)
    return checked


def check_box_fits(files: tuple[tuple[str, bytes], ...], limits: Limits) -> None:
    """Refuse files that cannot fit in /box's tmpfs (its size and inode limits),
    before anything runs. A tmpfs stores data in whole pages."""
    page = 4096
    used = sum(-(-len(data) // page) * page for _, data in files)
    directories = {
        "/".join(parts[:n])
        for parts in (name.split("/") for name, _ in files)
        for n in range(1, len(parts))
    }
    if used > limits.tmpfs_size_bytes or len(files) + len(directories) >= limits.tmpfs_inodes:
        raise UsageError(
            f"the files for /box ({len(files)} files, {used} bytes in pages) do not fit "
            f"in its tmpfs ({limits.tmpfs_size_bytes} bytes, {limits.tmpfs_inodes} "
            "inodes): raise tmpfs_size (--tmpfs-size) or place fewer files"
        )


def plan_ids(
    caller_uid: int,
    caller_gid: int,
    uid: int = DEFAULT_UID,
    gid: int = DEFAULT_GID,
    subuid: tuple[int, int] | None = None,
    subgid: tuple[int, int] | None = None,
    root_host_id: int | None = None,
) -> IdPlan:
    """Choose the id maps.

    Unprivileged, no subordinate range: the single id a user may map, its own
    (inside `uid` is the caller on the host). Unprivileged with subordinate ranges
    (start, count) and newuidmap: inside `uid` is still the caller (files it writes to
    --dir stay the caller's), and inside root, which sbx's init and setup run as, is
    the first id of the range, so the payload and sbx's own processes are different
    host users. Root: the payload must never be host root, so `uid` maps to an id of
    root's own range, or a fresh unused id per run (`root_host_id`, see api.py), or
    nobody; sbx's processes switch to that id before creating the namespace (a
    root-owned user namespace could not create files with an unmapped fsuid).
    """
    if caller_uid != 0 and subuid and subgid:
        return IdPlan(
            uid,
            gid,
            (IdMap(0, subuid[0], 1), IdMap(uid, caller_uid, 1)),
            (IdMap(0, subgid[0], 1), IdMap(gid, caller_gid, 1)),
            use_helpers=True,
        )
    host_uid, host_gid = caller_uid, caller_gid
    if caller_uid == 0:
        # Root's own subordinate range, if it has one, gives the payload an id that
        # nothing else on the host uses; else nobody.
        host_uid = host_gid = root_host_id or ROOT_CALLER_HOST_ID
        if subuid and subgid and uid < subuid[1] and gid < subgid[1]:
            host_uid, host_gid = subuid[0] + uid, subgid[0] + gid
    return IdPlan(uid, gid, (IdMap(uid, host_uid, 1),), (IdMap(gid, host_gid, 1),))


@record(frozen=True)
class HostLayout:
    """What the pure layer needs to know of the host's filesystem, gathered once by
    sandbox.kernel.hostinfo: which of the /usr family exist, and as what."""

    symlinks: dict  # name -> link text, e.g. {"bin": "usr/bin"}
    dirs: frozenset  # names that are real directories
    etc: frozenset  # entries of ETC_BINDS that exist on the host


def passwd_text(uid: int, gid: int) -> str:
    return (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"sbx:x:{uid}:{gid}:sbx:/box:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )


def group_text(gid: int) -> str:
    return f"root:x:0:\nsbx:x:{gid}:\nnogroup:x:65534:\n"


def host_root_mounts(
    layout: HostLayout, limits: Limits, ids: IdPlan, box_dir: str | None
) -> tuple[Mount, ...]:
    """The `host` root filesystem, in the order it is built."""
    mounts: list[Mount] = [Mount("root-tmpfs", "/", size_bytes=1 << 20, inodes=4096)]
    for name in USR_FAMILY:
        if name in layout.symlinks:
            mounts.append(Mount("symlink", f"/{name}", source=layout.symlinks[name]))
        elif name in layout.dirs:
            mounts.append(Mount("bind", f"/{name}", source=f"/{name}"))
    mounts.append(Mount("dir", "/etc"))
    for name in ETC_BINDS:
        if name in layout.etc:
            mounts.append(Mount("bind", f"/etc/{name}", source=f"/etc/{name}"))
    mounts += [
        Mount("file", "/etc/passwd", data=passwd_text(ids.uid, ids.gid)),
        Mount("file", "/etc/group", data=group_text(ids.gid)),
        Mount("file", "/etc/hostname", data=HOSTNAME + "\n"),
        Mount("file", "/etc/hosts", data=f"127.0.0.1 localhost {HOSTNAME}\n"),
    ]
    return tuple(mounts) + run_mounts(limits, ids, box_dir)


def run_mounts(limits: Limits, ids: IdPlan, box_dir: str | None) -> tuple[Mount, ...]:
    """What every root gets on top: /dev, a fresh /proc, /tmp, and /box."""
    mounts = [*dev_mounts(limits), Mount("proc", "/proc")]
    mounts.append(scratch_tmpfs("/tmp", limits, mode=0o1777))
    if box_dir:
        mounts.append(Mount("bind", "/box", source=box_dir, readonly=False))
    else:
        mounts.append(scratch_tmpfs("/box", limits, owner=(ids.uid, ids.gid)))
    return tuple(mounts)


def image_root_mounts(
    lowerdirs: tuple[str, ...], limits: Limits, ids: IdPlan, box_dir: str | None
) -> tuple[Mount, ...]:
    """An imported image: an overlay of its layers under a throwaway upper layer on a
    size-limited tmpfs (the image is never written), then the same /dev, /proc, /tmp
    and /box as the host root. The image keeps its own /etc."""
    root = Mount(
        "root-overlay",
        "/",
        source=":".join(lowerdirs),
        readonly=False,
        size_bytes=limits.tmpfs_size_bytes,
        inodes=limits.tmpfs_inodes,
    )
    return (root, *run_mounts(limits, ids, box_dir))


def scratch_tmpfs(
    target: str, limits: Limits, mode: int = 0o755, owner: tuple[int, int] | None = None
) -> Mount:
    return Mount(
        "tmpfs",
        target,
        readonly=False,
        size_bytes=limits.tmpfs_size_bytes,
        inodes=limits.tmpfs_inodes,
        mode=mode,
        owner=owner,
    )


def dev_mounts(limits: Limits) -> list[Mount]:
    """A minimal /dev: the harmless character devices bound from the host (a user
    namespace cannot mknod), the usual symlinks, and a size-limited /dev/shm."""
    # Read-only once populated (see kernel/mounts.py build_root): nothing in /dev is
    # the payload's to create.
    mounts = [Mount("tmpfs", "/dev", size_bytes=64 << 10, inodes=64)]
    mounts += [
        Mount("bind", f"/dev/{n}", source=f"/dev/{n}", readonly=False, devices=True)
        for n in DEV_NODES
    ]
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        mounts.append(Mount("symlink", f"/dev/{name}", source=target))
    mounts.append(scratch_tmpfs("/dev/shm", limits, mode=0o1777))
    return mounts


def payload_env(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """A clean environment: nothing of the caller's leaks in; --env adds."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": "/box",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "USER": "sbx",
        "LOGNAME": "sbx",
        "HOSTNAME": HOSTNAME,
    }
    env.update(extra)
    return tuple(env.items())


# sbx's own init and set-up are charged to the run's memory cgroup (about 3 MiB here):
# below this, a run could not even start.
MIN_MEMORY_BYTES = 4 << 20


class _Unlimited:
    """The value of a limit option given as "none": it removes the profile's limit."""

    def __repr__(self) -> str:
        return "UNLIMITED"


UNLIMITED = _Unlimited()


def make_limits(profile_limits: dict, options: dict) -> Limits:
    """Profile limits overridden by command-line options (both already parsed); an
    option of UNLIMITED removes the profile's limit."""
    merged = {**profile_limits, **{k: v for k, v in options.items() if v is not None}}
    merged = {k: v for k, v in merged.items() if v is not UNLIMITED}
    memory = merged.get("memory")
    if memory is not None and memory < MIN_MEMORY_BYTES:
        raise UsageError(
            f"a memory limit of {memory} bytes is too small: sbx's own set-up is "
            f"charged to it; use at least {MIN_MEMORY_BYTES >> 20}M"
        )
    _check_range(merged, "pids", 2, 1 << 22, "sbx's init is one of the tasks")
    _check_range(merged, "nofile", 8, 1 << 20, "stdio, and a few for the C library")
    _check_range(merged, "tmpfs_size", 1 << 20, 1 << 40, "in bytes")
    _check_range(merged, "cpus", 0.01, 1024, "CPUs")
    defaults = Limits()
    return Limits(
        wall_timeout_s=merged.get("wall"),
        cpu_time_s=merged.get("time"),
        memory_max_bytes=merged.get("memory"),
        pids_max=merged.get("pids"),
        cpus=merged.get("cpus"),
        output_max_bytes=merged.get("output_limit"),
        fsize_max_bytes=merged.get("fsize"),
        nofile_max=merged.get("nofile"),
        tmpfs_size_bytes=merged.get("tmpfs_size", defaults.tmpfs_size_bytes),
        tmpfs_inodes=defaults.tmpfs_inodes,
    )


def _check_range(limits: dict, key: str, low, high, why: str) -> None:
    value = limits.get(key)
    if value is not None and not low <= value <= high:
        raise UsageError(
            f"--{key.replace('_', '-')} {value} is out of range: use {low} to {high} ({why})"
        )


LIMIT_KEYS = ("wall", "time", "memory", "pids", "cpus", "output_limit", "fsize")
LIMIT_KEYS += ("nofile", "tmpfs_size")


def make_plan(
    profile: dict,
    options: dict,
    argv: list[str],
    caller: tuple[int, int],
    layout: HostLayout,
    subids: tuple | None = None,
    lowerdirs: list[str] | None = None,
) -> Plan:
    """Profile + command-line options -> the frozen plan of one run."""
    limits = make_limits(profile.get("limits", {}), {k: options.get(k) for k in LIMIT_KEYS})
    uid = options.get("uid") or profile.get("uid", DEFAULT_UID)
    gid = options.get("gid") or profile.get("gid", DEFAULT_GID)
    subuid, subgid = subids if subids else (None, None)
    ids = plan_ids(caller[0], caller[1], uid, gid, subuid, subgid, options.get("host_id"))
    box_dir = options.get("dir")
    if box_dir is not None:
        box_dir = os.path.abspath(box_dir)
    files = box_files(options.get("files"), box_dir, limits)
    rootfs = options.get("rootfs") or profile.get("rootfs", "host")
    if rootfs == "host":
        mounts = host_root_mounts(layout, limits, ids, box_dir)
    else:
        mounts = image_root_mounts(tuple(lowerdirs or ()), limits, ids, box_dir)
    env = tuple(profile.get("env", {}).items()) + tuple(options.get("env") or ())
    return Plan(
        argv=tuple(argv),
        env=payload_env(env),
        ids=ids,
        mounts=mounts,
        limits=limits,
        stdio=Stdio(
            stdin_path=options.get("stdin"),
            stdout_path=options.get("stdout"),
            stderr_path=options.get("stderr"),
            capture=bool(options.get("json") or options.get("result") or options.get("capture")),
            stdin_data=options.get("stdin_data"),
        ),
        seccomp_policy=options.get("seccomp") or profile.get("seccomp"),
        require_cgroup=bool(options.get("require_cgroup") or profile.get("require_cgroup")),
        profile=profile.get("name", "default"),
        box_dir=box_dir,
        rootfs=rootfs,
        files=files,
    )
