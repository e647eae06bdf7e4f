"""The per-instance supervisor: a detached process that runs one instance.

There is no daemon serving every instance. `sbx start` forks; the child starts a new
session and forks again, so the supervisor is no child of the command and has no
terminal. The supervisor then:

1. points its own stdio at the instance's supervisor.log (and /dev/null for stdin);
2. forks the log relay, which copies the payload's stdout and stderr into
   stdout.log and stderr.log, keeping at most `log_max_bytes` of each;
3. calls `supervisor.run(plan, on_start)`; on_start sends the run's record (init's
   pid, the cgroup, ...) to `sbx start` over a socket and waits for its word that
   the record is saved, so an instance never runs unrecorded;
4. when the run ends, records how it ended in state.json under the lock.

Killed with SIGKILL, the supervisor takes the instance with it: the sandbox's init
has PR_SET_PDEATHSIG set to SIGKILL relative to it, and init's death ends its pid
namespace. The state then reads as exited through `store.observe`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import time
import uuid

from .. import supervisor
from ..errors import ExecError, SandboxError, SbxError
from ..plan import Plan, Stdio
from ..record import replace
from . import store

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = supervisor.SETUP_TIMEOUT_S + 5.0
COMMIT_TIMEOUT_S = 10.0
LOG_MAX_BYTES = 8 << 20  # per stream, the current part and the previous one together
RELAY_CHUNK = 65536


# --- the `sbx start` side ------------------------------------------------------------


def launch(name: str, plan: Plan, log_max_bytes: int = LOG_MAX_BYTES):
    """Start NAME's supervisor detached. Returns (run record, commit): save the
    record, then call commit(); an uncommitted run is killed by its supervisor.
    Raises SandboxError (or ExecError) when the sandbox cannot be started."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            os.setsid()
            if os.fork() == 0:
                _supervise(name, plan, theirs, log_max_bytes)
        finally:
            os._exit(0)
    theirs.close()
    os.waitpid(pid, 0)
    message = _receive(ours, HANDSHAKE_TIMEOUT_S)
    if message is None:
        ours.close()
        raise SandboxError(
            f"the supervisor of instance {name!r} ended or went silent before the "
            f"sandbox ran; see {store.path_of(name, 'supervisor.log')}"
        )
    if not message.get("ok"):
        ours.close()
        if message.get("exec_errno") is not None:
            raise ExecError(plan.argv[0], message["exec_errno"])
        raise SandboxError(message.get("error", "the instance supervisor failed"))

    def commit() -> None:
        ours.sendall(b"commit\n")
        ours.close()

    return message["run"], commit


def _receive(sock: socket.socket, timeout_s: float) -> dict | None:
    data = b""
    deadline = time.monotonic() + timeout_s
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            return None
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


# --- the supervisor process ----------------------------------------------------------


def _supervise(name: str, plan: Plan, sock: socket.socket, log_max_bytes: int) -> None:
    """The body of the detached supervisor. Never returns."""
    _detach_stdio(store.path_of(name, "supervisor.log"), keep=sock.fileno())
    _log_to_stderr()
    run_id = uuid.uuid4().hex[:12]
    log.info("instance %s: run %s of %s", name, run_id, list(plan.argv))
    relay_pid, out_w, err_w = _start_log_relay(name, log_max_bytes, sock)
    # supervisor.run opens these paths: new descriptors of the relay's pipes.
    stdio = Stdio(
        stdout_path=f"/proc/self/fd/{out_w}", stderr_path=f"/proc/self/fd/{err_w}"
    )
    plan = replace(plan, stdio=stdio)
    committed = []
    early = _EarlySignals()
    log_pipes = [out_w, err_w]

    def on_start(init_pid: int, cgroup) -> None:
        # The sandbox holds its own copies of the log pipes now: the relay sees
        # end-of-file when the last process of the instance is gone.
        _close_all(log_pipes)
        early.init_started(init_pid)
        record = run_record(run_id, plan, init_pid, cgroup)
        _send(sock, {"ok": True, "run": record})
        if _receive_line(sock, COMMIT_TIMEOUT_S) != b"commit\n":
            raise SandboxError("`sbx start` went away before recording the instance")
        committed.append(True)
        sock.close()
        log.info("instance %s running: init is host pid %d", name, init_pid)

    outcome = _run(plan, on_start)
    early.done()
    _close_all(log_pipes)  # the sandbox may have failed before on_start
    if not committed:
        _send(sock, {"ok": False, **outcome})
    os.waitpid(relay_pid, 0)
    if committed:
        finish(name, run_id, outcome)
    os._exit(0)


