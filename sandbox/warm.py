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
import functools
import os
import select
import signal
import struct
import threading
import time

from . import child, supervisor
from . import log as logs
from .errors import ExecError, SandboxError
from .kernel import cgroups, fdpass, libc, mounts, native, procstat
from .plan import Plan, run_only_mounts
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
        # What this host's cgroups offer, read once for all the zygote's runs, and
        # the weakened limits already logged for them (each Result still has all).
        self.cgroup_facts = cgroups.read_facts()
        self.warnings_said: set = set()
        supervisor.become_subreaper()
        launcher = native.launcher_fd()
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        me = self.owner = os.getpid()
        # It dies with the thread that makes it (PR_SET_PDEATHSIG): only that very
        # thread may use it, not a later one that got the same thread id.
        self.thread = threading.current_thread()
        self.pid = os.fork()
        if self.pid == 0:
            child.zygote(plan, theirs.detach(), me, launcher)
        theirs.close()
        self._sock = ours
        self._lines: list[str] = []
        self._partial = b""
        try:
            self._expect("U")
            supervisor.write_id_maps(plan, self.pid)
            self._sock.sendall(b"M")
            _, self.mode, kind = self._expect("Z").split()
            self.native = kind == "native"
        except BaseException:
            self.close()
            raise
        log.info("warm sandbox ready (pid %d, %s root)", self.pid, self.mode)

    def launch(self, plan: Plan, prep: child.Prepared, fds, procs_fds: list[int]) -> None:
        """Send one run: its plan, its prepared filter and rlimits, the descriptors
        its stages use (fds, a child.ChildFds), and the files through which its
        launcher joins the run's cgroup. Raises SandboxError if the zygote is gone."""
        sent, layout = [], []
        for name in _LAYOUT:
            fd = getattr(fds, name)
            layout.append(None if fd is None else len(sent))
            if fd is not None:
                sent.append(fd)
        procs = list(range(len(sent), len(sent) + len(procs_fds)))
        if self.native:
            body = native_spec(plan, prep, layout, procs)
        else:
            import pickle

            body = pickle.dumps((plan, prep, (tuple(layout), procs)), protocol=5)
        try:
            fdpass.send_message(self._sock, body, sent + list(procs_fds))
        except OSError as e:
            raise SandboxError(f"the warm sandbox is gone ({e.strerror})") from e

    def wait_handed_over(self) -> None:
        """Wait until the zygote has reaped the run's launcher: the run's init is then
        this process's child (it is a child subreaper), and may arm its death signal."""
        self._expect("R")

    def alive(self) -> bool:
        if self.pid == 0 or os.getpid() != self.owner:
            return False  # gone, or this is a fork of the process that made it
        if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            return True
        # Dead (its thread ended) and now reaped: its pid may be reused at once, so
        # it is never signalled again.
        self.pid = 0
        _reap_orphaned_standbys()
        return False

    def close(self) -> None:
        """Kill the zygote (call it between runs); the launcher it keeps waiting
        dies with it, and is reaped here. Runs already launched belong to their
        supervisor, which kills them."""
        if self.pid and os.getpid() == self.owner:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            _reap_orphaned_standbys()
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
        return supervisor.expected_line(self._lines.pop(0), kind, "warm sandbox")


def _reap_orphaned_standbys() -> None:
    """A zygote's waiting launcher dies with the zygote (its death signal) and, this
    process being a child subreaper, becomes a zombie child of this process: reap the
    launchers orphaned so, found by the name they carry only while waiting for a run
    (launcher.c), among this process's own children (whose pids cannot be reused
    before they are reaped)."""
    for pid in procstat.children(os.getpid()):
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        # A launcher that died mid-launch with its zygote is orphaned as well: as a
        # child of this process, a launcher can only be such an orphan.
        if name != b"sbx-standby" and not (name == b"sbx-launcher" and state == b"Z"):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass  # reaped meanwhile, by another thread closing another zygote


