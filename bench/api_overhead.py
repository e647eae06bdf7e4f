"""Per-run cost of `/bin/true` through sbx's Python API with the full `strict` sandbox,
against bubblewrap and a bare run measured in the same run.

    python bench/api_overhead.py [--runs N] [--rounds R] [--cprofile N]

Started as root, it measures as the unprivileged user `sbxtest` (as overhead.py does;
--user NAME, or --as-root). Measured, in rounds that alternate between the tools so a busy machine weighs on
each alike:
  bare      /bin/true, by hyperfine --shell=none
  bwrap     bwrap --unshare-all with a read-only /usr (and the host's /bin, /lib...
            symlinks or binds), a fresh /proc and /dev, by hyperfine --shell=none
  api       sandbox.api.run(["/bin/true"], profile="strict") in this warm process:
            a one-shot call, which builds its sandbox from scratch (cold)
  runner    sandbox.api.Runner(profile="strict").run(["/bin/true"]): what a pipeline
            that runs many programs uses; each run gets fresh namespaces from a warm
            sandbox (sandbox/warm.py), as `sbx batch` does
The API's overhead is the Runner's time minus bare; the target is met when it is at most
bwrap's per-run time. Reported: the median of each round, and the spread over rounds.

--cprofile N profiles N runs of a Runner and prints where the time goes per run;
--phases N times each step of N cold runs as the supervisor sees it (children
included); --child-steps N times the steps inside a cold run's own processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from overhead import bwrap_command

from sandbox import api, supervisor

# sbx logs a WARNING per run for each limit this host enforces weakly (no cgroup for
# an unprivileged caller here); with no handler set, Python would print every one.
logging.getLogger("sandbox").setLevel(logging.ERROR)


def bwrap_argv(command: list[str]) -> list[str]:
    """overhead.py's bubblewrap peer (every namespace, a read-only /usr and the /usr
    family as on the host, a fresh /proc and /dev), running `command`."""
    base = bwrap_command()
    if base is None:
        raise SystemExit("bwrap is not installed (Debian package bubblewrap)")
    return base[:-1] + command


def hyperfine_median_s(argv: list[str], runs: int, warmup: int = 10) -> float:
    """The median wall time of argv, run by hyperfine without a shell."""
    with tempfile.NamedTemporaryFile(suffix=".json") as export:
        subprocess.run(
            ["hyperfine", "--shell=none", "--style", "none", "--warmup", str(warmup)]
            + ["--runs", str(runs), "--export-json", export.name, shlex.join(argv)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.load(open(export.name))["results"][0]["median"]


def api_times_s(runs: int, warm: bool, warmup: int = 10) -> list[float]:
    """Wall time of each of `runs` API runs of /bin/true under `strict`: one-shot
    run() calls (each builds its sandbox from scratch), or runs of one Runner."""
    times = []
    with api.Runner(profile="strict") as runner:
        for n in range(warmup + runs):
            started = time.perf_counter()
            if warm:
                result = runner.run(["/bin/true"])
            else:
                result = api.run(["/bin/true"], "strict")
            elapsed = time.perf_counter() - started
            if result.verdict != "OK":
                raise SystemExit(f"/bin/true under strict gave {result.verdict}: {result}")
            if n >= warmup:
                times.append(elapsed)
    return times


def measure(runs: int, rounds: int) -> dict[str, list[float]]:
    """Median seconds per run of each tool, one value per round."""
    rows: dict[str, list[float]] = {"bare": [], "bwrap": [], "api": [], "runner": []}
    for _ in range(rounds):
        rows["bare"].append(hyperfine_median_s(["/bin/true"], runs))
        rows["bwrap"].append(hyperfine_median_s(bwrap_argv(["/bin/true"]), runs))
        rows["api"].append(statistics.median(api_times_s(runs, warm=False)))
        rows["runner"].append(statistics.median(api_times_s(runs, warm=True)))
    return rows


def report(rows: dict[str, list[float]]) -> bool:
    """Print the table; True when the target holds for the median over rounds."""
    med = {name: statistics.median(values) for name, values in rows.items()}
    labels = {
        "bare": "/bin/true, bare",
        "bwrap": "bwrap --unshare-all, ro /usr",
        "api": "sbx api.run(), strict (cold)",
        "runner": "sbx api.Runner.run(), strict",
    }
    print(f"uid {os.getuid()}, {len(rows['bare'])} rounds; ms per run (median, spread)")
    print(f"{'':32} {'median':>8} {'min':>8} {'max':>8} {'/bwrap':>7}")
    for name, values in rows.items():
        ms = [v * 1000 for v in values]
        ratio = med[name] / med["bwrap"]
        print(
            f"{labels[name]:32} {statistics.median(ms):8.2f} {min(ms):8.2f} "
            f"{max(ms):8.2f} {ratio:6.2f}x"
        )
    overhead = med["runner"] - med["bare"]
    holds = overhead <= med["bwrap"]
    print(
        f"API overhead (Runner - bare): {overhead * 1000:.2f} ms = "
        f"{overhead / med['bwrap']:.2f}x bwrap's per-run time; "
        f"target, at most bwrap's per-run time: {'met' if holds else 'not met'}"
    )
    return holds


def profile_runs(count: int) -> None:
    """Where the time of a Runner's run goes, per run, in the calling process."""
    import cProfile
    import pstats

    with api.Runner(profile="strict") as runner:
        for _ in range(5):
            runner.run(["/bin/true"])
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(count):
            runner.run(["/bin/true"])
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    print(f"\ncProfile of {count} API runs: {total / count * 1000:.2f} ms per run in")
    print("this process (children's time is seen only as waits). By own time:")
    stats.sort_stats("tottime")
    width = 70
    for func, (cc, nc, tt, ct, callers) in sorted(
        stats.stats.items(), key=lambda item: item[1][2], reverse=True
    )[:20]:
        where = f"{Path(func[0]).name}:{func[1]}({func[2]})"
        print(
            f"  {tt / count * 1000:7.3f} ms own {ct / count * 1000:7.3f} ms cum "
            f"{nc / count:6.1f} calls  {where[:width]}"
        )


