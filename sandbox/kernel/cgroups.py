"""The per-run cgroup, or the honest fallback when there is none.

Three mechanisms, in order of preference:

1. A leaf in a **delegated cgroup v2** subtree: memory.max with memory.swap.max 0,
   pids.max, cpu.max; CPU time from cpu.stat, peak from memory.peak, OOM kills from
   memory.events; cgroup.kill (the freezer before Linux 5.14).
2. **cgroup v1** groups (memory, pids, cpu, cpuacct, freezer), each created below the
   cgroup this process is in for that controller; in practice only root may do this.
3. **rlimits** set by the payload itself: RLIMIT_DATA for memory (a poor limit),
   RLIMIT_NPROC for tasks (per user namespace since Linux 5.14), nothing for a CPU
   share; whole-run CPU time is then watched by the supervisor.

The layer is split as the rest of sbx: `read_facts` gathers what the host offers,
`plan_mechanisms` (pure) decides which mechanism enforces each limit and what must be
written, and `open_run_cgroup` applies the plan. Every limit that ends up weaker than
a cgroup is a WARNING and an entry in `RunCgroup.warnings`.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import time

from .. import log as logs
from ..errors import SandboxError, kernel_error
from ..plan import Limits
from ..record import factory, record

log = logs.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
CPU_PERIOD_US = 100_000
# The kernel refuses a cpu.max / cfs_quota_us quota below 1 ms.
CPU_QUOTA_MIN_US = 1_000
LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
SUPERVISOR_LEAF_PREFIX = "sbx-sup-"
RUN_LEAF_PREFIX = "sbx-"
# RLIMIT_NPROC is counted per user namespace from Linux 5.14 (ucounts).
NPROC_PER_USERNS_KERNEL = (5, 14)
REMOVE_TIMEOUT_S = 2.0
# An empty sbx group of a dead supervisor is removed once it is this old.
STALE_AGE_S = 10.0
SCOPE_ENV = "SBX_DELEGATED_SCOPE"

MECHANISM_KEYS = ("memory", "pids", "cpus", "cpu_time")


# --- reading the host: pure parsers ------------------------------------------------


@record(frozen=True)
class CgroupMount:
    """One cgroup or cgroup2 line of /proc/self/mountinfo."""

    mount_point: str
    root: str  # the path inside the hierarchy that is mounted there
    fstype: str  # "cgroup" or "cgroup2"
    controllers: frozenset = frozenset()  # v1: from the super options

    def directory(self, cgroup_path: str) -> str | None:
        """The directory of `cgroup_path` (as /proc/self/cgroup gives it), or None
        when this mount does not show it (mounted from a deeper root)."""
        root = self.root.rstrip("/")
        if cgroup_path != root and not cgroup_path.startswith(root + "/"):
            return None
        rest = cgroup_path[len(root) :].strip("/")
        return os.path.join(self.mount_point, rest) if rest else self.mount_point


def _unescape_mountinfo(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts listed in /proc/self/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        controllers: frozenset = frozenset()
        if tail[0] == "cgroup":
            known = set(V1_CONTROLLERS) | {"cpuset", "devices", "blkio", "hugetlb"}
            known |= {"net_cls", "net_prio", "perf_event", "rdma", "misc"}
            controllers = frozenset(o for o in tail[2].split(",") if o in known)
        mounts.append(
            CgroupMount(
                _unescape_mountinfo(fields[4]),
                _unescape_mountinfo(fields[3]),
                tail[0],
                controllers,
            )
        )
    return mounts


@record(frozen=True)
class Membership:
    """Where a process is, from /proc/PID/cgroup: its cgroup v2 path ("0::/x")
    and its path in each v1 hierarchy, by controller."""

    v2_path: str | None
    v1_paths: dict = factory(dict)  # controller -> path


def parse_proc_cgroup(text: str) -> Membership:
    v2_path, v1_paths = None, {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
            continue
        for name in controllers.split(","):
            if name and not name.startswith("name="):
                v1_paths[name] = path
    return Membership(v2_path, v1_paths)


def find_cgroup2_mount(mounts: list[CgroupMount]) -> CgroupMount | None:
    """The cgroup2 mount to use: /sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one, else the first cgroup2 mount."""
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    for preferred in (CGROUP_ROOT, CGROUP_ROOT + "/unified"):
        for mount in v2:
            if mount.mount_point == preferred:
                return mount
    return v2[0] if v2 else None


def find_v1_mount(mounts: list[CgroupMount], controller: str) -> CgroupMount | None:
    for mount in mounts:
        if mount.fstype == "cgroup" and controller in mount.controllers:
            return mount
    return None


def classify_layout(mounts: list[CgroupMount]) -> str:
    """'unified' (cgroup v2 only), 'hybrid' (v1 controllers plus a cgroup2 mount),
    'legacy' (v1 only) or 'none'."""
    has_v1 = any(m.fstype == "cgroup" and m.controllers for m in mounts)
    has_v2 = any(m.fstype == "cgroup2" for m in mounts)
    if has_v1 and has_v2:
        return "hybrid"
    if has_v1:
        return "legacy"
    return "unified" if has_v2 else "none"


def kernel_version(release: str) -> tuple[int, int]:
    """'6.1.0-18-amd64' -> (6, 1)."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