class _EarlySignals:
    """`sbx stop` may come before supervisor.run forwards signals (it does so while
    it watches the run): hold SIGTERM, SIGINT and SIGHUP until init runs, then pass
    them to it, as the watch would. Through a pidfd: once init is reaped, a late
    signal finds no process rather than one that reused its pid."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.init_fd: int | None = None
        self.pending: list[int] = []
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.init_fd is None:
            self.pending.append(sig)
            return
        try:
            signal.pidfd_send_signal(self.init_fd, sig)
        except ProcessLookupError:
            pass

    def init_started(self, init_pid: int) -> None:
        from ..kernel import libc

        self.init_fd = libc.pidfd_open(init_pid)
        for sig in self.pending:
            self._on_signal(sig, None)

    def done(self) -> None:
        """The run is over: nothing left to pass signals to."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.init_fd is not None:
            os.close(self.init_fd)
            self.init_fd = None


def _run(plan: Plan, on_start) -> dict:
    """How the run ended, as recorded in state.json's `exit`."""
    try:
        result = supervisor.run(plan, on_start)
    except ExecError as e:
        log.error("%s", e)
        return _outcome("IE", "exec", e.exit_code, None, str(e), exec_errno=e.errno)
    except SbxError as e:
        log.error("%s", e)
        return _outcome("IE", "sandbox", None, None, str(e))
    except BaseException as e:  # noqa: BLE001 - the supervisor must record something
        log.exception("the instance supervisor failed")
        return _outcome("IE", "sandbox", None, None, f"{type(e).__name__}: {e}")
    why = result.verdict
    if result.reason is not None:
        why = f"{result.verdict} ({result.reason})"
    return _outcome(result.verdict, result.reason, result.exit_code, result.signal, why)


def _outcome(verdict, reason, exit_code, signal_name, why, exec_errno=None) -> dict:
    out = {
        "finished_at": time.time(),
        "verdict": verdict,
        "reason": reason,
        "exit_code": exit_code,
        "signal": signal_name,
        "why": why,
    }
    if exec_errno is not None:
        out["exec_errno"] = exec_errno
    if verdict == "IE":
        out["error"] = why
    return out


def finish(name: str, run_id: str, outcome: dict) -> None:
    """Record the end of run `run_id`, unless the instance was removed or started
    again meanwhile."""
    try:
        with store.locked(name):
            state = store.load(name)
            run = state.get("run") or {}
            if state["state"] != "running" or run.get("id") != run_id:
                log.info("instance %s changed meanwhile; its end is not recorded", name)
                return
            if run.get("killed_at") and outcome["exit_code"] is None:
                outcome["signal"] = outcome["signal"] or "SIGKILL"
                outcome["why"] = "killed by `sbx stop` after its grace period"
            elif run.get("stop_requested_at") and outcome["verdict"] != "IE":
                outcome["why"] = f"stopped by `sbx stop` ({outcome['why']})"
            state["state"] = "exited"
            state["exit"] = outcome
            store.save(name, state)
    except SbxError as e:
        log.info("instance %s: end not recorded: %s", name, e)


