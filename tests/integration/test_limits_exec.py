"""Resource limits through `sbx exec` on this host, as root (cgroup v1 memory, pids,
cpu) and as the unprivileged user (rlimit fallbacks, each with a warning): memory,
tasks, output, and refusing to run without a cgroup when asked. The delegated cgroup v2
path runs the same checks in a VM (tests/vm/test_vm_sbx_limits.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import host_pids_with

# Allocates and touches 200 MB, one page at a time.
HOG = (
    "b = bytearray(200 << 20)\n"
    "for i in range(0, len(b), 4096):\n"
    "    b[i] = 1\n"
    "print('survived')\n"
)


def run_json(caller, *args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, dict]:
    done = caller.run(["exec", "--json", *args], timeout=timeout)
    return done, json.loads(done.stdout)


def test_memory_limit(caller):
    done, res = run_json(caller, "--memory", "64M", "--", "python3", "-c", HOG)
    mechanism = res["limits"]["memory_max_bytes"]["mechanism"]
    assert "survived" not in res["stdout"]
    if caller.uid == 0:
        # The run's cgroup saw the OOM kill: MLE whatever signal followed.
        assert (res["verdict"], res["reason"], mechanism) == ("MLE", "memory", "cgroup1")
        assert res["oom_killed"] is True and done.returncode == 137
        assert 48 << 20 <= res["peak_memory_bytes"] <= 64 << 20
    else:
        # No cgroup for this user here: RLIMIT_DATA makes the allocation fail.
        assert (res["verdict"], mechanism) == ("RE", "rlimit")
        assert "MemoryError" in res["stderr"]
        assert any("RLIMIT_DATA" in w for w in res["warnings"])
        assert "WARNING" in done.stderr


FORK_BOMB = (
    "import os, time\n"
    "while True:\n"
    "    try:\n"
    "        os.fork()\n"
    "    except OSError:\n"
    "        time.sleep(0.01)\n"
)


def test_fork_bomb_is_contained_and_leaves_nothing(caller):
    mark = f"bomb-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    done, res = run_json(
        caller, "--pids", "32", "--wall", "3", "--", "python3", "-c", FORK_BOMB, mark
    )
    assert res["verdict"] == "TLE" and res["reason"] == "wall"
    assert res["limits"]["pids_max"]["mechanism"] == ("cgroup1" if caller.uid == 0 else "rlimit")
    # The host stayed responsive: the run ended on time and a fresh process starts fast.
    assert time.monotonic() - started < 20
    probe = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert time.monotonic() - probe < 5
    assert host_pids_with(mark) == []


def test_output_limit_stops_a_program_printing_forever(caller):
    started = time.monotonic()
    done, res = run_json(
        caller, "--output-limit", "1M", "--wall", "30", "--",
        "python3", "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)",
    )
    assert (res["verdict"], res["reason"]) == ("OLE", "output")
    assert time.monotonic() - started < 15  # promptly, not at the wall limit
    assert len(res["stdout"]) <= 1 << 20


def test_capture_keeps_sbx_small_on_an_endless_writer(user_caller):
    # Captured output under a limit: what passes the limit is drained, not kept.
    # The peak is measured by a small wrapper, whose fork carries no big parent's
    # pages into the child's rusage (as a fork of this test process would).
    command = user_caller.command(
        ["exec", "--json", "--output-limit", "1M", "--wall", "30", "--", "python3",
         "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"]
    )
    wrapper = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], env=user_caller.env(),
                          cwd="/", capture_output=True, text=True, timeout=60, check=True)
    returncode, peak_kib = (int(x) for x in done.stdout.split())
    assert returncode == 137
    assert peak_kib < 100 * 1024  # far below what the payload wrote


def test_ten_megabytes_without_a_limit_arrive_whole(caller):
    done, res = run_json(
        caller, "--", "python3", "-c", "import sys; sys.stdout.write('y' * (10 << 20))"
    )
    assert res["verdict"] == "OK"
    assert len(res["stdout"]) == 10 << 20


def test_require_cgroup(caller):
    done, res = run_json(caller, "--require-cgroup", "--", "true")
    if caller.uid == 0:
        assert res["verdict"] == "OK"
        assert res["limits"]["memory_max_bytes"]["mechanism"] in ("none", "cgroup1")
    else:
        assert res["verdict"] == "IE" and done.returncode == 125
        assert "cgroup" in res["error"]
        assert len(done.stderr.strip().splitlines()) == 1