def native_spec(plan: Plan, prep: child.Prepared, layout: list, procs: list) -> bytes:
    """One run for launcher.c, in the order its parse() reads: descriptor indices,
    the hostname, the run's mounts, the files for /box, the payload's ids, cwd, argv,
    environment and exec candidates, its rlimits, the seccomp program (and the one to
    load where a listener cannot be had), and the signals init forwards. The parts
    every run of a batch shares (mounts, seccomp program) are encoded once."""
    out = _Spec()
    for index in (*layout, len(procs)):
        out.number(-1 if index is None else index, "<i")
    for index in procs:
        out.number(index, "<i")
    out.extend(_encoded_once(plan.mounts, plan.hostname, _mounts_part))
    out.number(plan.ids.uid), out.number(plan.ids.gid), out.number(len(plan.files))
    for name, data in plan.files:
        out.text(f"/box/{name}"), out.text(data)
    out.number(plan.ids.uid), out.number(plan.ids.gid)
    out.number(int(plan.ids.use_helpers))
    out.text(plan.cwd)
    candidates = child.exec_candidates(plan)
    env = [f"{key}={value}" for key, value in plan.env]
    for items in (plan.argv, env, candidates):
        out.number(len(items))
        for item in items:
            out.text(item)
    out.number(len(prep.rlimits))
    for resource_id, soft, hard in prep.rlimits:
        out.number(resource_id), out.number(soft & _U64, "<Q")
        out.number(hard & _U64, "<Q")
    out.extend(_encoded_once(prep.seccomp_filter, None, _filter_part))
    return bytes(out)


class _Spec(bytearray):
    def number(self, value: int, fmt: str = "<I") -> None:
        self.extend(struct.pack(fmt, value))

    def text(self, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.number(len(data))
        self.extend(data)


def _mounts_part(plan_mounts: tuple, hostname: str) -> bytes:
    out = _Spec()
    out.text(hostname)
    steps = run_only_mounts(plan_mounts)
    out.number(len(steps))
    for m in steps:
        source, fstype, flags, data = mounts.filesystem_mount(m)
        out.text(source), out.text(m.target), out.text(fstype), out.number(flags)
        out.text(data)
    return bytes(out)


def _filter_part(bpf, _unused: None) -> bytes:
    out = _Spec()
    out.text(b"" if bpf is None else bpf.bpf)
    out.text(b"" if bpf is None or not bpf.notify else _without_notify(bpf).bpf)
    out.number(int(bpf is not None and bpf.notify)), out.number(_last_cap())
    out.number(len(child.FORWARDED))
    for sig in child.FORWARDED:
        out.number(int(sig))
    return bytes(out)


# Encoded parts by the identity of what they encode (kept alive here, so an id is
# never reused while its entry stands): a batch's runs share their base plan's mounts
# and the prepared filter, and encoding them is most of a spec's cost.
_ENCODED: dict[int, tuple[object, object, bytes]] = {}
_ENCODED_MAX = 64


def _encoded_once(value, extra, encode) -> bytes:
    """encode(value, extra), or what it gave for this very value and an equal extra."""
    known = _ENCODED.get(id(value))
    if known is not None and known[0] is value and known[1] == extra:
        return known[2]
    data = encode(value, extra)
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.clear()
    _ENCODED[id(value)] = (value, extra, data)
    return data


_U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=16)
def _without_notify(f):
    from .kernel import seccomp

    return seccomp.without_notify(f)


@functools.lru_cache(maxsize=1)
def _last_cap() -> int:
    return libc.last_cap()


class Pool:
    """Idle zygotes by warm_key, for one caller. run() may be called from several
    threads: each takes its own zygote (a zygote launches one run at a time), made on
    first need in the calling thread and kept for that thread's later runs."""

    def __init__(self) -> None:
        self._idle: dict[int, dict[int, Zygote]] = {}  # key -> thread id -> zygote
        self._lock = threading.Lock()
        self._closed = False
        # Plans made from one base share its mounts tuple: a plan's warm_key (a walk
        # over every mount) is worked out and numbered once per tuple, not per run.
        self._keys: dict[int, tuple] = {}  # id(mounts) -> (mounts, ids, number)
        self._numbers: dict[tuple, int] = {}  # warm_key -> number

    def run(self, plan: Plan, on_start=None) -> Result:
        key = self._warm_key(plan)
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

    def _warm_key(self, plan: Plan) -> int | None:
        """A number standing for plan.warm_key, or None for a plan that runs cold."""
        if not plan.runs_warm:
            return None
        with self._lock:
            known = self._keys.get(id(plan.mounts))
            if known is None or known[0] is not plan.mounts or known[1] is not plan.ids:
                number = self._numbers.setdefault(plan.warm_key, len(self._numbers))
                known = (plan.mounts, plan.ids, number)
                self._keys[id(plan.mounts)] = known
            return known[2]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            zygotes = [z for by_thread in self._idle.values() for z in by_thread.values()]
            self._idle.clear()
        for zygote in zygotes:
            zygote.close()

    def _take(self, key: int) -> Zygote | None:
        with self._lock:
            zygote = self._idle.get(key, {}).pop(threading.get_ident(), None)
        if zygote is not None and (
            zygote.thread is not threading.current_thread() or not zygote.alive()
        ):
            # Its thread ended, and this one got the same thread id: the zygote is
            # dead or about to die with that thread.
            zygote.close()
            return None
        return zygote

    def _put(self, key: int, zygote: Zygote) -> None:
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
