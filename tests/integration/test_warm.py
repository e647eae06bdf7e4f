"""Warm sandboxes (sandbox/warm.py) on the real kernel, as root and as the unprivileged
test user, with the C launcher and with the Python one.

A warm sandbox runs many payloads one after another in one user namespace, so what
matters most is that nothing of a run reaches the next: not its files, not its
processes, not its mounts or sockets. Then that every limit and the seccomp verdicts
hold as in a cold run, and that the zygote dies with its owner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import host_pids_with, shared_tmpdir

LAUNCHERS = ["native", "python"]


@pytest.fixture
def readable_dir():
    """A temporary directory every caller can read, removed afterwards."""
    with shared_tmpdir("sbx-warm-test-") as path:
        yield path


@pytest.fixture
def key_policy(readable_dir):
    """A seccomp policy that allows everything, for the keyring probes (x86_64
    syscall numbers: add_key 248, keyctl 250)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the keyring probes use x86_64 syscall numbers")
    policy = readable_dir / "allow-all.json"
    policy.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}))
    os.chmod(policy, 0o644)
    return policy


def run_as(caller, code: str, launcher: str = "native", timeout: float = 120):
    """Run a Python script as the caller, with the package on its path; the script
    prints one JSON object, returned decoded."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(textwrap.dedent(code))
    os.chmod(f.name, 0o644)
    command = [sys.executable, f.name]
    if caller.uid != os.geteuid():
        drop = ["setpriv", f"--reuid={caller.uid}", f"--regid={caller.gid}", "--init-groups"]
        command = [*drop, "env", f"HOME={caller.home}", *command]
    env = caller.env() | {"SBX_PYTHON_LAUNCHER": "1" if launcher == "python" else ""}
    try:
        done = subprocess.run(
            command, env=env, cwd="/", capture_output=True, text=True, timeout=timeout
        )
    finally:
        os.unlink(f.name)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_nothing_of_a_run_reaches_the_next(caller, launcher):
    mark = f"sbx-warm-{uuid.uuid4().hex[:8]}"
    out = run_as(caller, f"""
        import json, sys
        from tests.conftest import host_pids_with
        from sandbox.api import Runner
        first = (
            "echo x > /tmp/left; echo y > /dev/shm/left; echo z > /box/left; "
            "python3 -c 'import time; time.sleep(1000)' {mark} & "
            "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
            "s.bind(bytes(1) + b\\"{mark}\\"); s.listen(); print(\\"bound\\")'"
        )
        second = (
            "ls -A /tmp /dev/shm /box; echo procs $(ls /proc | grep -c '^[0-9]'); "
            "grep -c {mark} /proc/net/unix; hostname; id -u; cat /proc/self/cgroup; "
            "for p in /dev/x /etc/x /x /usr/x; do touch $p 2>/dev/null && echo wrote $p; done; "
            "touch /tmp/ok /box/ok /dev/shm/ok && echo writable"
        )
        with Runner(profile="default") as runner:
            a = runner.run(["/bin/sh", "-c", first])
            left = host_pids_with("{mark}")
            b = runner.run(["/bin/sh", "-c", second])
            zygotes = [z.native for d in runner._pool._idle.values() for z in d.values()]
        print(json.dumps({{"a": a.to_dict(), "b": b.to_dict(), "left": left,
                           "zygotes": zygotes}}))
    """, launcher)
    a, b = out["a"], out["b"]
    assert a["verdict"] == "OK" and a["stdout"] == "bound\n", a
    # The run's init is gone once run() returns, and its pid namespace with it.
    assert out["left"] == []
    assert out["zygotes"] == [launcher == "native"]
    lines = b["stdout"].splitlines()
    assert b["verdict"] == "OK", b
    # Empty /tmp, /dev/shm and /box; in /proc only this run's init, shell and
    # children; no trace of the other run's abstract socket; the run's own cgroup
    # root; and nothing but /tmp, /box and /dev/shm is writable.
    assert "left" not in b["stdout"], lines
    procs = [line for line in lines if line.startswith("procs ")]
    assert procs and int(procs[0].split()[1]) <= 6, lines  # init, sh, $(), ls, grep
    assert "0" in lines and "sbx" in lines and "1000" in lines
    assert any(line.endswith(":/") for line in lines), lines
    assert not [line for line in lines if line.startswith("wrote")], lines
    assert lines[-1] == "writable"
    assert host_pids_with(mark) == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_limits_and_verdicts_hold_in_warm_runs(caller, launcher):
    out = run_as(caller, """
        import json
        from sandbox.api import Runner
        results = {}
        spin = ["python3", "-c", "while True: pass"]
        with Runner(profile="strict") as runner:
            results["cpu"] = runner.run(spin, time=0.3)
            results["wall"] = runner.run(["sleep", "5"], wall=0.3)
            results["output"] = runner.run(
                ["python3", "-c", "print('x' * 100000)"], output_limit=1000)
            results["memory"] = runner.run(
                ["python3", "-c", "b = bytearray(300 << 20); print(len(b))"],
                memory="64M")
            results["pids"] = runner.run(["python3", "-c", (
                "import os, time\\n"
                "n = 0\\n"
                "try:\\n"
                "    while n < 100:\\n"
                "        if os.fork() == 0: time.sleep(5); os._exit(0)\\n"
                "        n += 1\\n"
                "except OSError: pass\\n"
                "print(n)")], pids=16)
            results["seccomp"] = runner.run(["python3", "-c", (
                "import ctypes; ctypes.CDLL(None).unshare(0)")])
            results["ok"] = runner.run(["python3", "-c", "print(6 * 7)"])
        print(json.dumps({k: v.to_dict() for k, v in results.items()}))
    """, launcher)
    assert (out["cpu"]["verdict"], out["cpu"]["reason"]) == ("TLE", "cpu")
    assert 0.3 <= out["cpu"]["cpu_time_s"]["total"] < 1.0
    assert (out["wall"]["verdict"], out["wall"]["reason"]) == ("TLE", "wall")
    assert out["output"]["verdict"] == "OLE"
    # MLE with a memory cgroup (root here); without one, RLIMIT_DATA makes the
    # allocation fail, which the payload reports as an error.
    memory = out["memory"]
    mechanism = memory["limits"]["memory_max_bytes"]["mechanism"]
    assert memory["verdict"] == ("RE" if mechanism == "rlimit" else "MLE"), memory
    forked = int(out["pids"]["stdout"])
    assert out["pids"]["verdict"] == "OK" and forked < 16
    assert out["seccomp"]["verdict"] == "SV"
    assert out["seccomp"]["violation"] == {"syscall": "unshare"}
    assert (out["ok"]["verdict"], out["ok"]["stdout"]) == ("OK", "42\n")


def test_files_land_in_box_owned_by_the_payload(caller):
    out = run_as(caller, """
        import json
        from sandbox.api import Runner
        from sandbox.errors import SandboxError, UsageError
        with Runner(profile="strict") as runner:
            ok = runner.run(["/bin/sh", "-c", "cat a.txt d/e/f.bin | od -c | head -2; "
                             "stat -c '%u %a %n' a.txt d d/e d/e/f.bin"],
                            files={"a.txt": "hello\\n", "d/e/f.bin": bytes([0, 255])})
            try:
                runner.run(["true"], files={"big": b"x" * (3 << 20)}, tmpfs_size="1M")
                too_big = None
            except UsageError as e:
                too_big = str(e)
            many = runner.run(["sh", "-c", "ls d | wc -l"],
                              files={f"d/{n}": b"" for n in range(5000)})
            try:
                runner.run("true")
                not_a_list = None
            except UsageError as e:
                not_a_list = str(e)
            try:
                runner.run(["true"], files={"../escape": b""})
                escape = None
            except UsageError as e:
                escape = str(e)
            after = runner.run(["cat", "a.txt"], files={"a.txt": b"again"})
        print(json.dumps({"ok": ok.to_dict(), "too_big": too_big, "escape": escape,
                          "after": after.to_dict(), "many": many.to_dict(),
                          "not_a_list": not_a_list}))
    """)
    lines = out["ok"]["stdout"].splitlines()
    assert lines[0].split()[1:] == ["h", "e", "l", "l", "o", "\\n", "\\0", "377"], lines
    assert lines[-4:] == ["1000 644 a.txt", "1000 755 d", "1000 755 d/e", "1000 644 d/e/f.bin"]
    # Refused before anything runs, saying what to raise.
    assert "do not fit" in out["too_big"] and "tmpfs_size" in out["too_big"]
    assert "relative path in /box" in out["escape"]
    assert "must be a list of strings" in out["not_a_list"]
    # As many files as a cold run takes (the C launcher has no fixed cap).
    assert (out["many"]["verdict"], out["many"]["stdout"]) == ("OK", "5000\n")
    # A failed set-up does not spoil the warm sandbox for the next run.
    assert (out["after"]["verdict"], out["after"]["stdout"]) == ("OK", "again")


def test_command_not_found_leaves_the_runner_usable(caller):
    out = run_as(caller, """
        import json
        from sandbox.api import Runner
        from sandbox.errors import ExecError
        with Runner() as runner:
            try:
                runner.run(["no-such-command-here"])
                error = None
            except ExecError as e:
                error = [str(e), e.exit_code]
            after = runner.run(["echo", "fine"])
        print(json.dumps({"error": error, "after": after.to_dict()}))
    """)
    assert out["error"][1] == 127
    assert out["after"]["stdout"] == "fine\n"


def test_a_zygote_dies_with_the_process_that_made_it(caller, readable_dir):
    """Killing the process that holds a Runner (no close, no atexit) leaves no warm
    sandbox behind: the zygote and its waiting launcher die with it."""
    mark = f"sbx-warm-owner-{uuid.uuid4().hex[:8]}"
    script = readable_dir / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from sandbox.api import Runner
        runner = Runner()
        runner.run(["true"])
        zygote = [z.pid for d in runner._pool._idle.values() for z in d.values()][0]
        print(zygote, flush=True)
        time.sleep(1000)  # {mark}
    """))
    os.chmod(script, 0o644)
    command = [sys.executable, str(script), mark]
    if caller.uid != os.geteuid():
        drop = ["setpriv", f"--reuid={caller.uid}", f"--regid={caller.gid}", "--init-groups"]
        command = [*drop, "env", f"HOME={caller.home}", *command]
    owner = subprocess.Popen(command, env=caller.env(), cwd="/", stdout=subprocess.PIPE,
                             text=True)
    try:
        zygote = int(owner.stdout.readline())
        launchers = _children(zygote)
        assert launchers, "the zygote keeps a launcher waiting for the next run"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(map(_alive, [zygote, *launchers])):
            time.sleep(0.05)
        assert not any(map(_alive, [zygote, *launchers]))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdout.close()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for the machine's init."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_key_left_in_a_keyring_is_gone_for_the_next_run(caller, launcher, key_policy):
    """Keyrings live in a user namespace: each warm run has its own (nested in the
    zygote's), so with a policy that lets a run add keys, lock its keyring and use
    the persistent one, the next run still finds none of them."""
    # Three places a key could stay: the user keyring, the user keyring made
    # read-only (so that it could not be emptied), and the persistent keyring.
    keys = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "ADD_KEY, KEYCTL, USER = 248, 250, -4\n"
        "persistent = libc.syscall(KEYCTL, 22, -1, -2)\n"
        "if sys.argv[1] == 'add':\n"
        "    a = libc.syscall(ADD_KEY, b'user', b'sbx-left', b'secret', 6, USER)\n"
        "    b = libc.syscall(ADD_KEY, b'user', b'sbx-kept', b'secret', 6, persistent)\n"
        "    locked = libc.syscall(KEYCTL, 5, USER, 0x0b0b0000)\n"
        "    print('added' if a > 0 and b > 0 and locked == 0 else 'add failed')\n"
        "else:\n"
        "    left = libc.syscall(KEYCTL, 10, USER, b'user', b'sbx-left', 0)\n"
        "    kept = libc.syscall(KEYCTL, 10, persistent, b'user', b'sbx-kept', 0)\n"
        "    print('found' if left > 0 or kept > 0 else 'not found')\n"
    )
    out = run_as(caller, f"""
        import json
        from sandbox.api import Runner
        with Runner(seccomp={str(key_policy)!r}) as runner:
            first = runner.run(["python3", "-c", {keys!r}, "add"])
            second = runner.run(["python3", "-c", {keys!r}, "find"])
        print(json.dumps([first.to_dict(), second.to_dict()]))
    """, launcher)
    assert out[0]["stdout"] == "added\n", out[0]
    assert out[1]["stdout"] == "not found\n", out[1]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_running_payload_dies_with_its_supervisor(caller, launcher, readable_dir):
    """SIGKILL to the process running a warm run (no cleanup of any kind) ends the
    run: its init sees the supervisor's end of the control pipe close (C launcher)
    or gets its death signal (Python launcher)."""
    mark = f"sbx-warm-orphan-{uuid.uuid4().hex[:8]}"
    script = readable_dir / "owner.py"
    script.write_text(textwrap.dedent(f"""
        from sandbox.api import Runner
        runner = Runner()
        runner.run(["python3", "-c", "import time; time.sleep(1000)", "{mark}"])
    """))
    os.chmod(script, 0o644)
    command = [sys.executable, str(script)]
    if caller.uid != os.geteuid():
        drop = ["setpriv", f"--reuid={caller.uid}", f"--regid={caller.gid}", "--init-groups"]
        command = [*drop, "env", f"HOME={caller.home}", *command]
    env = caller.env() | {"SBX_PYTHON_LAUNCHER": "1" if launcher == "python" else ""}
    owner = subprocess.Popen(command, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while not host_pids_with(mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_pids_with(mark), "the payload never started"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(map(_alive, host_pids_with(mark))):
            time.sleep(0.05)
        assert not any(map(_alive, host_pids_with(mark)))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_runner_used_from_short_lived_threads_keeps_working(caller):
    """Each thread's warm sandbox dies with the thread; the next thread's run must get a
    new one (and no pid of a reaped zygote is ever signalled), and nothing is left
    behind, not even a zombie launcher, once the Runner is closed."""
    out = run_as(caller, """
        import json, os, threading, time
        from sandbox.api import Runner
        runner = Runner()
        verdicts = []

        def one():
            try:
                verdicts.append(runner.run(["true"]).verdict)
            except Exception as e:
                verdicts.append(repr(e))

        for n in range(30):
            thread = threading.Thread(target=one)
            thread.start()
            thread.join()
            if n % 10 == 0:
                time.sleep(0.2)  # the thread's zygote dies meanwhile
        runner.close()
        mine = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                mine += f.read().split()
        print(json.dumps({"verdicts": verdicts, "children": mine}))
    """)
    assert out["verdicts"] == ["OK"] * 30
    assert out["children"] == [], "zygotes or launchers were left as children"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_payload_holds_only_stdio(caller, launcher):
    """The descriptors the zygote receives for a run (report pipe, listener socket,
    cgroup files) never reach the payload: it could forge its own result."""
    out = run_as(caller, """
        import json
        from sandbox.api import Runner
        with Runner(profile="strict") as runner:
            result = runner.run(["python3", "-c",
                                 "import os; print(sorted(os.listdir('/proc/self/fd')))"])
        print(json.dumps(result.to_dict()))
    """, launcher)
    # 3 is the directory listdir itself opened.
    assert out["stdout"] == "['0', '1', '2', '3']\n", out


def test_the_task_limit_counts_as_in_a_cold_run(user_caller):
    """Without a cgroup, --pids is RLIMIT_NPROC, counted per user in a user namespace:
    each warm run has its own, so sbx's processes outside it do not count."""
    out = run_as(user_caller, """
        import json
        from sandbox.api import Runner, run
        fork = ("import os, time\\n"
                "n = 0\\n"
                "try:\\n"
                "    while n < 50:\\n"
                "        if os.fork() == 0: time.sleep(3); os._exit(0)\\n"
                "        n += 1\\n"
                "except OSError: pass\\n"
                "print(n)")
        options = dict(pids=10, idmap="self", capture=True)
        cold = run(["python3", "-c", fork], "strict", **options)
        with Runner(profile="strict", **options) as runner:
            warm = runner.run(["python3", "-c", fork])
        print(json.dumps([cold.to_dict(), warm.to_dict()]))
    """)
    cold, warm = out
    if cold["limits"]["pids_max"]["mechanism"] != "rlimit":
        pytest.skip("this host gives the test user a pids cgroup")
    assert int(cold["stdout"]) > 0
    assert int(warm["stdout"]) >= int(cold["stdout"]), (cold["stdout"], warm["stdout"])


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_callers_session_keyring_is_not_the_payloads(caller, launcher, key_policy):
    """Keyrings are checked by host uid, so a payload holding the caller's session
    keyring could read and change the caller's keys: each payload gets a new one."""
    find = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "found = libc.syscall(250, 10, -3, b'user', b'sbx-caller-secret', 0)\n"
        "print('found' if found > 0 else 'not found')\n"
    )
    out = run_as(caller, f"""
        import ctypes, json
        from sandbox.api import Runner, run
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(250, 1, b"sbx-test-session")  # join a named session keyring
        key = libc.syscall(248, b"user", b"sbx-caller-secret", b"secret", 6, -3)
        with Runner(seccomp={str(key_policy)!r}) as runner:
            warm = runner.run(["python3", "-c", {find!r}])
        cold = run(["python3", "-c", {find!r}], seccomp={str(key_policy)!r}, capture=True)
        print(json.dumps([key > 0, warm.to_dict(), cold.to_dict()]))
    """, launcher)
    added, warm, cold = out
    assert added, "the test could not add a key to its own session keyring"
    assert warm["stdout"] == "not found\n", warm
    assert cold["stdout"] == "not found\n", cold