# --- what is written: pure ---------------------------------------------------------


def cpu_quota_us(cpus: float, period_us: int = CPU_PERIOD_US) -> int:
    return max(CPU_QUOTA_MIN_US, round(cpus * period_us))


def cpu_max_text(cpus: float | None, period_us: int = CPU_PERIOD_US) -> str:
    """cgroup v2 cpu.max: 0.5 cpus -> '50000 100000'; no limit -> 'max 100000'."""
    if cpus is None:
        return f"max {period_us}"
    return f"{cpu_quota_us(cpus, period_us)} {period_us}"


def v2_writes(limits: Limits, controllers: frozenset) -> list[tuple[str, str]]:
    """The files written into a cgroup v2 run leaf, in order."""
    writes = []
    if "memory" in controllers and limits.memory_max_bytes is not None:
        writes.append(("memory.max", str(limits.memory_max_bytes)))
        # Swap would let the run exceed its memory limit unseen.
        writes.append(("memory.swap.max", "0"))
    if "pids" in controllers and limits.pids_max is not None:
        writes.append(("pids.max", str(limits.pids_max)))
    if "cpu" in controllers and limits.cpus is not None:
        writes.append(("cpu.max", cpu_max_text(limits.cpus)))
    return writes


def v1_writes(limits: Limits, controllers: frozenset) -> dict[str, list]:
    """Controller -> the files written into its cgroup v1 run group, in order."""
    writes: dict[str, list] = {}
    if "memory" in controllers and limits.memory_max_bytes is not None:
        limit = str(limits.memory_max_bytes)
        # memsw (memory + swap) equal to the memory limit leaves no room for swap;
        # it must be written after limit_in_bytes, which it may never be below.
        writes["memory"] = [
            ("memory.limit_in_bytes", limit),
            ("memory.memsw.limit_in_bytes", limit),
        ]
    if "pids" in controllers and limits.pids_max is not None:
        writes["pids"] = [("pids.max", str(limits.pids_max))]
    if "cpu" in controllers and limits.cpus is not None:
        writes["cpu"] = [
            ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu.cfs_quota_us", str(cpu_quota_us(limits.cpus))),
        ]
    return writes


# --- choosing the mechanisms: pure -------------------------------------------------


@record(frozen=True)
class CgroupFacts:
    """What this host and this process offer, gathered once by `read_facts`."""

    layout: str
    euid: int
    kernel: tuple[int, int]
    v2_dir: str | None = None  # our own cgroup v2 directory
    v2_is_root: bool = False  # our cgroup is the root of the v2 hierarchy
    v2_controllers: frozenset = frozenset()  # its cgroup.controllers
    v2_writable: bool = False
    v1_dirs: dict = factory(dict)  # controller -> our v1 directory
    v1_writable: frozenset = frozenset()  # controllers whose directory we may write
    v1_memsw: bool = True  # memory.memsw.* exists (swap accounting is on)
    swap_active: bool = False


@record(frozen=True)
class MechanismPlan:
    backend: str  # "cgroup2", "cgroup1" or "rlimit"
    controllers: frozenset  # the controllers the backend uses
    mechanisms: dict  # MECHANISM_KEYS -> "cgroup2" | "cgroup1" | "rlimit" | ...
    rlimits: tuple  # (resource, soft, hard) for the payload
    warnings: tuple
    no_cgroup_reasons: tuple  # why a better mechanism was not used
    refusal: str | None = None  # set when require_cgroup cannot be met


def v2_unusable_reason(facts: CgroupFacts) -> str | None:
    if facts.v2_dir is None:
        return "no cgroup v2 hierarchy is mounted, or this process is not in it"
    usable = facts.v2_controllers & set(LIMIT_CONTROLLERS)
    if not usable:
        offered = " ".join(sorted(facts.v2_controllers)) or "none"
        bound = ", memory, pids and cpu are bound to cgroup v1 here"
        return (
            f"cgroup v2 at {facts.v2_dir} offers no memory, pids or cpu controller "
            f"(controllers: {offered}{bound if facts.layout == 'hybrid' else ''})"
        )
    if not facts.v2_writable:
        return (
            f"cgroup v2 {facts.v2_dir} is not delegated to uid {facts.euid} "
            "(cgroup.procs and cgroup.subtree_control are not writable)"
        )
    return None


