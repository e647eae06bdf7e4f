"""Resource use of running instances, read from their cgroup, else from /proc.

With a cgroup (v2 leaf or v1 groups) the kernel's own counters are read: CPU time,
memory in use (less the inactive page cache, as `docker stats` counts it), tasks and
their limits. Without one (the rlimit fallback), the instance is its init and every
descendant of it: CPU time from /proc/PID/stat (see kernel/procstat.py), memory as
the sum of each process's proportional set size (shared pages split between their
users, so a page shared by init and the payload is not counted twice), tasks as
their threads. I/O is the sum of /proc/PID/io's storage bytes over the processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ..kernel import procstat
from . import store

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
V1_UNLIMITED = 1 << 62
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    at_s: float  # time.monotonic() when taken
    cpu_s: float | None
    memory_bytes: int | None
    memory_limit_bytes: int | None
    memory_mechanism: str
    tasks: int | None
    tasks_limit: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    source: str  # cgroup2, cgroup1 or proc


@dataclass
class Stats:
    name: str
    state: str
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    memory_limit_mechanism: str = "none"
    memory_percent: float | None = None
    tasks: int | None = None
    tasks_limit: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def sample(run: dict) -> Sample:
    """One reading of a running instance's counters."""
    cgroup = run.get("cgroup") or {}
    dirs = cgroup.get("dirs") or {}
    procs = _instance_pids(run, dirs)
    if "unified" in dirs:
        found = _read_v2(dirs["unified"])
        source = "cgroup2"
    elif dirs:
        found = _read_v1(dirs)
        source = "cgroup1"
    else:
        found, source = {}, "proc"
    io_read, io_write = _io_bytes(procs)
    init_pid = run["init"]["pid"]
    limit, mechanism = found.get("memory_limit"), source
    if limit is None:
        # No limit in a cgroup: the plan's, as enforced (rlimit), or none.
        limit = run.get("memory_max_bytes")
        mechanism = (run.get("mechanisms") or {}).get("memory", "none")
    return Sample(
        at_s=time.monotonic(),
        cpu_s=_first(found.get("cpu_s"), lambda: procstat.tree_cpu_s(init_pid)),
        memory_bytes=_first(found.get("memory"), lambda: _pss_bytes(procs)),
        memory_limit_bytes=limit,
        memory_mechanism=mechanism,
        tasks=_first(found.get("tasks"), lambda: _threads(procs)),
        tasks_limit=_first(found.get("tasks_limit"), lambda: run.get("pids_max")),
        io_read_bytes=io_read,
        io_write_bytes=io_write,
        source=source,
    )


def _first(value, fallback):
    return value if value is not None else fallback()


def compare(name: str, before: Sample, after: Sample) -> Stats:
    """Stats over the interval between two samples of the same run."""
    cpu_percent = None
    elapsed_s = after.at_s - before.at_s
    if before.cpu_s is not None and after.cpu_s is not None and elapsed_s > 0:
        cpu_percent = round(max(0.0, after.cpu_s - before.cpu_s) / elapsed_s * 100, 2)
    memory_percent = None
    if after.memory_bytes is not None and after.memory_limit_bytes:
        memory_percent = round(after.memory_bytes / after.memory_limit_bytes * 100, 2)
    return Stats(
        name=name,
        state="running",
        cpu_percent=cpu_percent,
        memory_bytes=after.memory_bytes,
        memory_limit_bytes=after.memory_limit_bytes,
        memory_limit_mechanism=after.memory_mechanism,
        memory_percent=memory_percent,
        tasks=after.tasks,
        tasks_limit=after.tasks_limit,
        io_read_bytes=after.io_read_bytes,
        io_write_bytes=after.io_write_bytes,
        source=after.source,
    )


# --- cgroup counters ---------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # "max"


def _keyed(path: str) -> dict[str, int]:
    out = {}
    for line in (_read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _read_v2(leaf: str) -> dict:
    found: dict = {}
    usage_usec = _keyed(os.path.join(leaf, "cpu.stat")).get("usage_usec")
    if usage_usec is not None:
        found["cpu_s"] = usage_usec / 1e6
    current = _read_int(os.path.join(leaf, "memory.current"))
    if current is not None:
        inactive = _keyed(os.path.join(leaf, "memory.stat")).get("inactive_file", 0)
        found["memory"] = max(0, current - inactive)
        found["memory_limit"] = _read_int(os.path.join(leaf, "memory.max"))
    found["tasks"] = _read_int(os.path.join(leaf, "pids.current"))
    found["tasks_limit"] = _read_int(os.path.join(leaf, "pids.max"))
    return found


def _read_v1(dirs: dict) -> dict:
    found: dict = {}
    if "cpuacct" in dirs:
        usage_ns = _read_int(os.path.join(dirs["cpuacct"], "cpuacct.usage"))
        if usage_ns is not None:
            found["cpu_s"] = usage_ns / 1e9
    if "memory" in dirs:
        usage = _read_int(os.path.join(dirs["memory"], "memory.usage_in_bytes"))
        if usage is not None:
            memory_stat = _keyed(os.path.join(dirs["memory"], "memory.stat"))
            found["memory"] = max(0, usage - memory_stat.get("total_inactive_file", 0))
            limit = _read_int(os.path.join(dirs["memory"], "memory.limit_in_bytes"))
            found["memory_limit"] = limit if limit and limit < V1_UNLIMITED else None
    if "pids" in dirs:
        found["tasks"] = _read_int(os.path.join(dirs["pids"], "pids.current"))
        found["tasks_limit"] = _read_int(os.path.join(dirs["pids"], "pids.max"))
    return found


# --- /proc counters ----------------------------------------------------------------


def _instance_pids(run: dict, dirs: dict) -> list[int]:
    """The instance's processes: its cgroup's, else init and its descendants."""
    for directory in dict.fromkeys(dirs.values()):
        text = _read_text(os.path.join(directory, "cgroup.procs"))
        if text is not None:
            return [int(p) for p in text.split()]
    init_pid = run["init"]["pid"]
    if not store.is_alive(run["init"]):
        return []
    pids, stack = [], [init_pid]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += procstat.children(pid)
    return pids


def _pss_bytes(pids: list[int]) -> int | None:
    total, seen = 0, False
    for pid in pids:
        rollup = _read_text(f"/proc/{pid}/smaps_rollup")
        kib = None
        for line in (rollup or "").splitlines():
            if line.startswith("Pss:"):
                kib = int(line.split()[1])
                break
        if kib is None:
            # RSS, when smaps_rollup is not ours to read
            statm = _read_text(f"/proc/{pid}/statm")
            if statm is None:
                continue
            total += int(statm.split()[1]) * PAGE_BYTES
        else:
            total += kib * 1024
        seen = True
    return total if seen else None


def _threads(pids: list[int]) -> int | None:
    count = 0
    for pid in pids:
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count if pids else None


def _io_bytes(pids: list[int]) -> tuple[int | None, int | None]:
    read = write = 0
    readable = False
    for pid in pids:
        counters = {}
        for line in (_read_text(f"/proc/{pid}/io") or "").splitlines():
            key, _, value = line.partition(":")
            counters[key] = int(value)
        if counters:
            readable = True
            read += counters.get("read_bytes", 0)
            write += counters.get("write_bytes", 0)
    return (read, write) if readable else (None, None)
