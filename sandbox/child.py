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

import errno
import gc
import os
import resource
import select
import signal

import _socket

from .errors import SandboxError
from .kernel import fdpass, libc, mounts, net
from .plan import Plan, run_only_mounts, template_mounts
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
        # sbx's own errors say what went wrong; anything else is named by its type.
        kind = "" if isinstance(error, SandboxError) else f"{type(error).__name__} "
        _say(fds, f"E {kind}{message}")
    finally:
        os._exit(125)


def stage1(plan: Plan, prep: Prepared, fds: ChildFds, supervisor_pid: int, cgroup) -> None:
    try:
        cgroup.join_self()
        # Keep only this run's descriptors: a caller running several sandboxes from
        # threads must not leak one run's pipes into another (they would hold its
        # output open until this run ends).
        _close_all_but({0, 1, 2, *_child_fds(fds)})
        places = _new_user_namespace(plan, fds, supervisor_pid, NAMESPACES)
        _start_init(plan, prep, fds, places, warm=False)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the supervisor
        _fail(fds, e)


def _new_user_namespace(plan: Plan, fds: ChildFds, supervisor_pid: int, flags: int):
    """Unshare flags, a new user namespace among them, as the id that is to own it;
    wait for the supervisor to write the id maps; bind the caller's paths. Returns
    where they were bound."""
    switch_to = plan.ids.switch_to if os.geteuid() == 0 else None
    if switch_to is not None:
        places = _leave_root(plan, switch_to)
    # Die with the supervisor (set after any credential change, which clears it).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(1)
    libc.unshare(flags)
    _say(fds, "U")
    _await(fds, b"M")
    if switch_to is None:
        places = mounts.prepare_transfers(plan.caller_paths)
    if plan.ids.init_is_root:
        _become_inside_root(supervisor_pid)
    return places


def _start_init(
    plan: Plan, prep: Prepared, fds: ChildFds, places: dict, warm: bool, joined_s=0.0
):
    """In the new namespaces: name the host, bring up loopback, fork the sandbox's
    init, report its pid and the CPU time this process used since it joined the run's
    cgroup (at joined_s of its own CPU time), and exit (init is adopted by the
    supervisor, a child subreaper)."""
    _socket.sethostname(plan.hostname)
    net.loopback_up()
    init_pid = os.fork()
    if init_pid == 0:
        stage2(plan, prep, fds, places, warm)
    own = resource.getrusage(resource.RUSAGE_SELF)
    _say(fds, f"P {init_pid} {own.ru_utime + own.ru_stime - joined_s}")
    os._exit(0)


# --- warm sandboxes (sandbox/warm.py) ----------------------------------------------
#
#   supervisor (host)
#     └─ zygote: its own user and mount namespaces, the plan's root built read-only
#        │       and pivoted into, once; then forks one launcher per request
#        └─ launcher: joins the run's cgroup, unshares the run's namespaces (mount,
#           │         pid, network, IPC, UTS, cgroup), forks init and exits
#           └─ stage 2 (init) mounts the run's fresh /proc, /tmp, /box and /dev/shm,
#              then goes on exactly as in a cold run

# What each warm run gets afresh. The user namespace (and so the id maps) and the
# read-only mounts are the zygote's, shared by the runs it launches one at a time.
RUN_NAMESPACES = NAMESPACES & ~libc.CLONE_NEWUSER
ZYGOTE_NAMESPACES = libc.CLONE_NEWUSER | libc.CLONE_NEWNS
MAX_LAUNCH_FDS = 16


