"""`sbx enter`: run a command inside a running instance.

The steps, in order:

    sbx (host)        reads the run record, opens init's namespaces, the cgroup's
     │                cgroup.procs files, and compiles the seccomp filter
     └─ joiner        joins the cgroup; a root caller drops to the instance's host
        │             id; setns: user first (the right to join the others comes
        │             from it), then mnt, pid, net, ipc, uts, cgroup; forks, since
        │             a pid namespace applies only to children; relays signals and
        │             the exit status
        └─ command    setsid, rlimits, the instance's uid and gid, no
                      capabilities, no_new_privs, seccomp last, chdir, execve

Joining the mount namespace puts the joiner at the namespace's root, which is the
instance's root after its pivot_root. For a root caller the instance's user
namespace belongs to the unprivileged host id the sandbox runs as; dropping to that
id first makes the joiner that namespace's owner, exactly as the sandbox's own
processes are, and leaves no trace of host root (not even its groups) inside.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys

from ..errors import SandboxError
from ..kernel import libc
from . import store
from .store import InstanceError

log = logging.getLogger(__name__)

# The order matters: the user namespace first (joining it gives the capabilities
# the other joins need), the pid namespace before the fork.
NAMESPACES = (
    ("user", libc.CLONE_NEWUSER),
    ("mnt", libc.CLONE_NEWNS),
    ("pid", libc.CLONE_NEWPID),
    ("net", libc.CLONE_NEWNET),
    ("ipc", libc.CLONE_NEWIPC),
    ("uts", libc.CLONE_NEWUTS),
    ("cgroup", libc.CLONE_NEWCGROUP),
)
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
RELAYED += (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
EXEC_FAILED = 127
SETUP_FAILED = 125
_CAPSET_NR = {"x86_64": 126, "aarch64": 91}[os.uname().machine]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Handles:
    """What the joiner needs, opened by sbx while it can still see the host."""

    def __init__(self, name: str, run: dict) -> None:
        self.run = run
        self.ns_fds: list[tuple[str, int, int]] = []
        self.cgroup_fds: list[int] = []
        self.seccomp_filter = None
        init_pid = run["init"]["pid"]
        try:
            for ns, flag in NAMESPACES:
                fd = os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
                self.ns_fds.append((ns, fd, flag))
        except OSError as e:
            self.close()
            raise SandboxError(
                f"cannot open the namespaces of instance {name!r} (init pid "
                f"{init_pid}): {e.strerror}"
            ) from e
        # The init we opened must still be the instance's init (no pid reuse).
        if not store.is_alive(run["init"]):
            self.close()
            raise InstanceError(f"instance {name!r} is not running (its init is gone)")
        dirs = dict.fromkeys(((run.get("cgroup") or {}).get("dirs") or {}).values())
        for directory in dirs:
            path = os.path.join(directory, "cgroup.procs")
            self.cgroup_fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        if run.get("seccomp_policy"):
            from ..kernel import seccomp

            # Nobody reads a listener for an entered command: kill actions kill it.
            self.seccomp_filter = seccomp.without_notify(
                seccomp.prepare(run["seccomp_policy"])
            )

    def close(self) -> None:
        for _, fd, _ in self.ns_fds:
            os.close(fd)
        for fd in self.cgroup_fds:
            os.close(fd)
        self.ns_fds, self.cgroup_fds = [], []


def enter(name: str, argv: list[str]) -> int:
    """Run argv inside the running instance NAME; returns its exit status (or
    128+signal), as `docker exec` does."""
    if not argv:
        raise InstanceError("no command given: sbx enter NAME -- COMMAND [ARG...]")
    with store.locked(name):
        view = store.observe(store.load(name))
        if view["state"] != "running":
            raise InstanceError(
                f"instance {name!r} is not running ({_describe(view)}); start it "
                f"with `sbx start {name}`"
            )
        handles = _Handles(name, view["run"])
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _joiner(handles, argv)
    handles.close()
    # Ctrl-C reaches the joiner too (same process group), which passes it on.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in RELAYED}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _describe(view: dict) -> str:
    if view["state"] == "created":
        return "created, never started"
    why = (view.get("exit") or {}).get("why")
    return f"exited: {why}" if why else view["state"]


def _joiner(handles: _Handles, argv: list[str]) -> None:
    """The process that joins the instance; it ends with the command's status."""
    try:
        run = handles.run
        for fd in handles.cgroup_fds:
            os.write(fd, b"0")
            os.close(fd)
        if os.geteuid() == 0:
            _become_owner(run)
        for _, fd, flag in handles.ns_fds:
            libc.setns(fd, flag)
            os.close(fd)
        child = os.fork()
        if child == 0:
            _command(run, handles.seccomp_filter, argv)
        for sig in RELAYED:
            signal.signal(sig, lambda s, f: _relay(child, s))
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    except BaseException as e:  # noqa: BLE001 - the exit status must say it failed
        _die(f"cannot enter the instance: {e}", SETUP_FAILED)


def _relay(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _become_owner(run: dict) -> None:
    """A root caller becomes the host id that owns the instance's user namespace."""
    os.setgroups([])
    target = run.get("switch_to")
    if target:
        os.setresgid(target[1], target[1], target[1])
        os.setresuid(target[0], target[0], target[0])
        libc.prctl(libc.PR_SET_DUMPABLE, 1)


def _command(run: dict, seccomp_filter, argv: list[str]) -> None:
    """The entered command: the same restrictions as the instance's payload."""
    try:
        os.setsid()
        for sig in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        for resource_id, soft, hard in run.get("rlimits", []):
            resource.setrlimit(resource_id, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # The bounding set needs CAP_SETPCAP, which a uid change may clear.
        for cap in range(libc.last_cap() + 1):
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        if run.get("use_id_helpers"):
            os.setgroups([])
        os.setresgid(run["gid"], run["gid"], run["gid"])
        os.setresuid(run["uid"], run["uid"], run["uid"])
        _clear_capabilities()
        try:
            os.chdir(run.get("cwd") or "/")
        except OSError:
            os.chdir("/")
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_filter is not None:
            from ..kernel import seccomp

            seccomp.install(seccomp_filter)
    except BaseException as e:  # noqa: BLE001
        _die(f"cannot set up the entered command: {e}", SETUP_FAILED)
    _exec(argv, dict(run.get("env") or []))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def _clear_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets (capset(2) may
    always lower them)."""
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if _libc.syscall(_CAPSET_NR, ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _exec(argv: list[str], env: dict) -> None:
    command = argv[0]
    if "/" in command:
        candidates = [command]
    else:
        path = env.get("PATH", "/usr/bin:/bin").split(":")
        candidates = [os.path.join(d or ".", command) for d in path]
    error = None
    for candidate in candidates:
        try:
            os.execve(candidate, argv, env)
        except OSError as e:
            if error is None or error.errno == 2:
                error = e
    reason = "not found" if error is None or error.errno == 2 else error.strerror
    code = EXEC_FAILED if error is None or error.errno == 2 else 126
    _die(f"cannot execute {command!r} inside the instance: {reason}", code)


def _die(message: str, code: int) -> None:
    try:
        os.write(2, f"sbx: error: {message}\n".encode())
    finally:
        os._exit(code)
