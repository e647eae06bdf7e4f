"""CPU time of a whole run read from /proc, for hosts where no cgroup counts it.

The run is the sandbox init and all its descendants. A process's /proc/PID/stat holds
its own user and system time (all its threads, live and exited) and, in cutime/cstime,
the time of the children it has reaped. Summing utime+stime+cutime+cstime over the live
tree (and only cutime+cstime for init itself, whose own time is sbx's) counts every
process once. Children that were never waited for (SIGCHLD ignored) are lost: the
per-process RLIMIT_CPU backstop bounds each of them.
"""

from __future__ import annotations

import os

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name: element 0 is field 3 of proc(5) (the
    state), element n field n + 3. None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def _stat_times(pid: int) -> tuple[int, int, int, int] | None:
    """(utime, stime, cutime, cstime) ticks of one process, or None if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    # Fields 14-17 of proc(5).
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime, stime, cutime, cstime


def children(pid: int) -> list[int]:
    """The pids of pid's children, over all its threads (/proc/PID/task/*/children)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def tree_times(init_pid: int) -> tuple[float, float]:
    """(user, system) seconds used by every process below init_pid, plus what init
    reaped; init's own time (sbx's) is left out."""
    root = _stat_times(init_pid)
    if root is None:
        return 0.0, 0.0
    user, system = root[2], root[3]
    stack = children(init_pid)
    while stack:
        pid = stack.pop()
        times = _stat_times(pid)
        if times is not None:
            user += times[0] + times[2]
            system += times[1] + times[3]
            stack += children(pid)
    return user * _TICK_S, system * _TICK_S


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM, the peak resident set of one live process (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_peak_rss_bytes(init_pid: int) -> int:
    """The largest peak resident set among the live processes below init_pid."""
    peak = 0
    stack = children(init_pid)
    while stack:
        pid = stack.pop()
        peak = max(peak, _peak_rss_bytes(pid))
        stack += children(pid)
    return peak


def tree_cpu_s(init_pid: int) -> float:
    """Seconds of CPU used by every process below init_pid, plus what init reaped."""
    return sum(tree_times(init_pid))