def run_record(run_id: str, plan: Plan, init_pid: int, cgroup) -> dict:
    """What `enter`, `stats` and `stop` need to know of a running instance."""
    switch_to = plan.ids.switch_to if os.geteuid() == 0 else None
    return {
        "id": run_id,
        "started_at": time.time(),
        "supervisor": store.identity(os.getpid()),
        "init": store.identity(init_pid),
        "cgroup": cgroup_record(cgroup),
        "mechanisms": dict(cgroup.mechanisms),
        "uid": plan.ids.uid,
        "gid": plan.ids.gid,
        "use_id_helpers": plan.ids.use_helpers,
        "switch_to": list(switch_to) if switch_to else None,
        "env": [list(pair) for pair in plan.env],
        "cwd": plan.cwd,
        "seccomp_policy": plan.seccomp_policy,
        "rlimits": [list(limit) for limit in payload_rlimits(plan, cgroup)],
        "memory_max_bytes": plan.limits.memory_max_bytes,
        "pids_max": plan.limits.pids_max,
        "stop_requested_at": None,
    }


def cgroup_record(cgroup) -> dict:
    """The run's cgroup directories, by controller ('unified' for cgroup v2)."""
    if getattr(cgroup, "path", None):
        return {"backend": cgroup.backend, "dirs": {"unified": cgroup.path}}
    return {"backend": cgroup.backend, "dirs": dict(getattr(cgroup, "dirs", {}) or {})}


def payload_rlimits(plan: Plan, cgroup) -> list[tuple[int, int, int]]:
    """The rlimits the payload runs under, as the supervisor sets them; a command
    run with `sbx enter` gets the same."""
    return supervisor.payload_rlimits(plan, cgroup, cpu_backstop=False)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError as e:
        log.info("cannot tell `sbx start`: %s", e)


def _receive_line(sock: socket.socket, timeout_s: float) -> bytes:
    if not select.select([sock], [], [], timeout_s)[0]:
        return b""
    return sock.recv(64)


def _detach_stdio(log_path: str, keep: int) -> None:
    """stdin from /dev/null, stdout and stderr to the supervisor's log; every other
    descriptor of `sbx start` closed (a caller reading its output must see EOF)."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out} - {0, 1, 2}:
        os.close(fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s sbx[%(process)d] %(levelname)s: %(message)s")
    )
    root = logging.getLogger("sandbox")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# --- the log relay -----------------------------------------------------------------


def _start_log_relay(name: str, max_bytes: int, sock: socket.socket):
    """Fork the process that keeps the payload's output. Returns (pid, stdout write
    end, stderr write end)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sock.close()
            os.close(out_w)
            os.close(err_w)
            targets = {
                out_r: store.path_of(name, "stdout.log"),
                err_r: store.path_of(name, "stderr.log"),
            }
            relay(targets, max_bytes)
        finally:
            os._exit(0)
    os.close(out_r)
    os.close(err_r)
    return pid, out_w, err_w


class CappedLog:
    """An append-only log that keeps its last `max_bytes`, roughly: when the current
    file reaches half of it, it becomes PATH.1 (replacing the older part)."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.part_bytes = max(max_bytes // 2, 1)
        self.fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, data: bytes) -> None:
        while data:
            size = os.fstat(self.fd).st_size
            room = self.part_bytes - size
            if room <= 0:
                self._rotate()
                continue
            os.write(self.fd, data[:room])
            data = data[room:]

    def _rotate(self) -> None:
        os.close(self.fd)
        os.replace(self.path, self.path + ".1")
        self.fd = self._open()

    def close(self) -> None:
        os.close(self.fd)


def relay(targets: dict[int, str], max_bytes: int) -> None:
    """Copy each pipe into its capped log until every pipe is at end-of-file."""
    logs = {fd: CappedLog(path, max_bytes) for fd, path in targets.items()}
    poller = select.poll()
    for fd in logs:
        poller.register(fd, select.POLLIN)
    while logs:
        for fd, _ in poller.poll():
            data = os.read(fd, RELAY_CHUNK)
            if data:
                logs[fd].write(data)
                continue
            poller.unregister(fd)
            logs.pop(fd).close()
            os.close(fd)
