"""`sbx exec` end to end, through the real CLI, as root and as the unprivileged user.

Each test starts real sandboxes on this kernel: ids, namespaces, the `host` root
filesystem, stdio, the JSON result, exit statuses and the refusal of bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import host_pids_with

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
RESULT_FIELDS = {
    "verdict",
    "exit_code",
    "signal",
    "reason",
    "cpu_time_s",
    "wall_time_s",
    "peak_memory_bytes",
    "oom_killed",
    "limits",
    "sbx_version",
    "stdout",
    "stderr",
}


# --- helpers


def sbx_json(caller, options: list[str], *command: str, **kw):
    """Run `sbx exec --json OPTIONS -- COMMAND` and parse the result object."""
    done = caller.run(["exec", "--json", *options, "--", *command], **kw)
    assert done.stdout, f"no JSON result (exit {done.returncode}): {done.stderr!r}"
    return done, json.loads(done.stdout)


def py(caller, code: str, *options: str, args: tuple = (), **kw):
    """Run a Python snippet inside; returns (CompletedProcess, result dict)."""
    return sbx_json(caller, list(options), "python3", "-c", code, *args, **kw)


def token() -> str:
    return f"sbx-test-{uuid.uuid4().hex[:12]}"


def status_ids(pid: int) -> tuple[list[int], list[int], int]:
    """(Uid fields, Gid fields, PPid) of a host process."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return (
        [int(v) for v in fields["Uid"]],
        [int(v) for v in fields["Gid"]],
        int(fields["PPid"][0]),
    )


