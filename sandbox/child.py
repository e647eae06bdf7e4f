"""What runs on the sandbox side of fork(): three stages, each a process.

    supervisor (host)
      └─ stage 1: joins the run's cgroup, unshares every namespace, waits for its id
         │        maps, sets the hostname and loopback, forks stage 2 and exits
         └─ stage 2: PID 1 of the new pid namespace (adopted by the supervisor, a
            │        child subreaper); builds the root, pivots, forks the payload,
            │        reaps everything and reports the payload's wait status
            └─ stage 3: the payload: session, stdio, limits, ids, capabilities,
                        no_new_privs, seccomp last, then execve

Each stage talks to the supervisor over one pipe (`report`, close-on-exec) with short
text lines, and reads single bytes from `control`. Nothing here returns: every path
ends in os._exit or execve.
"""

from __future__ import annotations

import os
import resource
import select
import signal

import _socket

from .kernel import fdpass, libc, mounts, net
from .plan import Plan
from .record import record

NAMESPACES = (
    libc.CLONE_NEWUSER
    | libc.CLONE_NEWNS
    | libc.CLONE_NEWPID
    | libc.CLONE_NEWNET
    | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUTS
    | libc.CLONE_NEWCGROUP
)


@record(frozen=True)
class Prepared:
    """What the supervisor worked out for the payload before forking."""

    seccomp_filter: object  # sandbox.kernel.seccomp.Filter, or None
    rlimits: tuple  # (resource, soft, hard) triples


@record
class ChildFds:
    control: int  # read end: bytes from the supervisor
    report: int  # write end: lines to the supervisor (close-on-exec)
    stdin: int | None  # fds to become 0, 1, 2 (None: inherit)
    stdout: int | None
    stderr: int | None
    listener_sock: int | None  # socket that carries the seccomp listener fd


def _say(fds: ChildFds, line: str) -> None:
    os.write(fds.report, (line + "\n").encode())


def _await(fds: ChildFds, expected: bytes) -> None:
    if os.read(fds.control, 1) != expected:
        os._exit(1)  # the supervisor went away or gave up on this run


def _fail(fds: ChildFds, error: BaseException) -> None:
    message = str(error).replace("\n", " ")
    if os.environ.get("SBX_DEBUG_CHILD"):
        import traceback

        traceback.print_exc()
    try:
        _say(fds, f"E {type(error).__name__} {message}")
    finally:
        os._exit(125)


def stage1(plan: Plan, prep: Prepared, fds: ChildFds, supervisor_pid: int, cgroup) -> None:
    try:
        cgroup.join_self()
        # Keep only this run's descriptors: a caller running several sandboxes from
        # threads must not leak one run's pipes into another (they would hold its
        # output open until this run ends).
        _close_all_but({0, 1, 2, *_child_fds(fds)})
        switch_to = plan.ids.switch_to if os.geteuid() == 0 else None
        if switch_to is not None:
            places = _leave_root(plan, switch_to)
        # Die with the supervisor (set after any credential change, which clears it).
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != supervisor_pid:
            os._exit(1)
        libc.unshare(NAMESPACES)
        _say(fds, "U")
        _await(fds, b"M")
        if switch_to is None:
            places = mounts.prepare_transfers(plan.caller_paths)
        if plan.ids.init_is_root:
            _become_inside_root(supervisor_pid)
        _socket.sethostname(plan.hostname)
        net.loopback_up()
        init_pid = os.fork()
        if init_pid == 0:
            stage2(plan, prep, fds, places)
        _say(fds, f"P {init_pid}")
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the supervisor
        _fail(fds, e)


