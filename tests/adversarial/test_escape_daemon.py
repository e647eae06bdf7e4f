"""Attack: outlive the run by daemonizing (setsid, double fork) and act later.

The payload's child starts a new session and double-forks; the grandchild sleeps and
would then write a marker into the caller's directory. The main process exits at once.
`sbx exec` must return as soon as the main process exits, no process of the run may
remain on the host, and the marker must never appear.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import host_pids_with, shared_tmpdir

# argv: TOKEN SLEEP_SECONDS. The daemon tells the main process over a pipe that it
# is in place (new session, reparented) before the main process exits.
DAEMONIZE = """
import os, signal, sys, time
token, sleep_s = sys.argv[1], float(sys.argv[2])
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    if os.fork() != 0:
        os._exit(0)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    os.write(ready_w, str(os.getsid(0)).encode())
    os.close(ready_w)
    time.sleep(sleep_s)
    with open("/box/marker", "w") as f:
        f.write(token)
    os._exit(0)
os.close(ready_w)
print("daemon session", os.read(ready_r, 32).decode(), "main", os.getpid(), flush=True)
"""


def token() -> str:
    return f"sbx-daemon-{uuid.uuid4().hex[:12]}"


def kill_leftovers(mark: str) -> None:
    """If sbx failed, do not leave the test's own daemon behind on this machine."""
    for pid in host_pids_with(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def box_dir():
    # A root caller's payload runs as an unprivileged host id: it must be able to
    # write here, or a missing marker would prove nothing.
    with shared_tmpdir("sbx-daemon-test-", 0o777) as path:
        yield path


def run_daemonizer(caller, box_dir: Path, mark: str, sleep_s: float):
    started = time.monotonic()
    sbx = ["exec", "--json", "--dir", str(box_dir), "--"]
    payload = ["python3", "-c", DAEMONIZE, mark, str(sleep_s)]
    done = caller.run([*sbx, *payload], timeout=60)
    return done, time.monotonic() - started


def test_daemon_sleeping_100s_dies_with_the_run(caller, box_dir):
    mark = token()
    try:
        done, elapsed_s = run_daemonizer(caller, box_dir, mark, 100)
        res = json.loads(done.stdout)
        leftovers = host_pids_with(mark)
    finally:
        kill_leftovers(mark)
    assert done.returncode == 0, done.stderr
    assert res["verdict"] == "OK"
    assert res["stdout"].startswith("daemon session "), res
    assert elapsed_s < 10, f"sbx waited for the daemon ({elapsed_s:.1f} s)"
    assert res["wall_time_s"] < 5
    assert leftovers == [], f"processes of the run remain on the host: {leftovers}"
    assert not (box_dir / "marker").exists()


def test_daemon_marker_never_appears(caller, box_dir):
    """The same attack with a short sleep, so the test can wait past it: if anything
    of the run survived, the marker would be there."""
    mark = token()
    sleep_s = 1.0
    try:
        done, elapsed_s = run_daemonizer(caller, box_dir, mark, sleep_s)
        assert done.returncode == 0, done.stderr
        assert elapsed_s < sleep_s + 5
        time.sleep(sleep_s + 1.0)
        leftovers = host_pids_with(mark)
    finally:
        kill_leftovers(mark)
    assert leftovers == []
    assert not (box_dir / "marker").exists(), "a daemon of the run wrote after it ended"


def test_box_dir_is_writable_by_the_payload(caller, box_dir):
    """The control for the two tests above: without the daemon trick, the payload can
    write the marker, so its absence there means the daemon was killed."""
    done = caller.run(["exec", "--dir", str(box_dir), "--", "touch", "/box/marker"])
    assert done.returncode == 0, done.stderr
    assert (box_dir / "marker").exists()


def test_killing_sbx_kills_the_whole_run(caller, box_dir):
    """sbx itself dies (SIGKILL, no chance to clean up): the run must die with it."""
    mark = token()
    code = DAEMONIZE + "\ntime.sleep(100)\n"
    proc = caller.popen(
        ["exec", "--dir", str(box_dir), "--", "python3", "-c", code, mark, "100"],
        stdout=subprocess.PIPE,
    )
    try:
        with proc:
            assert proc.stdout.readline().startswith(b"daemon session ")
            assert len(host_pids_with(mark)) >= 3  # sbx, its init, payload, daemon
            proc.kill()
            proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while (leftovers := host_pids_with(mark)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_leftovers(mark)
    assert leftovers == [], f"processes of the run outlived sbx: {leftovers}"
