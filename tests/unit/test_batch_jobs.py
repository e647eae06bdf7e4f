"""sbx batch's pure parts: reading jobs, per-job plans, the results file's repair."""

from __future__ import annotations

import json
import os

import pytest

from sandbox import batch
from sandbox.record import replace
from sandbox.errors import UsageError
from sandbox.plan import HostLayout, Limits, make_plan


def _job(**fields):
    return batch.parse_job(
        {"id": 1, "command": ["true"], **fields}, "jobs:1", "/base", None
    )


def test_a_minimal_job():
    job = _job()
    assert job.id == "1" and job.command == ("true",)
    assert job.checker == "exact" and job.expected is None and job.stdin is None


def test_files_inline_and_by_path(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    obj = {
        "id": "a",
        "command": ["cat"],
        "files": {"b/c.txt": "hi", "in": {"path": "in.txt"}},
    }
    job = batch.parse_job(obj, "jobs:1", str(tmp_path), None)
    assert job.files == (("b/c.txt", b"hi"), ("in", str(tmp_path / "in.txt")))


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "", "a//b"])
def test_file_names_stay_in_box(name):
    with pytest.raises(UsageError, match="relative path in /box"):
        _job(files={name: "x"})


def test_options_are_frozen_and_checked():
    job = _job(
        limits={"wall": "2s", "memory": "64M"}, options={"env": {"B": 1, "A": "x"}}
    )
    assert job.options == (
        ("env", (("A", "x"), ("B", "1"))),
        ("memory", "64M"),
        ("wall", "2s"),
    )
    hash(job.plan_key)
    with pytest.raises(UsageError, match="option 'stdout' cannot be set per job"):
        _job(options={"stdout": "/tmp/x"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"command": "echo hi"}, "non-empty list of strings"),
        ({"checker": "fuzzy"}, "unknown checker 'fuzzy'"),
        ({"expected": 42}, '"expected" must be a string'),
        ({"tolerance": -1}, '"tolerance" must be a number >= 0'),
        ({"stdin": ["a"]}, '"stdin" must be a string'),
        ({"timeout": 3}, "unknown field 'timeout'"),
        ({"id": ""}, 'needs an "id"'),
    ],
)
def test_bad_jobs_say_which_field(fields, message):
    with pytest.raises(UsageError, match=message):
        _job(**fields)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"id": "a", "command": ["true"]}\n\n{"id": "a", "command": ["x"]}\n'
    )
    with pytest.raises(
        UsageError, match=r"jobs.jsonl:3: id 'a' is also used on line 1"
    ):
        batch.read_jobs(str(path))


def test_job_plan_swaps_command_stdin_and_files(tmp_path):
    layout = HostLayout(
        symlinks={"bin": "usr/bin"}, dirs=frozenset({"usr"}), etc=frozenset()
    )
    base = make_plan(
        {"name": "default"}, {"capture": True}, ["/bin/true"], (0, 0), layout
    )
    (tmp_path / "in.txt").write_bytes(b"from disk")
    job = _job(stdin="in")
    job = replace(
        job, files=(("a/b.py", b"inline"), ("in.txt", str(tmp_path / "in.txt")))
    )
    plan = batch.job_plan(base, job)
    assert plan.argv == ("true",) and plan.stdio.stdin_data == b"in"
    assert plan.files == (("a/b.py", b"inline"), ("in.txt", b"from disk"))
    # The rest of the plan is the base's: /box stays a fresh tmpfs, and the plan can
    # run in the same warm sandbox as the base.
    assert plan.stdio.capture and plan.box_dir is None and plan.mounts == base.mounts
    assert plan.warm_key == base.warm_key is not None
    # No stdin given: an empty pipe, never the caller's terminal.
    assert batch.job_plan(base, _job()).stdio.stdin_data == b""
    assert base.limits == Limits()


def test_results_file_drops_a_cut_line_and_keeps_whole_ones(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(
        b'{"id": "a", "verdict": "OK"}\n{"id": "b", "verdict": "OK"}\n{"id": "c", "ver'
    )
    results = batch.ResultsFile(str(path))
    assert sorted(results.done) == ["a", "b"]
    results.append({"id": "c", "verdict": "WA"})
    results.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]


def test_results_file_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\nworld\n")
    with pytest.raises(
        UsageError, match="notes.txt:1 is not a result line of sbx batch"
    ):
        batch.ResultsFile(str(path))


def test_cpu_shares_deal_cpus_out_in_turn():
    assert batch.cpu_shares(2, [0, 1]) == [{0}, {1}]
    assert batch.cpu_shares(2, {5, 1, 3}) == [{1, 5}, {3}]
    assert batch.cpu_shares(3, range(7)) == [{0, 3, 6}, {1, 4}, {2, 5}]
    # One worker has nothing to share; more workers than CPUs would split a CPU.
    assert batch.cpu_shares(1, [0, 1]) is None
    assert batch.cpu_shares(3, [0, 1]) is None


def test_results_file_may_be_dev_null():
    """A caller that wants only the summary: /dev/null cannot be synced (EINVAL), and
    needs no syncing."""
    results = batch.ResultsFile(os.devnull)
    results.append({"id": "a", "verdict": "OK"})
    results.close()


def test_results_file_that_is_a_device_is_never_read():
    """Only a regular file holds earlier results: reading /dev/zero would not end."""
    results = batch.ResultsFile("/dev/zero")
    assert results.done == {}
    results.close()


def test_results_file_sbx_cannot_write_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match="cannot open the results file .* for writing"):
        batch.ResultsFile(str(tmp_path / "no-such-dir" / "results.jsonl"))


@pytest.mark.parametrize(
    "args",
    [
        ["jobs.jsonl", "--out", "r.jsonl", "--jobs", "2", "--no-pin", "-q"],
        ["jobs.jsonl", "-o", "r.jsonl", "-j", "2", "--no-pin", "--quiet"],
        ["-j2", "-or.jsonl", "jobs.jsonl", "--no-pin", "-q"],
        ["--jobs=2", "--out=r.jsonl", "jobs.jsonl", "--no-pin", "-q"],
    ],
)
def test_the_fast_batch_parser_takes_the_forms_typer_takes(args):
    from sandbox.entry import _batch_args

    assert _batch_args(args) == ("jobs.jsonl", "r.jsonl", 2, None, 4096, True, 0, False)


def test_the_fast_batch_parser_leaves_the_rest_to_typer():
    from sandbox.entry import _batch_args

    assert _batch_args(["jobs.jsonl", "--out", "r", "--help"]) is None
    assert _batch_args(["jobs.jsonl", "--out", "r", "-jx"]) is None
    assert _batch_args(["jobs.jsonl"]) is None  # no --out