def phase_breakdown(count: int) -> None:
    """Where an API run's wall time goes, step by step, seen from the supervisor:
    its own steps are timed by wrapping them; a wait on the sandbox ("U": stage 1
    has unshared; "P": stage 2 forked; watch: the root built, the payload run and
    reaped) is the children's time."""
    from collections import defaultdict

    from sandbox.kernel import cgroups

    totals: dict[str, float] = defaultdict(float)

    def timed(module, name: str, label) -> None:
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                key = label(*args) if callable(label) else label
                totals[key] += time.perf_counter() - started

        setattr(module, name, wrapper)

    timed(api, "plan_for", "plan_for (profile, options)")
    timed(cgroups, "open_run_cgroup", "cgroup: create and configure")
    timed(supervisor, "_prepare", "seccomp filter + rlimits")
    timed(supervisor, "_open_channels", "pipes and fds")
    timed(supervisor, "_expect", lambda r, kind: f"wait for the sandbox: {kind}")
    timed(supervisor, "write_id_maps", "write id maps")
    timed(supervisor, "_watch", "watch: root, payload, exit")
    timed(supervisor, "_teardown", "teardown: kill, reap, drain")
    timed(supervisor, "_report", "report")
    timed(supervisor, "_close_fds", "close fds")
    close_time = [0.0]
    original_open = cgroups.open_run_cgroup

    def open_and_time_close(*args, **kwargs):
        cgroup = original_open(*args, **kwargs)
        close = cgroup.close

        def timed_close() -> None:
            started = time.perf_counter()
            close()
            close_time[0] += time.perf_counter() - started

        cgroup.close = timed_close
        return cgroup

    cgroups.open_run_cgroup = open_and_time_close
    api.run(["/bin/true"], "strict")
    totals.clear()
    close_time[0] = 0.0
    started = time.perf_counter()
    for _ in range(count):
        api.run(["/bin/true"], "strict")
    wall = time.perf_counter() - started
    totals["cgroup: remove"] = close_time[0]
    print(f"\nsteps of an API run, mean of {count} (ms per run):")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {seconds / count * 1000:7.2f}  {label}")
    rest = wall - sum(totals.values())
    print(f"  {rest / count * 1000:7.2f}  everything else")
    print(f"  {wall / count * 1000:7.2f}  in all")