@pytest.fixture
def shared_dir():
    """A host directory every caller can use, removed afterwards. Mode 0777: a root
    caller's payload runs as an unprivileged host id and must be able to write too."""
    path = Path(tempfile.mkdtemp(prefix="sbx-exec-test-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_cgroup_dirs(pid: int) -> list[Path]:
    """The per-run cgroup directories (named sbx-*) a host process is in."""
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "/sbx-" not in path:
                continue
            for name in controllers.removeprefix("name=").split(","):
                dirs.append(Path("/sys/fs/cgroup", name or "unified", path.lstrip("/")))
    return dirs


# --- 1. ids


def test_payload_ids_are_1000_for_every_caller(caller):
    done, res = py(caller, "import os; print(os.getuid(), os.getgid())")
    assert done.returncode == 0, done.stderr
    assert res["verdict"] == "OK"
    assert res["stdout"] == "1000 1000\n"


def test_uid_and_gid_options(caller):
    code = "import os; print(os.getuid(), os.getgid(), os.getgroups())"
    done, res = py(caller, code, "--uid", "1234", "--gid", "2345")
    assert res["verdict"] == "OK", res
    uid, gid, groups = res["stdout"].split(" ", 2)
    assert (uid, gid) == ("1234", "2345")
    assert "0" not in groups.strip("[]\n").split(", ")


def test_payload_and_init_are_never_host_root(caller):
    """Seen from the host: the payload and sbx's init inside run as the caller (or,
    for a root caller, an unprivileged id), never as uid or gid 0."""
    mark = token()
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    proc = caller.popen(
        ["exec", "--wall", "20", "--", "python3", "-c", code, mark],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with proc:
        try:
            assert proc.stdout.readline() == b"ready\n"
            (payload,) = host_pids_with(mark, argv0="python3")
            uids, gids, init = status_ids(payload)
            init_uids, init_gids, _ = status_ids(init)
            cgroups = run_cgroup_dirs(payload)
        finally:
            _, stderr = proc.communicate(timeout=20)
    assert host_pids_with(mark) == [], "a process of the run outlived sbx"
    assert [d for d in cgroups if d.exists()] == [], "the run's cgroups are left"
    for ids in (uids, gids, init_uids, init_gids):
        assert 0 not in ids, f"a sandbox process runs with host id 0: {ids}"
    if caller.uid != 0 and shutil.which("newuidmap") is None:
        assert set(uids) == {caller.uid} and set(gids) == {caller.gid}
    assert proc.returncode == 0, stderr


def test_files_written_to_dir_belong_to_an_unprivileged_host_id(caller, shared_dir):
    done, res = sbx_json(caller, ["--dir", str(shared_dir)], "touch", "made-inside")
    assert res["verdict"] == "OK", res
    owner = (shared_dir / "made-inside").stat()
    assert owner.st_uid != 0 and owner.st_gid != 0
    if caller.uid != 0 and shutil.which("newuidmap") is None:
        assert (owner.st_uid, owner.st_gid) == (caller.uid, caller.gid)


# --- 2. namespaces, hostname, network, processes


def test_every_namespace_is_new(caller):
    code = (
        "import json, os; print(json.dumps({n: os.readlink(f'/proc/self/ns/{n}') "
        f"for n in {NAMESPACES!r}}}))"
    )
    done, res = py(caller, code)
    assert res["verdict"] == "OK", res
    inside = json.loads(res["stdout"])
    for name in NAMESPACES:
        host = os.readlink(f"/proc/self/ns/{name}")
        assert inside[name] != host, f"the {name} namespace is the host's ({host})"


def test_hostname_is_sbx(caller):
    code = "import socket, os; print(socket.gethostname(), os.uname().nodename)"
    done, res = py(caller, code)
    assert res["stdout"] == "sbx sbx\n"


def test_only_loopback_is_there_and_up(caller):
    """The only interface is lo, it works (a server and a client inside talk over it),
    and there is no route anywhere else."""
    code = """
import socket
print(socket.if_nameindex())
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname(), timeout=2)
conn, _ = server.accept()
client.sendall(b"ping")
print(conn.recv(4).decode())
print(len(open("/proc/net/route").read().splitlines()) - 1)
"""
    done, res = py(caller, code)
    assert res["verdict"] == "OK", res
    assert res["stdout"].splitlines() == ["[(1, 'lo')]", "ping", "0"]


def test_only_the_runs_processes_are_visible(caller):
    """/proc inside lists only sbx's init (PID 1) and the payload's own processes."""
    code = """
import os, subprocess
child = subprocess.Popen(["sleep", "5"])
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(pids, os.getpid(), os.getppid(), child.pid)
child.kill()
"""
    done, res = py(caller, code)
    assert res["verdict"] == "OK", res
    pids, me, parent, child = res["stdout"].rsplit(" ", 3)
    assert json.loads(pids) == sorted([1, int(me), int(child)])
    assert int(parent) == 1 and int(me) != 1, "the payload must not be PID 1"


# --- 3. filesystem visibility


def test_callers_home_and_host_tmp_are_not_readable(caller):
    secret = token()
    home_file = caller.home / f".{secret}"
    tmp_file = Path("/tmp") / f"{secret}.txt"
    for path in (home_file, tmp_file):
        path.write_text(secret)
        os.chmod(path, 0o644)
        os.chown(path, caller.uid, caller.gid)
    code = """
import sys
for path in sys.argv[1:]:
    try:
        print(path, open(path).read())
    except OSError as e:
        print(path, type(e).__name__)
"""
    try:
        done, res = py(caller, code, args=(str(home_file), str(tmp_file)))
    finally:
        home_file.unlink()
        tmp_file.unlink()
    assert res["verdict"] == "OK", res
    assert secret not in res["stdout"].replace(str(home_file), "").replace(
        str(tmp_file), ""
    ), res["stdout"]


def test_private_host_paths_are_not_visible(caller):
    code = """
import os
for path in ("/root", "/home", "/run", "/var", "/run/systemd", "/var/run",
             "/tmp/.X11-unix", "/sys", "/boot", "/srv", "/mnt", "/opt"):
    print(path, os.path.exists(path))
print("tmp", os.listdir("/tmp"), "box", os.listdir("/box"))
"""
    done, res = py(caller, code)
    lines = res["stdout"].splitlines()
    assert all(line.endswith(" False") for line in lines[:-1]), lines
    assert lines[-1] == "tmp [] box []"


def test_every_mount_is_nosuid(caller):
    code = "print(open('/proc/self/mountinfo').read())"
    done, res = py(caller, code)
    lines = [line for line in res["stdout"].splitlines() if line]
    assert lines
    for line in lines:
        mount_options = line.split()[5].split(",")
        assert "nosuid" in mount_options, line


def test_writing_under_usr_fails(caller):
    mark = token()
    code = f"""
import errno, os
for path in ("/usr/{mark}", "/usr/bin/{mark}", "/usr/lib/{mark}", "/bin/{mark}"):
    try:
        open(path, "w").write("x")
        print(path, "written")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
try:
    open("/usr/bin/python3", "ab")
    print("python3 opened for writing")
except OSError as e:
    print("python3", errno.errorcode[e.errno])
"""
    done, res = py(caller, code)
    assert res["verdict"] == "OK", res
    for line in res["stdout"].splitlines():
        assert line.split()[-1] in ("EROFS", "EACCES"), line
    assert not any(Path(d, mark).exists() for d in ("/usr", "/usr/bin", "/usr/lib"))


def test_tmp_written_inside_is_gone_after(caller):
    mark = token()
    write = f"open('/tmp/{mark}', 'w').write('x'); import os; print(os.listdir('/tmp'))"
    done, res = py(caller, write)
    assert res["stdout"] == f"['{mark}']\n"
    done, res = py(caller, "import os; print(os.listdir('/tmp'))")
    assert res["stdout"] == "[]\n"
    assert not Path("/tmp", mark).exists()


# --- process hygiene


def test_process_hygiene(caller):
    """New session with no terminal, fds above 2 closed (even one the caller passed),
    no_new_privs, no capabilities, core dumps off."""
    leak_r, leak_w = os.pipe()
    code = """
import os, resource
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
print("nnp", status["NoNewPrivs"].strip())
for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
    print(cap, int(status[cap], 16))
print("session_leader", os.getsid(0) == os.getpid())
try:
    os.open("/dev/tty", os.O_RDWR)
    print("tty", "opened")
except OSError as e:
    print("tty", "none")
extra = []
for fd in range(3, 4096):
    try:
        os.fstat(fd)
        extra.append(fd)
    except OSError:
        pass
print("fds", extra)
print("core", resource.getrlimit(resource.RLIMIT_CORE))
"""
    try:
        done, res = py(caller, code, pass_fds=(leak_r, leak_w))
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert res["verdict"] == "OK", res
    assert res["stdout"].splitlines() == [
        "nnp 1",
        "CapInh 0",
        "CapPrm 0",
        "CapEff 0",
        "CapBnd 0",
        "CapAmb 0",
        "session_leader True",
        "tty none",
        "fds []",
        "core (0, 0)",
    ]


def test_environment_is_clean_and_env_adds(caller, monkeypatch):
    monkeypatch.setenv("SBX_TEST_SECRET", "must-not-leak")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    done, res = py(caller, code, "--env", "FOO=bar=baz", "--env", "EMPTY=")
    env = json.loads(res["stdout"])
    assert env["FOO"] == "bar=baz" and env["EMPTY"] == ""
    assert "SBX_TEST_SECRET" not in env
    assert "PYTHONPATH" not in env and "SBX_PROFILES_DIR" not in env
    assert env["HOME"] == "/box" and env["PATH"].startswith("/usr/local/bin:")


# --- --dir


def test_dir_is_bound_read_write_at_box(caller, shared_dir):
    (shared_dir / "input.txt").write_text("from the host\n")
    os.chmod(shared_dir / "input.txt", 0o644)
    code = (
        "import os; print(os.getcwd(), open('input.txt').read(), end=''); "
        "open('output.txt', 'w').write('from inside\\n')"
    )
    done, res = py(caller, code, "--dir", str(shared_dir))
    assert res["verdict"] == "OK", res
    assert res["stdout"] == "/box from the host\n"
    assert (shared_dir / "output.txt").read_text() == "from inside\n"


def test_box_is_an_empty_writable_tmpfs_without_dir(caller):
    code = "import os; print(os.getcwd(), os.listdir('.')); open('x', 'w').write('1')"
    done, res = py(caller, code)
    assert res["verdict"] == "OK", res
    assert res["stdout"] == "/box []\n"


# --- stdio


def test_stdio_is_inherited_by_default(caller):
    done = caller.run(
        ["exec", "--", "sh", "-c", "echo out; echo err >&2; cat"], input="in\n"
    )
    assert done.returncode == 0
    assert done.stdout == "out\nin\n"
    assert done.stderr == "err\n"


def test_stdin_stdout_stderr_files(caller, shared_dir):
    stdin = shared_dir / "in.txt"
    stdin.write_text("line one\nline two\n")
    os.chmod(stdin, 0o644)
    out, err = shared_dir / "out.txt", shared_dir / "err.txt"
    done = caller.run(
        [
            "exec",
            "--stdin",
            str(stdin),
            "--stdout",
            str(out),
            "--stderr",
            str(err),
            "--",
            "sh",
            "-c",
            "wc -l; echo oops >&2; exit 3",
        ]
    )
    assert done.returncode == 3
    assert done.stdout == "" and done.stderr == ""
    assert out.read_text().strip() == "2"
    assert err.read_text() == "oops\n"


def test_json_captures_output_and_has_the_result_fields(caller):
    code = "import sys; print('to out'); print('to err', file=sys.stderr)"
    done, res = py(caller, code)
    assert done.returncode == 0
    assert set(res) >= RESULT_FIELDS, RESULT_FIELDS - set(res)
    assert res["verdict"] == "OK" and res["exit_code"] == 0 and res["signal"] is None
    assert res["stdout"] == "to out\n" and res["stderr"] == "to err\n"
    assert set(res["cpu_time_s"]) == {"user", "system", "total"}
    assert 0 < res["wall_time_s"] < 10
    assert res["peak_memory_bytes"] > 0 and res["oom_killed"] is False
    for name, limit in res["limits"].items():
        assert set(limit) == {"value", "mechanism"}, name
        assert limit["mechanism"] in (
            "cgroup2",
            "cgroup1",
            "rlimit",
            "supervisor",
            "tmpfs",
            "none",
        ), (name, limit)


def test_result_file_holds_the_same_object(caller, shared_dir):
    path = shared_dir / "result.json"
    done, res = py(caller, "print('hi')", "--result", str(path))
    assert json.loads(path.read_text()) == res

    path.unlink()
    done = caller.run(["exec", "--result", str(path), "--", "sh", "-c", "exit 4"])
    assert done.returncode == 4
    saved = json.loads(path.read_text())
    assert saved["verdict"] == "RE" and saved["exit_code"] == 4


# --- exit statuses


def test_exit_code_is_the_payloads(caller):
    done, res = sbx_json(caller, [], "sh", "-c", "exit 7")
    assert done.returncode == 7
    assert (res["verdict"], res["exit_code"], res["signal"]) == ("RE", 7, None)


def test_fatal_signal_gives_128_plus_signal(caller):
    done, res = sbx_json(caller, [], "sh", "-c", "kill -TERM $$")
    assert done.returncode == 128 + signal.SIGTERM
    assert (res["verdict"], res["exit_code"], res["signal"]) == ("RE", None, "SIGTERM")


def test_command_not_found_is_127(caller):
    missing = token()
    done = caller.run(["exec", "--", missing])
    assert done.returncode == 127
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and missing in done.stderr
    assert "not found" in done.stderr

    done, res = sbx_json(caller, [], f"/usr/bin/{missing}")
    assert done.returncode == 127 and res["verdict"] == "IE"


@pytest.mark.parametrize("command", ["/etc/passwd", "/usr"])
def test_command_not_executable_is_126(caller, command):
    done = caller.run(["exec", "--", command])
    assert done.returncode == 126, done.stderr
    assert done.stderr.count("\n") == 1 and command in done.stderr


def test_sbx_failure_is_125_with_an_ie_result(user_caller):
    """Here the unprivileged user has no cgroup: --require-cgroup must refuse."""
    done = user_caller.run(["exec", "--json", "--require-cgroup", "--", "true"])
    if done.returncode == 0:
        pytest.skip("this host gives the unprivileged user a cgroup")
    assert done.returncode == 125
    res = json.loads(done.stdout)
    assert res["verdict"] == "IE" and res["error"]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sbx: error: ")


# --- bad input

BAD_INPUT = [
    (["--bogus"], "--bogus"),
    (["--wall", "abc"], "--wall"),
    (["--wall", "0"], "--wall"),
    (["--time", "-1"], "--time"),
    (["--memory", "12Q"], "--memory"),
    (["--tmpfs-size", "lots"], "--tmpfs-size"),
    (["--pids", "0"], "--pids"),
    (["--uid", "65534"], "--uid"),
    (["--gid", "x"], "--gid"),
    (["--env", "NOEQUALS"], "--env"),
    (["--dir", "/nonexistent/sbx-test"], "--dir"),
    (["--stdin", "/nonexistent/sbx-test"], "--stdin"),
    (["--stdout", "/nonexistent/sbx-test/out"], "--stdout"),
    (["--profile", "no-such-profile"], "no-such-profile"),
    (["--rootfs", "no-such-rootfs"], "no-such-rootfs"),
    (["--json=yes"], "--json"),
]


@pytest.mark.parametrize(("options", "named"), BAD_INPUT, ids=lambda v: str(v))
def test_bad_input_is_one_line_exit_2_and_nothing_runs(
    caller, shared_dir, options, named
):
    marker = shared_dir / "ran"
    mark = token()
    done = caller.run(
        ["exec", "--dir", str(shared_dir), *options, "--", "touch", "/box/ran", mark]
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("sbx: error: ") and named in done.stderr
    assert not marker.exists(), "the payload ran despite bad input"
    assert host_pids_with(mark) == [], "a process was left behind"


@pytest.mark.parametrize("args", [["exec"], ["exec", "--"], ["exec", "--wall", "1"]])
def test_missing_command_is_exit_2(caller, args):
    done = caller.run(args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sbx: error: ")
    assert "COMMAND" in done.stderr or "needs a value" in done.stderr


def test_unreadable_dir_is_exit_2(user_caller):
    private = Path(tempfile.mkdtemp(prefix="sbx-private-"))  # mode 0700, root's
    try:
        done = user_caller.run(["exec", "--dir", str(private), "--", "true"])
    finally:
        private.rmdir()
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--dir" in done.stderr


def test_help_lists_the_options(user_caller):
    done = user_caller.run(["exec", "--help"])
    assert done.returncode == 0
    text = done.stdout
    for flag in ("--wall", "--time", "--dir", "--uid", "--gid", "--env", "--json"):
        assert flag in text
