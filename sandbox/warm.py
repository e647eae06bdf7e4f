"""Warm sandboxes: the expensive half of a sandbox made once, the rest per run.

A cold run (supervisor.run) makes everything from scratch: a user namespace with its id
maps (newuidmap is a process start), a copy of the host's mount table, the root built
and pivoted into, the old root detached. A `Zygote` does that once and keeps the result:
a process in its own user and mount namespaces whose root is the plan's read-only
template (everything but /proc, /tmp, /box and /dev/shm). Each run it launches gets,
afresh: a mount namespace copied from the small template, and pid, network, IPC, UTS
and cgroup namespaces; its own /proc, /tmp, /box and /dev/shm; its own cgroup, rlimits
and seccomp filter, the supervisor, the same verdicts. What runs of one zygote share is
the user namespace and the read-only mounts, and a zygote launches one run at a time.

`Pool` keeps idle zygotes by `Plan.warm_key` and runs plans on them; plans that cannot
run warm (an image root, --dir) run cold. The API's `Runner` and `sbx batch` use one.
"""

from __future__ import annotations

import _socket
import os
import pickle
import select
import subprocess
import sys
import threading
import time

from . import child, supervisor
from . import log as logs
from .errors import ExecError, SandboxError
from .kernel import fdpass
from .plan import Plan
from .result import Result

log = logs.getLogger(__name__)

SETUP_TIMEOUT_S = 10.0
_LAYOUT = ("control", "report", "stdin", "stdout", "stderr", "listener_sock")


class Zygote:
    """One warm sandbox for plans with a given warm_key, owned by the thread that
    made it: it dies with that thread (PR_SET_PDEATHSIG), and with close()."""

    def __init__(self, plan: Plan) -> None:
        self.key = plan.warm_key
        if self.key is None:
            raise ValueError("this plan cannot run in a warm sandbox")
        supervisor.become_subreaper()
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                _zygote_command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if os.environ.get("SBX_DEBUG_CHILD") else subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.pid = self._process.pid
        self._sock = ours
        self._lines: list[str] = []
        self._partial = b""
        try:
            fdpass.send_message(ours, pickle.dumps(plan, protocol=5), [])
            self._expect("U")
            supervisor.write_id_maps(plan, self.pid)
            self._sock.sendall(b"M")
            self.mode = self._expect("Z").split()[1]
        except BaseException:
            self.close()
            raise
        log.info("warm sandbox ready (pid %d, %s root)", self.pid, self.mode)

    def launch(self, plan: Plan, prep: child.Prepared, fds, procs_fds: list[int]) -> None:
        """Send one run: its plan, its prepared filter and rlimits, and the
        descriptors its stages use (fds, a child.ChildFds) and its cgroup's
        cgroup.procs files. Raises SandboxError if the zygote is gone."""
        sent, layout = [], []
        for name in _LAYOUT:
            fd = getattr(fds, name)
            layout.append(None if fd is None else len(sent))
            if fd is not None:
                sent.append(fd)
        procs = list(range(len(sent), len(sent) + len(procs_fds)))
        body = pickle.dumps((plan, prep, (tuple(layout), procs)), protocol=5)
        try:
            fdpass.send_message(self._sock, body, sent + list(procs_fds))
        except OSError as e:
            raise SandboxError(f"the warm sandbox is gone ({e.strerror})") from e

    def alive(self) -> bool:
        return self.pid != 0 and self._process.poll() is None

    def close(self) -> None:
        """Kill the zygote; a launcher it is running dies with it. Runs already
        launched belong to their supervisor, which kills them."""
        if self.pid:
            self._process.kill()
            self._process.wait()
            self.pid = 0
        self._sock.close()

    def _expect(self, kind: str) -> str:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not self._lines:
            remaining = deadline - time.monotonic()
            ready = remaining > 0 and select.select([self._sock], [], [], remaining)[0]
            if not ready:
                raise SandboxError(
                    f"the warm sandbox did not finish setting up in {SETUP_TIMEOUT_S} s"
                )
            data = self._sock.recv(4096)
            if not data:
                raise SandboxError("the warm sandbox could not be set up: it died")
            *complete, self._partial = (self._partial + data).split(b"\n")
            self._lines += [line.decode() for line in complete]
        line = self._lines.pop(0)
        if line.startswith("E "):
            raise SandboxError(f"warm sandbox setup failed: {line[2:]}")
        if not line.startswith(kind):
            raise SandboxError(f"warm sandbox setup failed: unexpected {line!r}")
        return line


def _zygote_command(sock_fd: int) -> list[str]:
    """A fresh interpreter that imports only what a warm sandbox runs (no site
    packages, no environment): the package's own directory goes first on its path."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(child.__file__)))
    code = f"import sys; sys.path.insert(0, {top!r}); from sandbox import child; child.zygote_main()"
    return [sys.executable, "-I", "-S", "-c", code, str(sock_fd), str(os.getpid())]


class Pool:
    """Idle zygotes by warm_key, for one caller. run() may be called from several
    threads: each takes its own zygote (a zygote launches one run at a time), made on
    first need in the calling thread and kept for that thread's later runs."""

    def __init__(self) -> None:
        self._idle: dict[tuple, dict[int, Zygote]] = {}  # key -> thread id -> zygote
        self._lock = threading.Lock()
        self._closed = False

    def run(self, plan: Plan, on_start=None) -> Result:
        key = plan.warm_key
        if key is None:
            return supervisor.run(plan, on_start)
        zygote = self._take(key)
        if zygote is None:
            zygote = Zygote(plan)
        healthy = False
        try:
            result = supervisor.run(plan, on_start, zygote=zygote)
            healthy = True
            return result
        except ExecError:
            healthy = True  # the command was not found; the zygote is fine
            raise
        finally:
            if healthy and zygote.alive():
                self._put(key, zygote)
            else:
                zygote.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            zygotes = [z for by_thread in self._idle.values() for z in by_thread.values()]
            self._idle.clear()
        for zygote in zygotes:
            zygote.close()

    def _take(self, key: tuple) -> Zygote | None:
        with self._lock:
            zygote = self._idle.get(key, {}).pop(threading.get_ident(), None)
        if zygote is not None and not zygote.alive():
            # Its thread ended (it dies with the thread that made it) and this one
            # got the same id.
            zygote.close()
            return None
        return zygote

    def _put(self, key: tuple, zygote: Zygote) -> None:
        with self._lock:
            if not self._closed:
                old = self._idle.setdefault(key, {}).setdefault(threading.get_ident(), zygote)
                if old is zygote:
                    return
        zygote.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