def zygote(plan: Plan, sock_fd: int, supervisor_pid: int, launcher_fd: int | None) -> None:
    """Build the template root of plan.warm_key and serve launch requests on sock_fd
    until the supervisor closes it: with the C launcher (a descriptor of the compiled
    launcher.c, see kernel/native.py) by exec'ing it, else in Python. Set-up lines
    (U, Z, E) go over the same socket."""
    fds = ChildFds(sock_fd, sock_fd, None, None, None, None)
    try:
        keep = {0, 1, 2, sock_fd} | ({launcher_fd} if launcher_fd is not None else set())
        if launcher_fd is None:
            # What the Python launcher needs must be imported before the pivot hides
            # the package: stage 3 installs seccomp filters, and unpickling a plan
            # finds their class.
            import pickle  # noqa: F401

            from .kernel import seccomp  # noqa: F401

        _close_all_but(keep)
        # Received descriptors must never land on 0-2, which stage 3 overwrites.
        null = os.open("/dev/null", os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        if os.getpgid(0) != os.getpid():
            # A Ctrl-C on the caller's terminal is for the caller to handle.
            os.setsid()
        places = _new_user_namespace(plan, fds, supervisor_pid, ZYGOTE_NAMESPACES)
        # The host's /proc, kept open across the pivot: through it the zygote writes
        # the id maps of each run's own user namespace (the template's /proc shows
        # nothing of the zygote's pid namespace).
        proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        template = template_mounts(plan.mounts)
        mode = mounts.build_root(template, places)
        _mount_placeholder_proc(mounts.new_root(mode) + "/proc")
        mounts.enter_root(mode)
        if launcher_fd is not None:
            libc.keep_capabilities_across_exec()
            os.set_inheritable(sock_fd, True)
            os.set_inheritable(proc_fd, True)
            _say(fds, f"Z {mode} native")
            os.execve(launcher_fd, ["sbx-launcher", str(sock_fd), str(proc_fd)], {})
        _say(fds, f"Z {mode} python")
    except BaseException as e:  # noqa: BLE001
        _fail(fds, e)
    try:
        _serve(sock_fd, proc_fd)
    finally:
        os._exit(1)  # never back into the supervisor's code


def _mount_placeholder_proc(path: str) -> None:
    """The kernel lets a user namespace mount a new proc only where a proc is already
    fully visible in the mount namespace (mount_too_revealing in fs/namespace.c). The
    template keeps one at /proc, of a pid namespace that is empty once this returns;
    each run mounts its own over it."""
    pid = os.fork()
    if pid == 0:
        try:
            libc.unshare(libc.CLONE_NEWPID)
            inner = os.fork()
            if inner == 0:
                flags = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
                libc.mount("proc", path, "proc", flags, None)
                os._exit(0)
            os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
        except BaseException:  # noqa: BLE001
            os._exit(1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise OSError("cannot mount the template's placeholder /proc")


def _serve(sock_fd: int, proc_fd: int) -> None:
    """One launch at a time: receive a run's plan and descriptors, fork its launcher,
    write the id maps of the launcher's user namespace, reap it, then tell the
    supervisor (R, on the socket) that init is now its child."""
    import pickle  # loaded before the pivot (see zygote), like every module used here

    gc.freeze()  # what the zygote holds now stays shared with every fork
    maps = [_identity_map(proc_fd, name) for name in ("uid_map", "gid_map")]
    sock = _socket.socket(fileno=sock_fd)
    while True:
        message = fdpass.receive_message(sock, MAX_LAUNCH_FDS)
        if message is None:
            os._exit(0)
        body, received = message
        plan, prep, layout = pickle.loads(body)
        fds = ChildFds(*(None if i is None else received[i] for i in layout[0]))
        procs_fds = [received[i] for i in layout[1]]
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(proc_fd)
            _launch(plan, prep, fds, procs_fds, (up_w, down_r))
        for fd in (*received, up_w, down_r):
            os.close(fd)
        answer = b"F"
        if os.read(up_r, 1) == b"U":
            try:
                for name, text in zip(("uid_map", "gid_map"), maps):
                    _write_at(proc_fd, f"{pid}/{name}", text)
                answer = b"M"
            except OSError:
                pass  # the launcher reports it
        try:
            os.write(down_w, answer)
        except OSError:
            pass  # the launcher is gone; waitpid says so
        os.close(up_r)
        os.close(down_w)
        os.waitpid(pid, 0)
        os.write(sock_fd, b"R\n")


def _identity_map(proc_fd: int, name: str) -> str:
    """This process's id map, each range mapped onto itself: the map of a user
    namespace nested in this one, with the same ids."""
    fd = os.open(f"{os.getpid()}/{name}", os.O_RDONLY, dir_fd=proc_fd)
    try:
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    return "".join(f"{inside} {inside} {count}\n" for inside, _, count in lines)


def _write_at(dir_fd: int, path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _launch(
    plan: Plan, prep: Prepared, fds: ChildFds, procs_fds: list[int], zygote: tuple
) -> None:
    try:
        to_zygote, from_zygote = zygote
        keep = {0, 1, 2, *_child_fds(fds), *procs_fds, to_zygote, from_zygote}
        _close_all_but(keep)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # A user namespace of the run's own, nested in the zygote's, which writes
        # its maps (the same ids onto themselves): see launcher.c.
        libc.unshare(libc.CLONE_NEWUSER)
        os.write(to_zygote, b"U")
        if os.read(from_zygote, 1) != b"M":
            raise OSError(errno.EPERM, "the zygote could not write the run's id maps")
        os.close(to_zygote)
        os.close(from_zygote)
        for fd in procs_fds:
            try:
                os.write(fd, b"0")
            except OSError as e:
                raise OSError(e.errno, f"cannot join the run's cgroup: {e.strerror}") from e
            os.close(fd)
        own = resource.getrusage(resource.RUSAGE_SELF)
        libc.unshare(RUN_NAMESPACES)
        _start_init(plan, prep, fds, {}, True, own.ru_utime + own.ru_stime)
    except BaseException as e:  # noqa: BLE001
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


def stage2(plan: Plan, prep: Prepared, fds: ChildFds, places: dict, warm: bool) -> None:
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
        if warm:
            # In the zygote's root, already read-only: the run's own mounts on top.
            mounts.apply_mounts(run_only_mounts(plan.mounts), "", {})
            root_mode = "tmpfs"
        else:
            root_mode = mounts.build_root(plan.mounts, places)
            mounts.enter_root(root_mode)
        _place_files(plan)
        _say(fds, f"F {root_mode}")
        payload_pid = os.fork()
        if payload_pid == 0:
            stage3(plan, prep, fds)
        _forward_signals(payload_pid)
        _reap_until(payload_pid, fds)
    except BaseException as e:  # noqa: BLE001
        _fail(fds, e)


def _place_files(plan: Plan) -> None:
    if not plan.files:
        return
    try:
        mounts.place_files("/box", plan.files, (plan.ids.uid, plan.ids.gid))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SandboxError(
                f"the files for /box ({len(plan.files)} files) do not fit in its tmpfs:"
                " raise tmpfs_size (--tmpfs-size)"
            ) from e
        raise SandboxError(f"cannot place the files in /box: {e}") from e


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
        libc.join_new_session_keyring()
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


def exec_candidates(plan: Plan) -> list[str]:
    """Where execvp would look for the command, in order (PATH is the payload's)."""
    command = plan.argv[0]
    if "/" in command:
        return [command]
    path = dict(plan.env).get("PATH", "").split(":")
    return [os.path.join(d or ".", command) for d in path]


def _exec(plan: Plan, fds: ChildFds) -> None:
    env = dict(plan.env)
    error = 2  # ENOENT
    for candidate in exec_candidates(plan):
        try:
            os.execve(candidate, plan.argv, env)
        except OSError as e:
            # Keep the most telling error, as execvp does: EACCES over ENOENT.
            if e.errno != 2 or error == 2:
                error = e.errno if e.errno is not None else error
    _say(fds, f"X {error}")
    os._exit(127)

