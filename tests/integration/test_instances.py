"""Instances end to end through the CLI, as root and as the unprivileged user.

Each test starts real instances: a detached supervisor per instance, real
namespaces, cgroups where the caller has them (cgroup v1 as root here), the rlimit
fallback otherwise. Each caller gets its own XDG_STATE_HOME in a temporary
directory, so the tests neither see nor leave anything in a real home.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Allocates 50 MB (touching every page), then counts in /box/counter until stopped.
COUNTER = """
import os, signal, sys, time
block = bytearray(50 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
n = 0
print("ready", flush=True)
while True:
    n += 1
    with open("/box/counter.tmp", "w") as f:
        f.write(str(n))
    os.replace("/box/counter.tmp", "/box/counter")
    time.sleep(0.05)
"""
MIB = 1 << 20


def _boot_snippet() -> str:
    """`python -m sandbox` once the lead registers the instance commands in cli.py;
    until then the same app with them registered here."""
    return (
        "import sys\n"
        "from sandbox.cli import app, run_app\n"
        "from sandbox.cli_instances import register\n"
        "if not any(c.name == 'ps' for c in app.registered_commands):\n"
        "    register(app)\n"
        "sys.exit(run_app(sys.argv[1:]))\n"
    )


def _cli_has_instances() -> bool:
    """Whether sandbox/cli.py registers the instance commands itself (read, not
    imported: importing typer here would only add its warnings to the tests')."""
    cli = Path(__file__).resolve().parents[2] / "sandbox" / "cli.py"
    return "cli_instances" in cli.read_text()


class Sbx:
    """`sbx` as one caller, with its own state directory."""

    def __init__(self, caller, state_home: Path) -> None:
        self.caller = caller
        self.state_home = state_home
        self.root = state_home / "sbx" / "instances"

    def command(self, args: list[str]) -> list[str]:
        argv = self.caller.command(list(args))
        if not _cli_has_instances():
            at = argv.index(sys.executable)
            assert argv[at + 1 : at + 3] == ["-m", "sandbox"]
            argv[at + 1 : at + 3] = ["-c", _boot_snippet()]
        return ["env", f"XDG_STATE_HOME={self.state_home}", *argv]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(list(args)),
            env=self.caller.env(),
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(list(args)),
            env=self.caller.env(),
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def state(self, name: str) -> dict:
        return json.loads((self.root / name / "state.json").read_text())

    def ps(self) -> dict:
        return {row["name"]: row for row in json.loads(self.ok("ps", "-a", "--json"))}

    def wait_output(self, name: str, text: str, timeout_s: float = 15) -> None:
        log = self.root / name / "stdout.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text():
                return
            time.sleep(0.05)
        supervisor_log = (self.root / name / "supervisor.log").read_text()
        raise AssertionError(
            f"{name} did not print {text!r} in {timeout_s} s: {self.run('logs', name)}"
            f"\n{self.ps().get(name)}\n{supervisor_log}"
        )

    def cleanup(self) -> None:
        """Kill whatever a failed test left running, through sbx itself."""
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry.is_dir():
                    self.run("rm", "-f", entry.name)


@pytest.fixture
def sbx(caller):
    home = Path(tempfile.mkdtemp(prefix="sbx-state-"))
    os.chown(home, caller.uid, caller.gid)
    os.chmod(home, 0o700)
    tool = Sbx(caller, home)
    try:
        yield tool
    finally:
        tool.cleanup()
        left = _processes_of(home)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
    assert left == [], "processes of this test's sbx were left running"


def _processes_of(state_home: Path) -> list[int]:
    """Processes started by sbx with this state home (supervisors, log relays):
    they inherit its environment; the sandboxed payloads do not."""
    marker = f"XDG_STATE_HOME={state_home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _alive(int(entry)):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 5) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.02)
    return [pid for pid in pids if _alive(pid)]


def _run_pids(state: dict) -> list[int]:
    return [state["run"]["supervisor"]["pid"], state["run"]["init"]["pid"]]


def _cgroup_dirs(state: dict) -> list[str]:
    return list(((state.get("run") or {}).get("cgroup") or {}).get("dirs", {}).values())


def _one_error_line(done: subprocess.CompletedProcess, words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("sbx: error: "), done.stderr
    assert words in lines[0], lines[0]


# --- 1. a running instance: ps, stats, enter -----------------------------------------


def test_running_instance_shows_in_ps_stats_and_enter(sbx, caller):
    sbx.ok(
        "run", "-d", "--name", "counter", "--memory", "256M",
        "--", "python3", "-c", COUNTER,
    )  # fmt: skip
    sbx.wait_output("counter", "ready")

    row = sbx.ps()["counter"]
    assert row["state"] == "running"
    assert row["command"][:2] == ["python3", "-c"]
    assert row["rootfs"] == "host"
    assert row["limits"]["memory_max_bytes"] == 256 * MIB
    assert row["uptime_s"] >= 0
    table = sbx.ok("ps")
    assert "counter" in table and "running" in table and "mem=256.0MiB" in table

    [stats] = json.loads(sbx.ok("stats", "--no-stream", "--json", "counter"))
    assert stats["state"] == "running"
    assert 45 * MIB <= stats["memory_bytes"] <= 130 * MIB, stats
    assert stats["memory_limit_bytes"] == 256 * MIB
    if stats["source"] == "proc":
        assert stats["memory_limit_mechanism"] == "rlimit"
    else:
        assert stats["memory_limit_mechanism"] == stats["source"]
    assert stats["tasks"] >= 2
    assert stats["cpu_percent"] is not None

    listing = sbx.ok("enter", "counter", "--", "ps", "-e", "-o", "pid=,args=")
    processes = [line.split(None, 1) for line in listing.strip().splitlines()]
    pids = sorted(int(pid) for pid, _ in processes)
    # Only the instance: its init (1), the payload (2) and this ps (3).
    assert pids == [1, 2, 3], listing
    assert any("python3 -c" in args for _, args in processes)
    assert str(os.getpid()) not in [pid for pid, _ in processes]

    probe = (
        "id -u; id -g; "
        "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; pwd"
    )
    out = sbx.ok("enter", "counter", "--", "sh", "-c", probe).split("\n")
    assert out[:2] == ["1000", "1000"]
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    assert out[6] == "/box"
    assert int(sbx.ok("enter", "counter", "--", "cat", "/box/counter")) > 0

    assert sbx.run("enter", "counter", "--", "sh", "-c", "exit 7").returncode == 7
    missing = sbx.run("enter", "counter", "--", "no-such-command")
    assert missing.returncode == 127 and "not found" in missing.stderr
    assert sbx.ps()["counter"]["state"] == "running"


def test_entered_command_joins_the_instance_cgroup(sbx, caller):
    sbx.ok("run", "-d", "--name", "cg", "--memory", "64M", "--", "sleep", "600")
    state = sbx.state("cg")
    dirs = _cgroup_dirs(state)
    if not dirs:
        pytest.skip(f"{caller.name} has no cgroup here: {state['run']['mechanisms']}")
    shell = "cat /proc/self/cgroup; sleep 3"
    entered = sbx.popen("enter", "cg", "--", "sh", "-c", shell)
    try:
        deadline = time.monotonic() + 10
        found = {}
        while time.monotonic() < deadline and len(found) < len(set(dirs)):
            for directory in set(dirs):
                for pid in Path(directory, "cgroup.procs").read_text().split():
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue  # a task of the cgroup that exited meanwhile
                    if cmdline == b"sleep\x003\x00":
                        found[directory] = pid
            time.sleep(0.05)
        assert len(found) == len(set(dirs)), (found, dirs)
    finally:
        out, _ = entered.communicate(timeout=30)
    # Inside its cgroup namespace, the instance's cgroup is the root.
    assert all(line.endswith(":/") for line in out.split()), out
    sbx.ok("rm", "-f", "cg")
    for directory in dirs:
        assert not os.path.exists(directory)


# --- 2. persistence, stop, rm ------------------------------------------------------


def test_files_persist_across_stop_and_start_and_rm_leaves_nothing(sbx, caller):
    script = (
        'echo started >> /box/log; trap "echo term >> /box/log; exit 0" TERM; '
        "while :; do sleep 0.05; done"
    )
    sbx.ok("run", "-d", "--name", "keep", "--", "sh", "-c", script)
    # A read-only directory too: rm must still remove the box.
    writes = "echo data > /box/file; mkdir /box/ro; chmod 500 /box/ro"
    sbx.ok("enter", "keep", "--", "sh", "-c", writes)

    began = time.monotonic()
    sbx.ok("stop", "--time", "5", "keep")
    assert time.monotonic() - began < 4.5
    row = sbx.ps()["keep"]
    assert row["state"] == "exited" and row["exit_code"] == 0
    assert "stopped by `sbx stop`" in row["why"]

    sbx.ok("start", "keep")
    assert sbx.ok("enter", "keep", "--", "cat", "/box/file") == "data\n"
    history = sbx.ok("enter", "keep", "--", "cat", "/box/log").split()
    assert history == ["started", "term", "started"]

    state = sbx.state("keep")
    pids = [state["run"]["supervisor"]["pid"], state["run"]["init"]["pid"]]
    sbx.ok("stop", "keep")
    assert _wait_gone(pids) == []
    sbx.ok("rm", "keep")
    assert not (sbx.root / "keep").exists()
    assert not (sbx.root / "keep.lock").exists()
    assert os.listdir(sbx.root) == []
    for directory in _cgroup_dirs(state):
        assert not os.path.exists(directory), directory
    with open("/proc/self/mountinfo") as f:
        assert str(sbx.state_home) not in f.read()


def test_stop_kills_a_payload_that_ignores_sigterm_after_the_grace_period(sbx, caller):
    script = 'trap "" TERM; echo up; while :; do sleep 0.05; done'
    sbx.ok("run", "-d", "--name", "stubborn", "--", "sh", "-c", script)
    sbx.wait_output("stubborn", "up")
    state = sbx.state("stubborn")
    began = time.monotonic()
    sbx.ok("stop", "--time", "1", "stubborn")
    took_s = time.monotonic() - began
    assert 1.0 <= took_s < 4.0, took_s
    row = sbx.ps()["stubborn"]
    assert row["state"] == "exited" and row["signal"] == "SIGKILL", row
    assert _wait_gone(_run_pids(state)) == []
    for directory in _cgroup_dirs(state):
        assert not os.path.exists(directory), directory
    sbx.ok("rm", "stubborn")


def test_rm_force_kills_a_running_instance_and_removes_its_cgroup(sbx, caller):
    sbx.ok("run", "-d", "--name", "doomed", "--memory", "64M", "--", "sleep", "600")
    state = sbx.state("doomed")
    sbx.ok("rm", "-f", "doomed")
    assert _wait_gone(_run_pids(state)) == []
    assert not (sbx.root / "doomed").exists()
    for directory in _cgroup_dirs(state):
        assert not os.path.exists(directory), directory


# --- 4. errors: one clear line, nothing changed -------------------------------------


def test_errors_are_one_line_and_change_nothing(sbx, caller):
    sbx.ok("create", "--name", "e", "--", "sleep", "600")
    before = (sbx.root / "e" / "state.json").read_bytes()
    _one_error_line(sbx.run("create", "--name", "e", "--", "true"), "already exists")
    _one_error_line(sbx.run("enter", "e", "--", "true"), "not running")
    assert (sbx.root / "e" / "state.json").read_bytes() == before

    sbx.ok("start", "e")
    running = (sbx.root / "e" / "state.json").read_bytes()
    _one_error_line(sbx.run("start", "e"), "already running")
    _one_error_line(sbx.run("rm", "e"), "is running")
    _one_error_line(sbx.run("create", "--name", "e", "--", "true"), "already exists")
    assert (sbx.root / "e" / "state.json").read_bytes() == running
    assert sbx.ps()["e"]["state"] == "running"

    sbx.ok("stop", "--time", "2", "e")
    stopped = (sbx.root / "e" / "state.json").read_bytes()
    _one_error_line(sbx.run("enter", "e", "--", "true"), "not running")
    assert (sbx.root / "e" / "state.json").read_bytes() == stopped

    verbs = (["start"], ["stop"], ["rm"], ["logs"], ["enter"], ["stats", "--no-stream"])
    for verb in verbs:
        args = [*verb, "nosuch"] + (["--", "true"] if verb == ["enter"] else [])
        _one_error_line(sbx.run(*args), "no instance named 'nosuch'")
    assert sorted(os.listdir(sbx.root)) == ["e", "e.lock"]

    bad = sbx.run("create", "--name", "../x", "--", "true")
    assert bad.returncode == 2 and "bad instance name" in bad.stderr
    bad = sbx.run("create", "--name", "x", "--stdout", "/tmp/x", "--", "true")
    assert bad.returncode == 2 and "does not apply to instances" in bad.stderr
    sbx.ok("rm", "e")
    assert os.listdir(sbx.root) == []


def test_two_commands_at_once_on_one_instance(sbx, caller):
    creates = [
        sbx.popen("create", "--name", "race", "--", "sleep", "600") for _ in range(3)
    ]
    results = [(p.communicate(timeout=60)[1], p.returncode)[::-1] for p in creates]
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    starts = [sbx.popen("start", "race") for _ in range(3)]
    results = [(p.communicate(timeout=60)[1], p.returncode)[::-1] for p in starts]
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    assert all("already running" in err for code, err in results if code)
    # One supervisor only.
    state = sbx.state("race")
    sbx.ok("rm", "-f", "race")
    assert _wait_gone([state["run"]["init"]["pid"]]) == []


# --- logs and state ------------------------------------------------------------------


def test_logs_keep_both_streams_with_a_size_cap(sbx, caller):
    script = (
        "import sys, time\n"
        "for i in range(20000): print(f'line {i:06d}')\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(1)\n"
        "print('line 020000')\n"
    )
    sbx.ok(
        "run", "-d", "--name", "chatty", "--log-max", "64K",
        "--", "python3", "-c", script,
    )  # fmt: skip
    follow = sbx.popen("logs", "-f", "chatty")
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0
    assert out.rstrip().endswith("line 020000") and "to stderr" in err

    logs = sbx.run("logs", "chatty")
    kept = logs.stdout.splitlines()
    assert kept[-1] == "line 020000"
    assert len(logs.stdout) <= 64 * 1024
    assert len(logs.stdout) > 16 * 1024
    # Whole lines, in order, ending with the last one.
    numbers = [int(line.split()[1]) for line in kept[1:]]
    assert numbers == list(range(numbers[0], 20001))
    assert logs.stderr == "to stderr\n"
    row = sbx.ps()["chatty"]
    assert row["state"] == "exited" and row["exit_code"] == 0 and row["verdict"] == "OK"


def test_an_instance_from_before_a_reboot_shows_exited(sbx, caller):
    sbx.ok("create", "--name", "old", "--", "sleep", "600")
    path = sbx.root / "old" / "state.json"
    state = json.loads(path.read_text())
    fake = {"pid": os.getpid(), "start_ticks": 1, "boot_id": "not-this-boot"}
    state["state"] = "running"
    run = {"id": "x", "started_at": time.time(), "supervisor": fake, "init": fake}
    state["run"] = run
    path.write_text(json.dumps(state))
    row = sbx.ps()["old"]
    assert row["state"] == "exited" and row["reason"] == "reboot", row
    assert "old" not in json.loads(sbx.ok("ps", "--json"))
    _one_error_line(sbx.run("enter", "old", "--", "true"), "not running")
    sbx.ok("start", "old")
    assert sbx.ps()["old"]["state"] == "running"
    sbx.ok("rm", "-f", "old")


def test_a_start_that_fails_reports_it_and_leaves_nothing_running(sbx, caller):
    policy = sbx.state_home / "policy.json"
    policy.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    os.chmod(policy, 0o644)
    sbx.ok("create", "--name", "broken", "--seccomp", str(policy), "--", "true")
    policy.write_text("this is not JSON")
    before = (sbx.root / "broken" / "state.json").read_bytes()
    done = sbx.run("start", "broken")
    assert done.returncode != 0 and "sbx: error: " in done.stderr, done
    assert (sbx.root / "broken" / "state.json").read_bytes() == before
    deadline = time.monotonic() + 5
    while _processes_of(sbx.state_home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_of(sbx.state_home) == []
    sbx.ok("rm", "broken")


def test_run_without_detach_follows_and_returns_the_exit_status(sbx, caller):
    script = "echo hello; echo oops >&2; exit 3"
    done = sbx.run("run", "--name", "once", "--", "sh", "-c", script)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello\n" and done.stderr == "oops\n"
    sbx.ok("rm", "once")
