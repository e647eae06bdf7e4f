"""Attack: kill an instance's supervisor with SIGKILL and hope its payload survives.

The payload does what a process that wants to outlive its sandbox does: it forks a
child that starts its own session and forks again (a daemon), and it ignores SIGTERM
and SIGHUP. Killing the supervisor must still end every process of the instance
(init's parent-death signal, then the pid namespace), `ps -a` must show the instance
exited, never running, and `rm` must remove it without -f, cgroup included.
"""

from __future__ import annotations

import json
import os
import signal
import time

from tests.integration.test_instances import (  # noqa: F401 - the fixture
    _alive,
    _cgroup_dirs,
    _one_error_line,
    _wait_gone,
    sbx,
)

ESCAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("/box/daemon-up", "w").close()
        while True:
            time.sleep(0.05)
    os._exit(0)
print("up", flush=True)
while True:
    time.sleep(0.05)
"""


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in os.listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(p) for p in f.read().split()]
            except OSError:
                pass
    return found


def test_sigkill_of_the_supervisor_kills_the_instance(sbx):  # noqa: F811
    sbx.ok(
        "run", "-d", "--name", "victim", "--pids", "16",
        "--", "python3", "-c", ESCAPER,
    )  # fmt: skip
    sbx.wait_output("victim", "up")
    daemon_marker = sbx.root / "victim" / "box" / "daemon-up"
    deadline = time.monotonic() + 10
    while not daemon_marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_marker.exists()

    state = sbx.state("victim")
    supervisor_pid = state["run"]["supervisor"]["pid"]
    init_pid = state["run"]["init"]["pid"]
    instance = _descendants(init_pid)
    # init, the payload and the re-parented daemon (orphans go to init).
    assert len(instance) >= 3, instance

    os.kill(supervisor_pid, signal.SIGKILL)
    assert _wait_gone([supervisor_pid, *instance]) == [], "the instance outlived it"

    row = json.loads(sbx.ok("ps", "-a", "--json"))[0]
    assert row["name"] == "victim" and row["state"] == "exited", row
    assert row["reason"] == "supervisor-died"
    assert json.loads(sbx.ok("ps", "--json")) == []
    _one_error_line(sbx.run("enter", "victim", "--", "true"), "not running")

    sbx.ok("rm", "victim")
    assert not (sbx.root / "victim").exists()
    for directory in _cgroup_dirs(state):
        assert not os.path.exists(directory), directory
    assert not any(_alive(pid) for pid in instance)
