"""`sbx batch` on the real kernel, as root and as the unprivileged test user.

Issue 7, items 4 and 5: an interrupted batch leaves whole result lines and nothing
running, and a rerun completes it exactly once per id; the token checker accepts
spacing the exact checker rejects, and a wrong answer is WA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import host_pids_with

# The v1 hierarchies sbx creates run cgroups in (this host: hybrid, see DESIGN.md).
RUN_CGROUP_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


@pytest.fixture
def workdir(caller):
    """A directory the caller owns, outside pytest's private tmp tree."""
    path = Path(tempfile.mkdtemp(prefix="sbx-batch-test-"))
    (path / "tmp").mkdir()
    for p in (path, path / "tmp"):
        os.chown(p, caller.uid, caller.gid)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _write_jobs(path: Path, jobs: list[dict]) -> None:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    os.chmod(path, 0o644)


def _batch(caller, workdir: Path, *args: str, preexec=None) -> subprocess.Popen:
    """Start `sbx batch` as the caller, with per-job temp dirs under workdir/tmp."""
    command = caller.command(["batch", *args])
    env = {**caller.env(), "TMPDIR": str(workdir / "tmp")}
    return subprocess.Popen(
        command,
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # noqa: PLW1509 (the test process starts no threads)
    )


def _result_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_text()
    assert data == "" or data.endswith("\n"), "the results file ends inside a line"
    return [json.loads(line) for line in data.splitlines()]