def v1_unusable_reason(facts: CgroupFacts) -> str | None:
    mounted = set(facts.v1_dirs) & {"memory", "pids", "cpu", "cpuacct"}
    if not mounted:
        return "no cgroup v1 memory, pids or cpu hierarchy is mounted"
    if not facts.v1_writable & mounted:
        return (
            f"cgroup v1 needs root: uid {facts.euid} may not create groups in "
            + ", ".join(sorted(facts.v1_dirs[c] for c in mounted))
        )
    return None


def _covered(limits: Limits, backend: str, controllers: frozenset) -> dict:
    """Which requested limits a cgroup backend with these controllers enforces."""
    cpu_time_controller = "cpuacct" if backend == "cgroup1" else None
    covers = {
        "memory": "memory" in controllers,
        "pids": "pids" in controllers,
        "cpus": "cpu" in controllers,
        # cgroup v2 always accounts CPU in cpu.stat; v1 needs cpuacct.
        "cpu_time": cpu_time_controller is None or cpu_time_controller in controllers,
    }
    return {key: covers[key] for key in _requested(limits)}


def _requested(limits: Limits) -> list[str]:
    values = {
        "memory": limits.memory_max_bytes,
        "pids": limits.pids_max,
        "cpus": limits.cpus,
        "cpu_time": limits.cpu_time_s,
    }
    return [key for key in MECHANISM_KEYS if values[key] is not None]


def plan_mechanisms(
    facts: CgroupFacts,
    limits: Limits,
    require_cgroup: bool = False,
    v2_failure: str | None = None,
) -> MechanismPlan:
    """Decide, for each limit, the mechanism that enforces it (no syscalls).

    `v2_failure` is why applying a cgroup v2 plan failed, when it did: the host
    then gets a plan without cgroup v2.
    """
    reasons = []
    candidates = []
    v2_reason = v2_failure or v2_unusable_reason(facts)
    if v2_reason is None:
        controllers = facts.v2_controllers & set(LIMIT_CONTROLLERS)
        candidates.append(("cgroup2", frozenset(controllers)))
    else:
        reasons.append(v2_reason)
    v1_reason = v1_unusable_reason(facts)
    if v1_reason is None:
        candidates.append(("cgroup1", frozenset(facts.v1_writable)))
    else:
        reasons.append(v1_reason)

    backend, controllers = "rlimit", frozenset()
    if candidates:
        # The backend that enforces the most requested limits; cgroup v2 on a tie.
        score = lambda c: sum(_covered(limits, *c).values())  # noqa: E731
        backend, controllers = max(candidates, key=score)
    return _fill_plan(facts, limits, backend, controllers, reasons, require_cgroup)


def _fill_plan(facts, limits, backend, controllers, reasons, require_cgroup):
    mechanisms = {key: "none" for key in MECHANISM_KEYS}
    covered = _covered(limits, backend, controllers) if backend != "rlimit" else {}
    rlimits, warnings, uncovered = [], [], []
    for key in _requested(limits):
        if covered.get(key):
            mechanisms[key] = backend
            continue
        uncovered.append(key)
        mechanism, limit, warning = _fallback(key, limits, facts, backend)
        mechanisms[key] = mechanism
        rlimits += limit
        warnings.append(warning)
    if backend == "cgroup1" and "memory" in covered and not facts.v1_memsw:
        if facts.swap_active:
            warnings.append(
                "memory limit: swap accounting is off (no memory.memsw.*), so the "
                "run may swap beyond its memory limit; boot with swapaccount=1"
            )
    refusal = None
    if require_cgroup and (backend == "rlimit" or uncovered):
        refusal = _refusal_text(backend, uncovered, reasons)
    return MechanismPlan(
        backend,
        controllers,
        mechanisms,
        tuple(rlimits),
        tuple(warnings),
        tuple(reasons),
        refusal,
    )