CHILD_STEPS = (
    (
        "stage 1: join the run's cgroups",
        "cgroups",
        ("Cgroup1Run", "Cgroup2Run"),
        "join_self",
    ),
    ("stage 1: root caller's staging + drop ids", "child", None, "_leave_root"),
    ("stage 1/3: unshare (all namespaces)", "libc", None, "unshare"),
    ("stage 1: loopback up", "net", None, "loopback_up"),
    ("stage 2: build the root (mounts)", "mounts", None, "build_root"),
    ("stage 2: pivot_root and detach", "mounts", None, "enter_root"),
    ("stage 3: stdio", "child", None, "_set_stdio"),
    ("stage 3: rlimits", "child", None, "_set_rlimits"),
    ("stage 3: ids", "child", None, "_set_ids"),
    ("stage 3: close other fds", "child", None, "_close_other_fds"),
    ("stage 3: drop capabilities", "libc", None, "drop_all_capabilities"),
    ("stage 3: install seccomp", "child", None, "_install_seccomp"),
)


def child_steps(count: int) -> None:
    """Time the sandbox side's steps (in the forked stages) through a shared
    anonymous mapping: each wrapped step adds its duration to its own slot."""
    import mmap
    import struct

    from sandbox import child
    from sandbox.kernel import cgroups, libc, mounts, net

    modules = {"cgroups": cgroups, "child": child, "libc": libc, "mounts": mounts}
    modules["net"] = net
    shared = mmap.mmap(-1, 8 * (len(CHILD_STEPS) + 1))

    def wrap(owner, name: str, slot: int) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                (total,) = struct.unpack_from("d", shared, 8 * slot)
                elapsed = time.perf_counter() - started
                struct.pack_into("d", shared, 8 * slot, total + elapsed)

        setattr(owner, name, wrapper)

    for slot, (_, module, classes, name) in enumerate(CHILD_STEPS):
        owners = [getattr(modules[module], c) for c in classes or ()]
        for owner in owners or [modules[module]]:
            if hasattr(owner, name):
                wrap(owner, name, slot)
    supervisor.run(api.plan_for(["/bin/true"], "strict"))
    shared[:] = bytes(len(shared))
    plan = api.plan_for(["/bin/true"], "strict")
    started = time.perf_counter()
    for _ in range(count):
        supervisor.run(plan)
    wall = time.perf_counter() - started
    print(f"\nsandbox-side steps, mean of {count} runs (ms per run):")
    for slot, (label, *_) in enumerate(CHILD_STEPS):
        (total,) = struct.unpack_from("d", shared, 8 * slot)
        print(f"  {total / count * 1000:7.2f}  {label}")
    print(f"  {wall / count * 1000:7.2f}  the whole run (plan reused)")


def add_user_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user", default="sbxtest", help="who to measure as when started as root"
    )
    parser.add_argument(
        "--as-root", action="store_true", help="started as root, measure as root"
    )


def measure_as(args: argparse.Namespace) -> None:
    """As overhead.py does: started as root, run again as the unprivileged user
    (rootless is the point), unless --as-root."""
    if os.geteuid() != 0 or args.as_root:
        return
    import pwd

    entry = pwd.getpwnam(args.user)
    command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}"]
    command += ["--init-groups", "env", f"HOME={entry.pw_dir}", f"USER={args.user}"]
    command += [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:]]
    sys.exit(subprocess.run(command, cwd="/", check=False).returncode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per tool per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--phases", type=int, default=0, metavar="N")
    parser.add_argument("--child-steps", type=int, default=0, metavar="N")
    parser.add_argument(
        "--skip-peers", action="store_true", help="only --cprofile/--phases"
    )
    add_user_options(parser)
    args = parser.parse_args()
    measure_as(args)
    holds = True
    if not args.skip_peers:
        holds = report(measure(args.runs, args.rounds))
    if args.cprofile:
        profile_runs(args.cprofile)
    if args.phases:
        phase_breakdown(args.phases)
    if args.child_steps:
        child_steps(args.child_steps)
    return 0 if holds else 1


if __name__ == "__main__":
    raise SystemExit(main())