class DedicatedCgroups:
    """A fresh cgroup below ours in each v1 hierarchy sbx uses, for the batch process
    to start in: every run cgroup it makes is then below these, and so is every
    process it leaves behind, which makes leftovers countable without confusing
    them with the cgroups of other tests running on this host at the same time."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
        name = f"sbx-batch-test-{uuid.uuid4().hex[:8]}"
        for controller in RUN_CGROUP_CONTROLLERS:
            mount = Path("/sys/fs/cgroup") / controller
            if controller in own and (mount / "cgroup.procs").exists():
                directory = mount / own[controller].lstrip("/") / name
                directory.mkdir()
                self.dirs.append(directory)

    def enter(self) -> None:
        """preexec_fn: move the new process into every dedicated cgroup."""
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text(str(os.getpid()))

    def leftovers(self) -> tuple[list[str], list[int]]:
        """(cgroups below ours, pids in them) that the batch left behind."""
        below, pids = [], set()
        for directory in self.dirs:
            for path, subdirs, _ in os.walk(directory):
                below += [os.path.join(path, d) for d in subdirs]
                procs = (Path(path) / "cgroup.procs").read_text().split()
                pids.update(int(p) for p in procs)
        return below, sorted(pids)

    def remove(self) -> None:
        """Kill what the test started and is still there, then remove the cgroups."""
        for directory in self.dirs:
            for path, _, _ in sorted(os.walk(directory), reverse=True):
                for pid in (Path(path) / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        os.rmdir(path)
                        break
                    except OSError:
                        time.sleep(0.05)


def test_interrupted_batch_resumes_to_exactly_one_line_per_job(caller, workdir):
    """Item 4: SIGINT halfway through 200 jobs, then a rerun."""
    marker = f"sbx-batch-marker-{uuid.uuid4().hex[:8]}"
    jobs = [
        {
            "id": f"job-{n:03d}",
            "command": ["sh", "-c", "sleep 0.05; cat n.txt", f"{marker}-{n}"],
            "files": {"n.txt": f"{n}\n"},
            "expected": f"{n}",
            "checker": "tokens",
            "profile": "strict",
        }
        for n in range(200)
    ]
    jobs_file, out = workdir / "jobs.jsonl", workdir / "results.jsonl"
    _write_jobs(jobs_file, jobs)
    args = (str(jobs_file), "--jobs", "2", "--out", str(out))
    cgroups = DedicatedCgroups()
    try:
        first = _batch(caller, workdir, *args, preexec=cgroups.enter)
        deadline = time.monotonic() + 60
        while len(_lines_so_far(out)) < 100 and first.poll() is None:
            assert time.monotonic() < deadline, "the batch made no progress in 60 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=30)
        assert first.returncode == 130, stderr
        assert "batch interrupted" in stdout

        interrupted = _result_lines(out)
        ids = [entry["id"] for entry in interrupted]
        assert 100 <= len(ids) < 200, "SIGINT came too late to test an interruption"
        assert len(set(ids)) == len(ids)
        # Nothing of the interrupted run remains: processes, cgroups, /box dirs, mounts.
        assert host_pids_with(marker, anywhere=True) == []
        assert cgroups.leftovers() == ([], [])
        assert os.listdir(workdir / "tmp") == []
        assert str(workdir) not in Path("/proc/self/mountinfo").read_text()

        second = _batch(caller, workdir, *args)
        stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 0, _not_ok(out) or stderr
        assert f"{len(ids)} already in the results file" in stdout
    finally:
        cgroups.remove()

    entries = _result_lines(out)
    assert len(entries) == 200
    assert sorted(entry["id"] for entry in entries) == [job["id"] for job in jobs]
    assert {entry["verdict"] for entry in entries} == {"OK"}
    assert os.listdir(workdir / "tmp") == []


def _not_ok(out: Path) -> str:
    """The result lines that are not OK, to explain a failed assertion."""
    return "\n".join(
        json.dumps(entry) for entry in _result_lines(out) if entry["verdict"] != "OK"
    )


def _lines_so_far(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        return []


def test_checkers_tell_spacing_from_wrong_answers(caller, workdir):
    """Item 5: extra spaces pass the token checker and fail exact; wrong is WA."""
    program = (
        "import sys; a, b = map(int, sys.stdin.read().split()); print(f' {a + b}  ')"
    )
    base = {"command": ["python3", "sum.py"], "files": {"sum.py": program}}
    jobs = [
        {
            **base,
            "id": "tokens",
            "stdin": "40 2",
            "expected": "42\n",
            "checker": "tokens",
        },
        {
            **base,
            "id": "exact",
            "stdin": "40 2",
            "expected": "42\n",
            "checker": "exact",
        },
        {
            **base,
            "id": "wrong",
            "stdin": "40 1",
            "expected": "42\n",
            "checker": "tokens",
        },
        {
            **base,
            "id": "numbers",
            "stdin": "40 2",
            "expected": "42.0000001",
            "checker": "numbers",
            "tolerance": 1e-6,
        },
        {
            "id": "crash",
            "command": ["python3", "-c", "raise SystemExit(3)"],
            "expected": "42",
            "checker": "tokens",
        },
    ]
    jobs_file, out = workdir / "jobs.jsonl", workdir / "results.jsonl"
    _write_jobs(jobs_file, jobs)
    done = _batch(caller, workdir, str(jobs_file), "--jobs", "2", "--out", str(out))
    stdout, stderr = done.communicate(timeout=60)
    assert done.returncode == 1, stderr

    by_id = {entry["id"]: entry for entry in _result_lines(out)}
    assert {e["verdict"] for e in by_id.values()} <= {"OK", "WA", "RE"}, _not_ok(out)
    assert by_id["tokens"]["verdict"] == "OK"
    assert by_id["tokens"]["check"] == {
        "checker": "tokens",
        "passed": True,
        "detail": "",
    }
    assert by_id["tokens"]["stdout"] == " 42  \n"
    assert by_id["exact"]["verdict"] == "WA"
    assert by_id["exact"]["check"]["detail"].startswith("byte 0: got b' 42  \\n'")
    assert by_id["wrong"]["verdict"] == "WA"
    assert by_id["wrong"]["check"]["detail"] == "token 1: got '41', expected '42'"
    assert by_id["numbers"]["verdict"] == "OK"
    # A run that failed on its own keeps its verdict; the checker is not consulted.
    assert by_id["crash"]["verdict"] == "RE" and by_id["crash"]["exit_code"] == 3
    assert by_id["crash"]["check"] is None
    assert "WA           2" in stdout
    assert os.listdir(workdir / "tmp") == []


CPUS = sorted(os.sched_getaffinity(0))
# Each job names the CPUs it may run on, and sleeps long enough that every worker
# takes a job before the queue runs dry.
WHERE_AM_I = (
    "import os, time; time.sleep(0.3); "
    "print(','.join(map(str, sorted(os.sched_getaffinity(0)))))"
)


def _affinity_jobs(count: int, **extra) -> list[dict]:
    return [
        {"id": f"j{n}", "command": ["python3", "-c", WHERE_AM_I], **extra}
        for n in range(count)
    ]


def _run_affinity_batch(caller, workdir: Path, jobs: list[dict], *args: str) -> dict:
    jobs_file, out = workdir / "jobs.jsonl", workdir / "results.jsonl"
    _write_jobs(jobs_file, jobs)
    done = _batch(caller, workdir, str(jobs_file), "--out", str(out), *args)
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr + _not_ok(out)
    return {"summary": stdout, "entries": _result_lines(out)}


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs at least two usable CPUs")
def test_workers_are_pinned_to_cpus_of_their_own(caller, workdir):
    """With as many CPUs as workers or more, each worker's sandboxes run on a share of
    the CPUs no other worker uses; the payload itself sees that share, and the result
    line says which it was."""
    done = _run_affinity_batch(
        caller, workdir, _affinity_jobs(6), "--jobs", str(len(CPUS))
    )
    seen = set()
    for entry in done["entries"]:
        shown = [int(c) for c in entry["stdout"].strip().split(",")]
        assert shown == entry["cpus_pinned"], entry
        assert len(shown) == 1
        seen.add(shown[0])
    # Every worker took a job (each sleeps), and no two workers shared a CPU.
    assert seen == set(CPUS), done["entries"]
    assert "one share per worker" in done["summary"]


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs at least two usable CPUs")
def test_no_pin_and_jobs_wanting_more_cpus_are_not_pinned(caller, workdir):
    """--no-pin leaves every job every CPU; so does a job whose CPU quota is more than
    a worker's share (pinning would lower its limit without a word)."""
    everything = ",".join(map(str, CPUS))
    unpinned = _run_affinity_batch(
        caller, workdir, _affinity_jobs(2), "--jobs", "2", "--no-pin"
    )
    (workdir / "results.jsonl").unlink()
    wanting = _run_affinity_batch(
        caller, workdir, _affinity_jobs(2, limits={"cpus": 2}), "--jobs", "2"
    )
    for done in (unpinned, wanting):
        for entry in done["entries"]:
            assert entry["stdout"].strip() == everything, entry
            assert entry["cpus_pinned"] is None
        assert "one share per worker" not in done["summary"]


def test_a_results_file_that_cannot_be_written_stops_the_batch_cleanly(caller, workdir):
    """/dev/full takes no line (ENOSPC): the batch stops as on Ctrl-C, says why in one
    line, and leaves no sandbox behind; a bad --jobs leaves no file behind."""
    mark = f"sbx-full-{uuid.uuid4().hex[:8]}"
    command = ["sh", "-c", "sleep 0.2", mark]
    jobs_file = workdir / "jobs.jsonl"
    _write_jobs(jobs_file, [{"id": n, "command": command} for n in range(6)])
    done = _batch(caller, workdir, str(jobs_file), "--jobs", "2", "--out", "/dev/full")
    stdout, stderr = done.communicate(timeout=60)
    assert done.returncode == 125, stderr
    assert "sbx: error: cannot write the results file '/dev/full'" in stderr
    assert "Traceback" not in stderr
    assert host_pids_with(mark) == []

    out = workdir / "never.jsonl"
    done = _batch(caller, workdir, str(jobs_file), "--jobs", "0", "--out", str(out))
    _, stderr = done.communicate(timeout=60)
    assert done.returncode == 2 and "--jobs 0" in stderr
    assert not out.exists()