def _fallback(key: str, limits: Limits, facts: CgroupFacts, backend: str):
    """(mechanism, rlimits, warning) for a limit no cgroup enforces."""
    where = "no cgroup" if backend == "rlimit" else f"no {key} controller in {backend}"
    if key == "memory":
        n = limits.memory_max_bytes
        return (
            "rlimit",
            # RLIMIT_DATA, not RLIMIT_AS: it counts private writable memory (heap,
            # anonymous mappings) but not address space merely reserved, which JIT
            # runtimes such as node's V8 reserve by the gigabyte and die without.
            [(resource.RLIMIT_DATA, n, n)],
            f"memory limit enforced with RLIMIT_DATA ({where}): it caps each "
            "process's private writable memory, not the run's total, and shows as "
            "a failed allocation (RE), not MLE",
        )
    if key == "pids":
        n = limits.pids_max
        if facts.kernel >= NPROC_PER_USERNS_KERNEL:
            detail = "counted in the run's own user namespace"
        else:
            detail = (
                f"counted over every process of the host uid on Linux "
                f"{facts.kernel[0]}.{facts.kernel[1]} (< 5.14), not per run"
            )
        return (
            "rlimit",
            [(resource.RLIMIT_NPROC, n, n)],
            f"task limit enforced with RLIMIT_NPROC ({where}): {detail}; "
            "the task count is not reported",
        )
    if key == "cpus":
        return (
            "none",
            [],
            f"CPU share (--cpus) is not enforced ({where}): the run may use "
            "every CPU",
        )
    # Whole-run CPU time: the supervisor sums what it can see of the run's
    # processes (its RLIMIT_CPU backstop is per process and set for every run).
    return (
        "supervisor",
        [],
        f"CPU time limit watched by the supervisor ({where}): summed from /proc, "
        "it misses processes nobody reaps (each is still bound by RLIMIT_CPU)",
    )


def _refusal_text(backend: str, uncovered: list[str], reasons: list[str]) -> str:
    what = "no cgroup is available" if backend == "rlimit" else (
        f"{backend} cannot enforce the {', '.join(uncovered)} limit"
    )
    why = "; ".join(reasons) or "the controllers are missing"
    return (
        f"--require-cgroup: {what} ({why}); run as root on a cgroup v1 host, or "
        "in a delegated cgroup v2 subtree, e.g. "
        "`systemd-run --user --scope -p Delegate=yes sbx exec ...`; "
        "`sbx doctor` explains this host"
    )


# --- reading the host: syscalls ----------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _may_write(directory: str, *files: str) -> bool:
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    return all(os.access(os.path.join(directory, f), os.W_OK) for f in files)


def read_facts(
    mountinfo_text: str | None = None, proc_cgroup_text: str | None = None
) -> CgroupFacts:
    """What this host offers this process (reads /proc and /sys/fs/cgroup)."""
    mounts = parse_mountinfo(mountinfo_text or _read("/proc/self/mountinfo"))
    member = parse_proc_cgroup(proc_cgroup_text or _read("/proc/self/cgroup"))
    kw: dict = {}
    v2 = find_cgroup2_mount(mounts)
    if v2 is not None and member.v2_path is not None:
        directory = v2.directory(member.v2_path)
        if directory and os.path.isdir(directory):
            kw["v2_dir"] = directory
            kw["v2_is_root"] = directory == v2.mount_point and v2.root == "/"
            try:
                kw["v2_controllers"] = frozenset(
                    _read(os.path.join(directory, "cgroup.controllers")).split()
                )
            except OSError:
                pass
            kw["v2_writable"] = _may_write(
                directory, "cgroup.procs", "cgroup.subtree_control"
            )
    v1_dirs = {}
    for controller in V1_CONTROLLERS:
        mount = find_v1_mount(mounts, controller)
        path = member.v1_paths.get(controller)
        directory = mount.directory(path) if mount and path else None
        if directory and os.path.isdir(directory):
            v1_dirs[controller] = directory
    kw["v1_writable"] = frozenset(
        c for c, d in v1_dirs.items() if _may_write(d, "cgroup.procs")
    )
    if "memory" in v1_dirs:
        memsw = os.path.join(v1_dirs["memory"], "memory.memsw.limit_in_bytes")
        kw["v1_memsw"] = os.path.exists(memsw)
    try:
        kw["swap_active"] = len(_read("/proc/swaps").splitlines()) > 1
    except OSError:
        pass
    return CgroupFacts(
        layout=classify_layout(mounts),
        euid=os.geteuid(),
        kernel=kernel_version(os.uname().release),
        v1_dirs=v1_dirs,
        **kw,
    )


# --- the run's cgroup ------------------------------------------------------------