def _become_inside_root(supervisor_pid: int) -> None:
    """With a subordinate range mapped, sbx's own processes take root inside (the
    range's first id on the host) once the caller's paths are bound: the payload,
    which runs as the caller, then cannot signal or trace them."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    libc.prctl(libc.PR_SET_DUMPABLE, 1)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(1)


def _leave_root(plan: Plan, switch_to: tuple[int, int]) -> dict[str, str]:
    """A root caller's sandbox never runs as host root: bind the caller's paths into
    a private staging area while still root, then drop to the payload's host ids
    before unsharing, so the new user namespace belongs to an unprivileged id (and
    the files it creates have an owner mapped in it)."""
    os.setgroups([])
    libc.unshare(libc.CLONE_NEWNS)
    places = mounts.prepare_transfers(plan.caller_paths)
    uid, gid = switch_to
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A credential change made us non-dumpable; /proc/self must stay ours.
    libc.prctl(libc.PR_SET_DUMPABLE, 1)
    return places


def stage2(plan: Plan, prep: Prepared, fds: ChildFds, places: dict) -> None:
    """The sandbox's init. Never the payload: a payload as PID 1 would not die of the
    signals it does not handle (pid_namespaces(7))."""
    try:
        _await(fds, b"A")
        # Adopted by the supervisor: die with it. It still holds `control` open; a
        # hang-up there means it died before the death signal was armed.
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([fds.control], [], [], 0)[0]:
            os._exit(1)
        for sig in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
            signal.signal(sig, signal.SIG_IGN)
        root_mode = mounts.build_root(plan.mounts, places)
        mounts.enter_root(root_mode)
        _say(fds, f"F {root_mode}")
        payload_pid = os.fork()
        if payload_pid == 0:
            stage3(plan, prep, fds)
        _forward_signals(payload_pid)
        _reap_until(payload_pid, fds)
    except BaseException as e:  # noqa: BLE001
        _fail(fds, e)


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
FORWARDED += (signal.SIGUSR1, signal.SIGUSR2)


def _forward_signals(payload_pid: int) -> None:
    """The supervisor stops a run politely by signalling init (`sbx stop`, Ctrl-C):
    pass those signals on to the payload, as an init process does."""

    def forward(sig: int, frame: object) -> None:
        try:
            os.kill(payload_pid, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _reap_until(payload_pid: int, fds: ChildFds) -> None:
    """Reap every child (orphans are re-parented to us) until the payload exits, then
    report its status and exit: the kernel then kills what is left of the run."""
    for fd in (fds.stdin, fds.stdout, fds.stderr, fds.listener_sock):
        if fd is not None:
            os.close(fd)
    max_rss_kib = 0
    while True:
        pid, status, usage = os.wait4(-1, 0)
        max_rss_kib = max(max_rss_kib, usage.ru_maxrss)
        if pid == payload_pid:
            own = resource.getrusage(resource.RUSAGE_SELF)
            _say(fds, f"S {status} {max_rss_kib} {own.ru_utime} {own.ru_stime}")
            os._exit(0)


def stage3(plan: Plan, prep: Prepared, fds: ChildFds) -> None:
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}:
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        # Under memory pressure the kernel's OOM killer picks the payload, not init.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        _set_stdio(fds)
        _set_rlimits(prep)
        libc.drop_bounding_set()
        _set_ids(plan)
        os.chdir(plan.cwd)
        _close_other_fds(fds)
        libc.clear_capabilities()
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        _install_seccomp(prep, fds)
        _exec(plan, fds)
    except BaseException as e:  # noqa: BLE001
        _fail(fds, e)


def _set_stdio(fds: ChildFds) -> None:
    for target, fd in ((0, fds.stdin), (1, fds.stdout), (2, fds.stderr)):
        if fd is not None and fd != target:
            os.dup2(fd, target)
            os.close(fd)


def _set_rlimits(prep: Prepared) -> None:
    for resource_id, soft, hard in prep.rlimits:
        resource.setrlimit(resource_id, (soft, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _set_ids(plan: Plan) -> None:
    if plan.ids.use_helpers:
        os.setgroups([])
    os.setresgid(plan.ids.gid, plan.ids.gid, plan.ids.gid)
    os.setresuid(plan.ids.uid, plan.ids.uid, plan.ids.uid)


def _child_fds(fds: ChildFds) -> set[int]:
    named = (fds.control, fds.report, fds.stdin, fds.stdout, fds.stderr, fds.listener_sock)
    return {fd for fd in named if fd is not None}


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _close_other_fds(fds: ChildFds) -> None:
    keep = {0, 1, 2, fds.report}
    if fds.listener_sock is not None:
        keep.add(fds.listener_sock)
    _close_all_but(keep)


def _install_seccomp(prep: Prepared, fds: ChildFds) -> None:
    bpf_filter = prep.seccomp_filter
    if bpf_filter is None:
        return
    from .kernel import seccomp

    listener = seccomp.install(bpf_filter)
    if listener is not None and fds.listener_sock is not None:
        fdpass.send_fd(fds.listener_sock, listener)
        os.close(listener)


def _exec(plan: Plan, fds: ChildFds) -> None:
    env = dict(plan.env)
    command = plan.argv[0]
    if "/" in command:
        candidates = [command]
    else:
        path = env.get("PATH", "").split(":")
        candidates = [os.path.join(d or ".", command) for d in path]
    error = 2  # ENOENT
    for candidate in candidates:
        try:
            os.execve(candidate, plan.argv, env)
        except OSError as e:
            # Keep the most telling error, as execvp does: EACCES over ENOENT.
            if e.errno != 2 or error == 2:
                error = e.errno if e.errno is not None else error
    _say(fds, f"X {error}")
    os._exit(127)