class RunCgroup:
    """The limits of one run, as enforced on this host.

    This base class is the rlimit fallback: no cgroup, nothing to join or remove.
    """

    def __init__(self, plan: MechanismPlan) -> None:
        self.mechanisms: dict[str, str] = dict(plan.mechanisms)
        self.warnings: list[str] = list(plan.warnings)
        self.backend = plan.backend
        self._rlimits = list(plan.rlimits)

    def join_self(self) -> None:
        """Move the calling process into the run's cgroup(s); for the forked child,
        before it unshares. Async-signal-safe enough for a child of a threaded
        parent: only write(2) on fds opened beforehand."""

    def procs_fds(self) -> list[int]:
        """Open files of the run's cgroup(s) that move their writer in (cgroup.procs,
        or v1's `tasks`): a single-threaded process outside this one (a warm
        sandbox's launcher, sandbox/warm.py) joins by writing "0" to each. The
        kernel checks the opener's credentials, not the writer's."""
        return []

    def rlimits(self) -> list[tuple[int, int, int]]:
        return list(self._rlimits)

    def cpu_time_ns(self) -> int | None:
        return None

    def cpu_split(self) -> tuple[float, float] | None:
        """The group's CPU time as (user, system), in any one unit: only their ratio
        is used. None without CPU accounting."""
        return None

    def peak_memory_bytes(self) -> int | None:
        return None

    def oom_killed(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def _kill_quietly(self) -> None:
        """For removing a group that still has tasks: kill them, never raise."""
        try:
            self.kill()
        except SandboxError:
            pass

    def __enter__(self) -> RunCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write(path: str, text: str, hint: str = "") -> None:
    log.debug("write %r to %s", text, path)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise kernel_error(f"write {text!r} to {path}", e.errno, hint) from e


def _read_procs(path: str) -> list[int]:
    try:
        return [int(p) for p in _read(path).split()]
    except FileNotFoundError:
        return []


def _read_key(path: str, key: str) -> int | None:
    """A 'key value' line of a flat-keyed cgroup file (cpu.stat, memory.events)."""
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _kill_all(procs_path: str) -> int:
    killed = 0
    for pid in _read_procs(procs_path):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def _remove_dir(path: str, procs_path: str, kill) -> bool:
    """rmdir a cgroup, waiting briefly for its last tasks to be reaped."""
    deadline = time.monotonic() + REMOVE_TIMEOUT_S
    delay = 0.001
    while True:
        try:
            os.rmdir(path)
            log.debug("removed %s", path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning(
                    "cannot remove cgroup %s: %s; tasks left: %s",
                    path,
                    os.strerror(e.errno),
                    _read_procs(procs_path),
                )
                return False
        kill()
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def freeze_and_kill(path: str) -> None:
    """Kill every task of a cgroup v2 without cgroup.kill (Linux 5.2 to 5.13):
    freeze it, so nothing forks while we kill, then thaw it so the SIGKILLs land."""
    _write(os.path.join(path, "cgroup.freeze"), "1")
    try:
        deadline = time.monotonic() + 1.0
        events = os.path.join(path, "cgroup.events")
        while _read_key(events, "frozen") != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        _kill_all(os.path.join(path, "cgroup.procs"))
    finally:
        _write(os.path.join(path, "cgroup.freeze"), "0")


class Cgroup2Run(RunCgroup):
    """A leaf cgroup in a delegated cgroup v2 subtree."""

    def __init__(self, plan: MechanismPlan, leaf: str) -> None:
        super().__init__(plan)
        self.path = leaf
        self._procs_fd: int | None = os.open(
            os.path.join(leaf, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC
        )
        self._closed = False

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def join_self(self) -> None:
        assert self._procs_fd is not None, "join_self after close"
        try:
            os.write(self._procs_fd, b"0")
        except OSError as e:
            raise kernel_error(
                f"write '0' to {self._file('cgroup.procs')}",
                e.errno,
                _explain_v2_errno(e.errno, self.path),
            ) from e

    def procs_fds(self) -> list[int]:
        return [] if self._procs_fd is None else [self._procs_fd]

    def cpu_time_ns(self) -> int | None:
        usec = _read_key(self._file("cpu.stat"), "usage_usec")
        return None if usec is None else usec * 1000

    def cpu_split(self) -> tuple[float, float] | None:
        path = self._file("cpu.stat")
        user, system = _read_key(path, "user_usec"), _read_key(path, "system_usec")
        return None if user is None or system is None else (user, system)

    def peak_memory_bytes(self) -> int | None:
        try:
            return int(_read(self._file("memory.peak")))
        except (OSError, ValueError):
            return None  # no memory controller, or Linux < 5.19

    def oom_killed(self) -> bool:
        return (_read_key(self._file("memory.events"), "oom_kill") or 0) > 0

    def pids(self) -> list[int]:
        return _read_procs(self._file("cgroup.procs"))

    def kill(self) -> None:
        if self._closed:
            return  # close() killed everything before removing the leaf
        if os.path.exists(self._file("cgroup.kill")):
            _write(self._file("cgroup.kill"), "1")
        else:
            freeze_and_kill(self.path)

    def close(self) -> None:
        if self._closed:
            return
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None
        if self.pids():
            self.kill()
        _remove_dir(self.path, self._file("cgroup.procs"), self._kill_quietly)
        self._closed = True


class Cgroup1Run(RunCgroup):
    """One group per cgroup v1 hierarchy (memory, pids, cpu, cpuacct, freezer)."""

    def __init__(self, plan: MechanismPlan, dirs: dict[str, str]) -> None:
        super().__init__(plan)
        self.dirs = dict(dirs)  # controller -> directory; co-mounted share one
        self._closed = False
        # What joins a run's groups is always a freshly forked, single-threaded
        # process writing "0" (itself): through `tasks` it moves its one thread, which
        # is moving the whole process. Through `cgroup.procs` the kernel would take
        # the global thread-group lock for writing, which waits for an RCU grace
        # period (about 9 ms here, one write in six in a batch) with every cgroup
        # operation of the host held up behind it; for the calling thread alone it
        # does not take that lock.
        # (A group delegated with only cgroup.procs writable is joined through that.)
        self._procs_fds = []
        for directory in self._unique_dirs():
            try:
                fd = os.open(os.path.join(directory, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
            except PermissionError:
                path = os.path.join(directory, "cgroup.procs")
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            self._procs_fds.append(fd)

    def _unique_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def _file(self, controller: str, name: str) -> str | None:
        directory = self.dirs.get(controller)
        return os.path.join(directory, name) if directory else None

    def join_self(self) -> None:
        for fd, directory in zip(self._procs_fds, self._unique_dirs()):
            try:
                os.write(fd, b"0")
            except OSError as e:
                call = f"write '0' to {directory}/tasks (or cgroup.procs)"
                raise kernel_error(call, e.errno) from e

    def procs_fds(self) -> list[int]:
        return list(self._procs_fds)

    def cpu_time_ns(self) -> int | None:
        path = self._file("cpuacct", "cpuacct.usage")
        try:
            return int(_read(path)) if path else None
        except (OSError, ValueError):
            return None

    def cpu_split(self) -> tuple[float, float] | None:
        path = self._file("cpuacct", "cpuacct.stat")  # in clock ticks
        if path is None:
            return None
        user, system = _read_key(path, "user"), _read_key(path, "system")
        return None if user is None or system is None else (user, system)

    def peak_memory_bytes(self) -> int | None:
        path = self._file("memory", "memory.max_usage_in_bytes")
        try:
            return int(_read(path)) if path else None
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        path = self._file("memory", "memory.oom_control")
        if not path:
            return False
        # oom_kill is counted since Linux 4.13; before, under_oom is the best sign.
        kills = _read_key(path, "oom_kill")
        return (kills if kills is not None else _read_key(path, "under_oom") or 0) > 0

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory in self._unique_dirs():
            found.update(_read_procs(os.path.join(directory, "cgroup.procs")))
        return sorted(found)

    def kill(self) -> None:
        if self._closed:
            return  # close() killed everything before removing the groups
        state = self._file("freezer", "freezer.state")
        if state is None:
            # No freezer: repeat, since a task may fork between the read and the
            # kill; the pids limit bounds how often that can happen.
            for _ in range(100):
                if not sum(_kill_all(p) for p in self._procs_paths()):
                    return
            return
        # Frozen tasks cannot fork; the SIGKILLs land when they are thawed.
        _write(state, "FROZEN")
        try:
            deadline = time.monotonic() + 1.0
            while _read(state).strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.001)
            for path in self._procs_paths():
                _kill_all(path)
        finally:
            _write(state, "THAWED")

    def _procs_paths(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self._unique_dirs()]

    def close(self) -> None:
        if self._closed:
            return
        for fd in self._procs_fds:
            os.close(fd)
        self._procs_fds = []
        # A group that still has tasks fails rmdir with EBUSY: _remove_dir then kills
        # them and tries again (no listing of every group first).
        for directory in self._unique_dirs():
            procs = os.path.join(directory, "cgroup.procs")
            _remove_dir(directory, procs, self._kill_quietly)
        self._closed = True


# --- applying a plan -------------------------------------------------------------


def _explain_v2_errno(err: int, path: str) -> str:
    if err in (errno.EACCES, errno.EPERM):
        return (
            f"{path} is not delegated to this user; run sbx in a delegated subtree, "
            "e.g. `systemd-run --user --scope -p Delegate=yes sbx exec ...`"
        )
    if err == errno.EBUSY:
        return (
            "cgroup v2's no-internal-processes rule: a cgroup with processes of its "
            "own cannot enable controllers for its children; run sbx in a cgroup of "
            "its own (systemd-run --user --scope -p Delegate=yes)"
        )
    if err == errno.ENOENT:
        return "the controller is not enabled in the parent's cgroup.subtree_control"
    if err == errno.EAGAIN:
        return "the pids limit of an enclosing cgroup is reached"
    return ""


def leaf_name(run_id: str, supervisor_pid: int) -> str:
    """A run's cgroup is named after its supervisor, so that a later run can tell
    a group whose supervisor died (SIGKILL: nothing removed it) from a live one."""
    return f"{RUN_LEAF_PREFIX}{supervisor_pid}-{run_id}"


def stale_owner(name: str) -> int | None:
    """The supervisor pid of an sbx cgroup name ('sbx-sup-PID', 'sbx-PID-ID')."""
    rest = name[len(RUN_LEAF_PREFIX) :] if name.startswith(RUN_LEAF_PREFIX) else ""
    rest = rest.removeprefix("sup-")
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


# When this process next looks for stale groups in a parent (time.monotonic()): a
# batch or a Runner makes a run cgroup every few milliseconds, and a look (a listing
# and a check of each name) cost more than the rest of the run's cgroup set-up.
REAP_EVERY_S = 30.0
_next_reap: dict[str, float] = {}


def forget_reaped() -> None:
    """Look for stale groups again at the next run (tests)."""
    _next_reap.clear()


def _reap_stale_groups(parent: str) -> None:
    """Remove the empty sbx groups in `parent` whose supervisor is gone; in one
    process, at most every REAP_EVERY_S, or sooner when a dead supervisor's group
    was still too young to remove.

    Only empty groups can be removed (rmdir fails on a populated one), and only
    those older than STALE_AGE_S, so that a group of a live supervisor in another
    pid namespace, empty for the moment between its creation and the join, is safe.
    """
    clock = time.monotonic()
    if clock < _next_reap.get(parent, float("-inf")):
        return
    next_look = clock + REAP_EVERY_S
    try:
        names = os.listdir(parent)
    except OSError:
        names = []
    now = time.time()
    for name in names:
        pid = stale_owner(name)
        if pid is None or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(parent, name)
        try:
            age = now - os.stat(path).st_mtime
            if age < STALE_AGE_S:
                next_look = min(next_look, clock + STALE_AGE_S - age + 0.1)
                continue
            os.rmdir(path)
            log.info("removed %s, left by a supervisor that is gone", path)
        except OSError:
            pass
    _next_reap[parent] = next_look


def _prepare_v2_parent(facts: CgroupFacts, controllers: frozenset) -> str:
    """Enable `controllers` for the children of our cgroup, moving this process into
    a leaf first (no internal processes: a cgroup that distributes memory, pids or
    cpu to children may hold no process itself, the root cgroup excepted).

    The supervisor's leaf outlives this process: it cannot move back once the
    controllers are enabled. The next sbx in this cgroup removes such empty leaves
    of supervisors that are gone; a systemd scope removes them with itself."""
    base = facts.v2_dir
    assert base is not None
    _reap_stale_groups(base)
    subtree = os.path.join(base, "cgroup.subtree_control")
    enabled = set(_read(subtree).split())
    if controllers <= enabled:
        return base
    moved_to = None
    if not facts.v2_is_root and _read_procs(os.path.join(base, "cgroup.procs")):
        moved_to = os.path.join(base, f"{SUPERVISOR_LEAF_PREFIX}{os.getpid()}")
        os.makedirs(moved_to, exist_ok=True)
        _write(os.path.join(moved_to, "cgroup.procs"), "0")
        log.info("moved the supervisor into %s (no internal processes)", moved_to)
    text = " ".join(f"+{c}" for c in sorted(controllers - enabled))
    try:
        _write(subtree, text, "")
    except SandboxError as e:
        err = e.__cause__.errno if isinstance(e.__cause__, OSError) else 0
        if moved_to:
            _move_back(base, moved_to)
        procs = _read_procs(os.path.join(base, "cgroup.procs"))
        others = [pid for pid in procs if pid != os.getpid()]
        detail = _explain_v2_errno(err, base)
        if err == errno.EBUSY and others:
            detail = f"{base} holds other processes ({others[:5]}); {detail}"
        raise SandboxError(f"{e}; {detail}" if detail else str(e)) from e
    return base


def _move_back(base: str, leaf: str) -> None:
    try:
        _write(os.path.join(base, "cgroup.procs"), "0")
        os.rmdir(leaf)
    except (SandboxError, OSError) as e:
        log.warning("could not undo the move into %s: %s", leaf, e)


def _open_cgroup2(plan: MechanismPlan, facts: CgroupFacts, limits, run_id: str):
    parent = _prepare_v2_parent(facts, plan.controllers)
    leaf = os.path.join(parent, leaf_name(run_id, os.getpid()))
    _mkdir(leaf, lambda err: _explain_v2_errno(err, parent))
    no_swap_limit = False
    try:
        for name, text in v2_writes(limits, plan.controllers):
            path = os.path.join(leaf, name)
            if name == "memory.swap.max" and not os.path.exists(path):
                no_swap_limit = True  # the kernel has no swap accounting
                continue
            _write(path, text, _explain_v2_errno(errno.ENOENT, parent))
        run = Cgroup2Run(plan, leaf)
    except BaseException:
        os.rmdir(leaf)
        raise
    if no_swap_limit and facts.swap_active:
        run.warnings.append(
            "memory limit: this kernel has no memory.swap.max, so the run may swap "
            "beyond its memory limit"
        )
    log.info("run cgroup %s (cgroup v2: %s)", leaf, " ".join(sorted(plan.controllers)))
    return run


def _mkdir(path: str, explain=None) -> None:
    """mkdir a cgroup; `explain(errno)` turns a misleading errno into a hint."""
    log.debug("mkdir %s", path)
    try:
        os.mkdir(path)
    except OSError as e:
        hint = explain(e.errno) if explain else ""
        raise kernel_error(f"mkdir {path}", e.errno, hint) from e


def _open_cgroup1(plan: MechanismPlan, facts: CgroupFacts, limits, run_id: str):
    dirs: dict[str, str] = {}
    created: list[str] = []
    writes = v1_writes(limits, plan.controllers)
    try:
        for controller in sorted(plan.controllers):
            parent = facts.v1_dirs[controller]
            leaf = os.path.join(parent, leaf_name(run_id, os.getpid()))
            if leaf not in created:
                _reap_stale_groups(parent)
                _mkdir(leaf)
                created.append(leaf)
            dirs[controller] = leaf
            for name, text in writes.get(controller, []):
                path = os.path.join(leaf, name)
                if name.startswith("memory.memsw.") and not os.path.exists(path):
                    continue  # swap accounting off; warned about in the plan
                _write(path, text)
        run = Cgroup1Run(plan, dirs)
    except BaseException:
        for leaf in reversed(created):
            os.rmdir(leaf)
        raise
    log.info("run cgroups (cgroup v1): %s", " ".join(created))
    return run


def open_run_cgroup(
    limits: Limits,
    run_id: str,
    require_cgroup: bool,
    facts: CgroupFacts | None = None,
    said: set | None = None,
) -> RunCgroup:
    """Create the run's cgroup with the best mechanism this host offers, or return
    the rlimit fallback (every weakened limit logged as a WARNING, and recorded in
    the run's warnings). facts: what read_facts() returned, for a caller that runs
    many sandboxes in a row; said: the warnings it has logged already, not logged
    again (they are the same on every run).

    Raises SandboxError when `require_cgroup` cannot be met, or when a cgroup this
    process was able to create cannot be set up.
    """
    if facts is None:
        facts = read_facts()
    plan = plan_mechanisms(facts, limits, require_cgroup)
    if plan.backend == "cgroup2" and plan.refusal is None:
        try:
            return _finish(_open_cgroup2(plan, facts, limits, run_id), said)
        except SandboxError as e:
            log.info("cgroup v2 cannot be used: %s", e)
            plan = plan_mechanisms(facts, limits, require_cgroup, v2_failure=str(e))
    if plan.refusal:
        raise SandboxError(plan.refusal)
    if plan.backend == "cgroup1":
        return _finish(_open_cgroup1(plan, facts, limits, run_id), said)
    for reason in plan.no_cgroup_reasons:
        log.info("no cgroup: %s", reason)
    return _finish(RunCgroup(plan), said)


def _finish(run: RunCgroup, said: set | None = None) -> RunCgroup:
    for warning in run.warnings:
        if said is None or warning not in said:
            log.warning("%s", warning)
            if said is not None:
                said.add(warning)
    return run


# --- systemd delegation ------------------------------------------------------------


def systemd_scope_command(
    argv: list[str], environ: dict | None = None
) -> list[str] | None:
    """The command that re-runs `argv` in a fresh systemd user scope with a delegated
    cgroup v2 subtree, or None when that cannot help here.

    Used by the CLI before the run starts: when systemd runs this host, the cgroup v2
    hierarchy has the memory controller, and our cgroup is not delegated. The
    re-executed sbx finds `SBX_DELEGATED_SCOPE=1` and does not try again.
    """
    environ = os.environ if environ is None else environ
    if environ.get(SCOPE_ENV) or not os.path.isdir("/run/systemd/system"):
        return None
    import shutil

    systemd_run = shutil.which("systemd-run")
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "")
    has_bus = environ.get("DBUS_SESSION_BUS_ADDRESS") or os.path.exists(
        os.path.join(runtime_dir, "bus")
    )
    if not systemd_run or not has_bus:
        return None
    facts = read_facts()
    if facts.v2_writable and facts.v2_controllers & set(LIMIT_CONTROLLERS):
        return None  # already delegated
    v2 = find_cgroup2_mount(parse_mountinfo(_read("/proc/self/mountinfo")))
    try:
        root_controllers = _read(os.path.join(v2.mount_point, "cgroup.controllers"))
    except (OSError, AttributeError):
        return None
    if "memory" not in root_controllers.split():
        return None  # a scope would be delegated, but without the controllers
    scope = [systemd_run, "--user", "--scope", "--quiet", "-p", "Delegate=yes"]
    # A scope runs its command as systemd-run's own child, with our environment.
    return [*scope, "--", "env", f"{SCOPE_ENV}=1", *argv]
