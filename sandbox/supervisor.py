"""The host side of a run: start the sandbox, watch it, tear it down, report.

`run(plan)` lists the steps in order. The supervisor stays outside the payload's pid
namespace, so nothing inside can signal it; it is a child subreaper, so the sandbox's
init becomes its direct child and can be killed and reaped without any pid-reuse race.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import select
import signal
import threading
import time
from collections.abc import Callable

from . import log as logs
from . import child, result
from .errors import ExecError, SandboxError, UsageError, kernel_error
from .kernel import fdpass, libc, procstat
from .plan import Plan
from .record import factory, record
from .record import replace as record_replace

log = logs.getLogger(__name__)

SETUP_TIMEOUT_S = 10.0
CPU_POLL_S = 0.01  # an overrun of --time is at most this times the cores in use
HOST_CPUS = os.cpu_count() or 1
READ_CHUNK = 65536
_subreaper_set = False


# Captured output is kept up to this much per stream when no --output-limit is set
# (the rest is drained and counted, not kept), so sbx's memory stays bounded.
CAPTURE_MAX_BYTES = 64 << 20


@record
class Stream:
    """One of the payload's stdout/stderr as the supervisor drains it."""

    name: str
    read_fd: int
    relay_fd: int | None  # where to copy it to (inherited stdio under a limit)
    capture: bool
    limit_bytes: int | None
    size: int = 0
    chunks: list = factory(list)
    should_stop: object = None  # set by the watch loop: checks the time limits

    def take(self, data: bytes) -> bool:
        """Account for data; False once the output limit is passed."""
        keep = self.limit_bytes if self.limit_bytes is not None else None
        if self.capture and keep is None:
            keep = CAPTURE_MAX_BYTES
        room = None if keep is None else keep - self.size
        self.size += len(data)
        if room is not None and len(data) > room:
            data = data[: max(room, 0)]
        if self.capture:
            if data:
                self.chunks.append(data)
        elif self.relay_fd is not None and data:
            _write_all(self.relay_fd, data, self.should_stop)
        return self.limit_bytes is None or self.size <= self.limit_bytes


PIPE_BUF = 4096  # a write of at most this much to a writable pipe never blocks


def _write_all(fd: int, data: bytes, should_stop=None) -> None:
    """Relay data to the caller's stdout or stderr. A slow reader must not stop sbx
    from enforcing limits: wait for room in short steps, asking should_stop() between
    them, and drop the rest once it says a limit has tripped."""
    view = memoryview(data)
    while view:
        if not select.select([], [fd], [], 0.05)[1]:
            if should_stop is not None and should_stop():
                return
            continue
        try:
            view = view[os.write(fd, view[:PIPE_BUF]) :]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return


@record
class Run:
    plan: Plan
    cgroup: object
    prep: child.Prepared
    control_w: int = -1
    report_r: int = -1
    listener_sock: object = None  # the supervisor's end of the fd-passing pair
    stage1_pid: int = 0
    init_pid: int = 0
    init_reaped: bool = False
    streams: list = factory(list)
    stdin_feed: tuple | None = None  # (fd, remaining bytes)
    lines: list = factory(list)
    partial: bytes = b""
    started: float = 0.0
    payload_started: float = 0.0
    init_setup_cpu_s: float = 0.0
    zygote: object = None  # the warm sandbox that launched the run, if any
    adopted: bool = False  # its init is known to be this process's child
    launch_cpu_s: float = 0.0  # stage 1's or the launcher's, charged to the cgroup too
    status: int | None = None
    max_rss_kib: int = 0
    tripped: tuple | None = None
    violation: str | None = None
    listener_fd: int | None = None
    exec_errno: int | None = None
    error: str | None = None
    cpu_seen_s: float = 0.0
    init_gone: bool = False
    root_mode: str = ""
    tree_times: tuple = (0.0, 0.0)
    peak_rss_bytes: int = 0  # without a cgroup: the largest VmHWM seen before the kill
    to_close: list = factory(list)  # the supervisor's own fds to close at the end
    ended: float = 0.0  # when the payload ended or was killed (before output drains)
    rusage: object = None


def run(
    plan: Plan, on_start: Callable[[int, object], None] | None = None, zygote=None
) -> result.Result:
    """Run plan's command in a fresh sandbox and return what happened.

    on_start(init_pid, cgroup) is called once the sandbox's init runs (instances
    record it to enter the sandbox and read its statistics later). With zygote (a
    sandbox.warm.Zygote for plan.warm_key), the run's namespaces are made by forking
    that warm sandbox instead of from scratch.
    """
    from .kernel import cgroups

    become_subreaper()
    facts = zygote.cgroup_facts if zygote is not None else None
    said = zygote.warnings_said if zygote is not None else None
    run_id = os.urandom(6).hex()
    cgroup = cgroups.open_run_cgroup(
        plan.limits, run_id, plan.require_cgroup, facts, said
    )
    r = None
    try:
        r = Run(plan, cgroup, _prepare(plan, cgroup))
        if zygote is None:
            _start(r)
        else:
            _start_warm(r, zygote)
        if on_start is not None:
            on_start(r.init_pid, cgroup)
        with _forwarding_signals(r):
            _watch(r)
        _teardown(r)
        return _report(r)
    finally:
        if r is not None:
            _kill(r)
            _close_fds(r)
            if plan.box_dir:
                # Also when the run failed or was interrupted: the payload is dead.
                _clear_setid_bits(plan.box_dir)
        cgroup.close()


@contextlib.contextmanager
def _forwarding_signals(r: Run):
    """SIGINT, SIGTERM and SIGHUP to sbx are passed to the payload through init; a
    second SIGINT stops waiting and kills the run. Only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = []

    def forward(sig: int, frame: object) -> None:
        if sig == signal.SIGINT and seen:
            raise KeyboardInterrupt
        seen.append(sig)
        os.kill(r.init_pid, sig)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare(plan: Plan, cgroup) -> child.Prepared:
    """The compiled seccomp filter (cached on disk) and the payload's rlimits."""
    seccomp_filter = None
    if plan.seccomp_policy is not None:
        from .kernel import seccomp

        seccomp_filter = seccomp.prepare(plan.seccomp_policy)
    return child.Prepared(seccomp_filter, tuple(payload_rlimits(plan, cgroup)))


def payload_rlimits(plan: Plan, cgroup, cpu_backstop: bool = True) -> list[tuple]:
    """The rlimits the payload runs under (a command run with `sbx enter` gets the
    same, without the per-process CPU backstop of a one-shot run)."""
    limits = plan.limits
    rlimits = list(cgroup.rlimits())
    if limits.nofile_max is not None:
        rlimits.append((resource.RLIMIT_NOFILE, limits.nofile_max, limits.nofile_max))
    if limits.fsize_max_bytes is not None:
        size = limits.fsize_max_bytes
        rlimits.append((resource.RLIMIT_FSIZE, size, size))
    if cpu_backstop and limits.cpu_time_s is not None:
        # A per-process backstop; the supervisor enforces the whole-run sum first.
        seconds = math.ceil(limits.cpu_time_s) + 1
        rlimits.append((resource.RLIMIT_CPU, seconds, seconds))
    return rlimits


def become_subreaper() -> None:
    global _subreaper_set
    if not _subreaper_set:
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        _subreaper_set = True


def _start(r: Run) -> None:
    """Fork stage 1, write its id maps, adopt its init. Raises SandboxError."""
    try:
        fds = _open_channels(r)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{e.filename}: a symbolic link; sbx does not write through one")
        raise UsageError(f"cannot open {e.filename}: {e.strerror}") from None
    me = os.getpid()
    r.started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child.stage1(r.plan, r.prep, fds, me, r.cgroup)
    r.stage1_pid = pid
    log.info("started the sandbox (stage 1 pid %d)", pid)
    for fd in fds.close_in_parent:
        os.close(fd)

    _expect(r, "U")
    write_id_maps(r.plan, pid)
    os.write(r.control_w, b"M")

    _take_init(r, _expect(r, "P"))
    os.wait4(pid, 0)
    r.stage1_pid = 0
    os.write(r.control_w, b"A")
    log.info("sandbox init is pid %d on the host", r.init_pid)


def _take_init(r: Run, line: str) -> None:
    _, pid, launch_cpu_s = line.split()
    r.init_pid, r.launch_cpu_s = int(pid), float(launch_cpu_s)


def _start_warm(r: Run, zygote) -> None:
    """Hand the run to a warm sandbox: its launcher joins the run's cgroup and makes
    the run's namespaces; init is adopted by this process once the zygote has reaped
    the launcher. Raises SandboxError."""
    try:
        fds = _open_channels(r)
    except OSError as e:
        raise UsageError(f"cannot open {e.filename}: {e.strerror}") from None
    # The zygote's own stdio is /dev/null: stdio the payload inherits is sent along.
    stdio = {}
    for name, std_fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        if getattr(fds, name) is None:
            stdio[name] = _inheritable_stdio(std_fd)
    r.to_close += [fd for fd in stdio.values() if fd is not None]
    r.started = time.monotonic()
    try:
        zygote.launch(r.plan, r.prep, record_replace(fds, **stdio), r.cgroup.procs_fds())
    finally:
        for fd in fds.close_in_parent:
            os.close(fd)
    _take_init(r, _expect(r, "P"))
    # The C init starts the payload without a word from here: the wall clock starts
    # now, before it can.
    r.payload_started = time.monotonic()
    r.zygote = zygote
    if not zygote.native:
        # The Python init arms its death signal once adopted; the C one watches the
        # control pipe instead, so it needs no word from here, and the adoption is
        # made sure of only before it is reaped (_kill).
        _adopt(r)
        os.write(r.control_w, b"A")
    log.info("sandbox init is pid %d on the host (warm)", r.init_pid)


def _adopt(r: Run) -> None:
    """Wait until the zygote has reaped the launcher: init is then this process's."""
    if r.zygote is not None and not r.adopted:
        r.zygote.wait_handed_over()
        r.adopted = True


def _inheritable_stdio(std_fd: int) -> int:
    """A duplicate of one of sbx's own stdio descriptors, or /dev/null if it is
    closed."""
    try:
        return os.dup(std_fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


@record
class _Fds(child.ChildFds):
    close_in_parent: tuple = ()


def _open_channels(r: Run) -> _Fds:
    plan = r.plan
    control_r, r.control_w = os.pipe()
    r.report_r, report_w = os.pipe()
    child_side = [control_r, report_w]
    sock_child = None
    if r.prep.seccomp_filter is not None and r.prep.seccomp_filter.notify:
        parent_sock, child_sock = fdpass.pair()
        r.listener_sock = parent_sock
        sock_child = child_sock.detach()
        child_side.append(sock_child)

    stdin_fd = _open_stdin(r, child_side)
    stdout_fd = _open_output(r, "stdout", plan.stdio.stdout_path, 1, child_side)
    stderr_fd = _open_output(r, "stderr", plan.stdio.stderr_path, 2, child_side)
    switch_to = plan.ids.switch_to if os.geteuid() == 0 else None
    if switch_to is not None:
        # Pipes made here belong to root, mode 0600: give the payload's ends to its
        # host id, so that it can reopen them (/dev/stdout) as any program may.
        for fd in (stdin_fd, stdout_fd, stderr_fd):
            if fd is not None and _is_pipe(fd):
                os.fchown(fd, *switch_to)

    return _Fds(
        control=control_r,
        report=report_w,
        stdin=stdin_fd,
        stdout=stdout_fd,
        stderr=stderr_fd,
        listener_sock=sock_child,
        close_in_parent=tuple(child_side),
    )


def _is_pipe(fd: int) -> bool:
    import stat

    return stat.S_ISFIFO(os.fstat(fd).st_mode)


def _open_stdin(r: Run, child_side: list) -> int | None:
    stdio = r.plan.stdio
    if stdio.stdin_data is not None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        r.stdin_feed = (write_fd, stdio.stdin_data)
        child_side.append(read_fd)
        return read_fd
    if stdio.stdin_path is not None:
        fd = os.open(stdio.stdin_path, os.O_RDONLY)
        child_side.append(fd)
        return fd
    return None


def _open_output(r: Run, name: str, path: str | None, std_fd: int, child_side: list):
    """The fd the payload gets for stdout or stderr. A file is handed over directly
    (its size is bounded by RLIMIT_FSIZE); capture and limits go through a pipe."""
    limit = r.plan.limits.output_max_bytes
    if path is not None:
        # Never through a symbolic link: one in a directory a payload could write to
        # would point sbx's write anywhere the caller may write.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if not path.startswith("/proc/self/fd/"):  # the caller's own descriptor
            flags |= os.O_NOFOLLOW
        fd = os.open(path, flags, 0o644)
        if limit is None:
            child_side.append(fd)
            return fd
        # Under an output limit, a file is written through the supervisor too.
        read_fd, write_fd = os.pipe()
        r.streams.append(Stream(name, read_fd, fd, False, limit))
        r.to_close.append(fd)
        child_side.append(write_fd)
        return write_fd
    if not r.plan.stdio.capture and limit is None:
        return None
    read_fd, write_fd = os.pipe()
    relay = None if r.plan.stdio.capture else std_fd
    r.streams.append(Stream(name, read_fd, relay, r.plan.stdio.capture, limit))
    child_side.append(write_fd)
    return write_fd


def _expect(r: Run, kind: str) -> str:
    """Wait for the next line from the sandbox; it must be of the given kind."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while not r.lines:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([r.report_r], [], [], remaining)[0]:
            raise SandboxError(f"the sandbox did not finish setting up in {SETUP_TIMEOUT_S} s")
        if not _read_report(r):
            break
    if not r.lines:
        why = "killed by its memory limit" if r.cgroup.oom_killed() else "it died"
        raise SandboxError(f"the sandbox could not be set up: {why}")
    return expected_line(r.lines.pop(0), kind)


def expected_line(line: str, kind: str, what: str = "sandbox") -> str:
    """line, if it is of the given kind; an error line (E) or any other kind raises
    SandboxError."""
    if line.startswith("E "):
        raise SandboxError(f"{what} setup failed: {line[2:]}")
    if not line.startswith(kind):
        raise SandboxError(f"{what} setup failed: unexpected message {line!r}")
    return line


def _read_report(r: Run) -> bool:
    data = os.read(r.report_r, 4096)
    if not data:
        return False
    r.partial += data
    *complete, r.partial = r.partial.split(b"\n")
    r.lines += [line.decode() for line in complete]
    return True


def write_id_maps(plan: Plan, pid: int) -> None:
    """Write the child's uid and gid maps (user_namespaces(7), "Defining user and group
    ID mappings"). An unprivileged writer must first deny setgroups for gid_map."""
    ids = plan.ids
    if ids.use_helpers:
        # Both setuid helpers at once, each started with posix_spawn (a vfork: cheap
        # from a large process), its stderr kept for the error message.
        helpers = []
        for tool, maps in (("newuidmap", ids.uid_map), ("newgidmap", ids.gid_map)):
            args = [str(n) for m in maps for n in (m.inside, m.outside, m.count)]
            command = [tool, str(pid), *args]
            log.debug("run %s", " ".join(command))
            helpers.append((tool, *_spawn_with_stderr(command)))
        failures = []
        for tool, helper_pid, err_r in helpers:
            with os.fdopen(err_r, "rb") as err:
                message = err.read().decode(errors="replace").strip()
            status = os.waitpid(helper_pid, 0)[1]
            if status != 0:
                failures.append(f"{tool} failed: {message or 'exit status ' + str(status)}")
        if failures:
            raise SandboxError(
                f"{'; '.join(failures)}; check your ranges in /etc/subuid and "
                "/etc/subgid, or run with --idmap self"
            )
        return
    try:
        _write_proc(pid, "setgroups", "deny")
        _write_proc(pid, "uid_map", ids.uid_map_text)
        _write_proc(pid, "gid_map", ids.gid_map_text)
    except OSError as e:
        hint = (
            "the kernel refused the id map; an unprivileged user may map only its own "
            "uid and gid (run `sbx doctor`)"
            if e.errno == errno.EPERM
            else ""
        )
        raise kernel_error(f"writing {e.filename}", e.errno or 0, hint) from e


def _spawn_with_stderr(command: list[str]) -> tuple[int, int]:
    """Start command (found on PATH) with stdin from /dev/null and stderr to a pipe;
    returns its pid and the pipe's read end."""
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
        )
    except OSError as e:
        os.close(err_r)
        raise SandboxError(f"cannot start {command[0]}: {e.strerror}") from e
    finally:
        os.close(err_w)
    return pid, err_r


def _write_proc(pid: int, name: str, text: str) -> None:
    path = f"/proc/{pid}/{name}"
    log.debug("write %s: %r", path, text)
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        e.filename = path
        raise
    try:
        os.write(fd, text.encode())
    except OSError as e:
        e.filename = path
        raise
    finally:
        os.close(fd)


def _watch(r: Run) -> None:
    """Until the payload exits or a limit trips: drain output, feed stdin, take
    seccomp violations, and check the wall clock and CPU time."""
    limits = r.plan.limits
    r.payload_started = r.payload_started or time.monotonic()
    wall_deadline = (
        None if limits.wall_timeout_s is None else r.payload_started + limits.wall_timeout_s
    )

    # The payload starts with nothing used: the first look is due when it could have
    # used up the limit on every CPU.
    first_s = max(CPU_POLL_S, (limits.cpu_time_s or 0.0) / HOST_CPUS)
    next_cpu_check = [r.payload_started + first_s]

    def limits_tripped() -> bool:
        now = time.monotonic()
        if wall_deadline is not None and now >= wall_deadline:
            _trip(r, "TLE", "wall")
        elif limits.cpu_time_s is not None and now >= next_cpu_check[0]:
            # Reading the run's CPU time costs a walk of /proc without a cgroup. The
            # run cannot use more than every CPU of the host meanwhile: look again
            # when it could first have reached the limit, and at most every
            # CPU_POLL_S (the overrun bound stays CPU_POLL_S times the CPUs in use).
            left_s = limits.cpu_time_s - _cpu_so_far(r)
            if left_s <= 0:
                _trip(r, "TLE", "cpu")
            next_cpu_check[0] = now + max(CPU_POLL_S, left_s / HOST_CPUS)
        return r.tripped is not None

    for stream in r.streams:
        stream.should_stop = limits_tripped
    poller = select.poll()
    handlers = {r.report_r: _on_report}
    for stream in r.streams:
        handlers[stream.read_fd] = _stream_handler(stream)
    if r.listener_sock is not None:
        handlers[r.listener_sock.fileno()] = _on_listener_sock
    if r.stdin_feed is not None:
        handlers[r.stdin_feed[0]] = _on_stdin_writable
        poller.register(r.stdin_feed[0], select.POLLOUT)
    for fd in handlers:
        if r.stdin_feed is None or fd != r.stdin_feed[0]:
            poller.register(fd, select.POLLIN)

    listening = False
    while not (r.status is not None or r.tripped or r.error or r.init_gone):
        timeout_s = 1.0
        if limits.cpu_time_s is not None:
            timeout_s = max(0.0, min(timeout_s, next_cpu_check[0] - time.monotonic()))
        if wall_deadline is not None:
            timeout_s = max(0.0, min(timeout_s, wall_deadline - time.monotonic()))
        for fd, events in poller.poll(timeout_s * 1000):
            if not handlers[fd](r, fd, events):
                poller.unregister(fd)
                handlers.pop(fd)
            if r.listener_fd is not None and not listening:
                listening = True
                handlers[r.listener_fd] = _on_violation
                poller.register(r.listener_fd, select.POLLIN)
        limits_tripped()
    for stream in r.streams:
        stream.should_stop = None  # what is left after the run is delivered whole


def _trip(r: Run, verdict: str, reason: str) -> None:
    if r.tripped is None:
        log.info("limit reached: %s (%s); killing the run", verdict, reason)
        r.tripped = (verdict, reason)


def _cpu_so_far(r: Run) -> float:
    cgroup_ns = r.cgroup.cpu_time_ns()
    if cgroup_ns is not None:
        r.cpu_seen_s = cgroup_ns / 1e9 - r.init_setup_cpu_s - r.launch_cpu_s
    else:
        r.cpu_seen_s = procstat.tree_cpu_s(r.init_pid)
    return r.cpu_seen_s


def _on_report(r: Run, fd: int, events: int) -> bool:
    alive = _read_report(r)
    _handle_lines(r)
    if not alive:
        r.init_gone = True
    return alive


def _handle_lines(r: Run) -> None:
    while r.lines:
        line = r.lines.pop(0)
        try:
            _handle_line(r, line)
        except ValueError:
            r.error = f"sandbox setup failed: a malformed message {line[:80]!r}"


def _handle_line(r: Run, line: str) -> None:
    """One line from init (only sbx's processes hold the report pipe)."""
    kind, _, rest = line.partition(" ")
    if kind == "S":
        status, rss, utime, stime = rest.split()
        r.status, r.max_rss_kib = int(status), int(rss)
        r.init_setup_cpu_s = float(utime) + float(stime)
    elif kind == "F":
        r.root_mode = rest
    elif kind == "X":
        r.exec_errno = int(rest)
    elif kind == "E":
        r.error = f"sandbox setup failed: {rest}"
    else:
        raise ValueError(line)


def _stream_handler(stream: Stream):
    def handle(r: Run, fd: int, events: int) -> bool:
        data = os.read(fd, READ_CHUNK)
        if not data:
            return False
        if not stream.take(data):
            _trip(r, "OLE", "output")
        return True

    return handle


def _on_stdin_writable(r: Run, fd: int, events: int) -> bool:
    write_fd, remaining = r.stdin_feed
    try:
        written = os.write(write_fd, remaining[:READ_CHUNK]) if remaining else 0
    except (BrokenPipeError, BlockingIOError) as e:
        written = 0 if isinstance(e, BlockingIOError) else len(remaining)
    remaining = remaining[written:]
    r.stdin_feed = (write_fd, remaining)
    if not remaining:
        os.close(write_fd)
        r.stdin_feed = None
        return False
    return True


def _on_listener_sock(r: Run, fd: int, events: int) -> bool:
    r.listener_fd = fdpass.receive_fd(r.listener_sock)
    return False


def _on_violation(r: Run, fd: int, events: int) -> bool:
    """A notification from the seccomp filter: a kill action was hit. A hang-up alone
    only says that every process using the filter is gone."""
    if not events & select.POLLIN:
        return False
    from .kernel import seccomp

    r.violation = seccomp.read_violation(fd)
    log.info("seccomp violation: %s; killing the run", r.violation)
    _trip(r, "SV", "seccomp")
    return False


def _teardown(r: Run) -> None:
    """Kill what is left of the run (its init's death kills the pid namespace), reap
    it, then drain what the payload wrote before it died."""
    r.ended = time.monotonic()
    if r.init_pid and r.cgroup.cpu_time_ns() is None:
        # Without a cgroup, the last look at the run's CPU time is from /proc, before
        # the kill: processes killed with the pid namespace are not reaped by
        # anything whose rusage reaches this supervisor.
        r.tree_times = procstat.tree_times(r.init_pid)
        r.peak_rss_bytes = procstat.tree_peak_rss_bytes(r.init_pid)
    _kill(r)
    for stream in r.streams:
        while data := os.read(stream.read_fd, READ_CHUNK):
            if not stream.take(data):
                _trip(r, "OLE", "output")
                break
    # Every writer of the report pipe is dead now: read it to its end.
    while _read_report(r):
        pass
    _handle_lines(r)


SWEEP_MAX_ENTRIES = 200_000


def _clear_setid_bits(top: str) -> None:
    """Clear setuid and setgid bits the payload left in --dir. nosuid keeps them inert
    inside the sandbox, but on the host a setuid file there runs as its owner, the
    caller. The payload is dead: nothing changes the tree while it is walked, and
    symbolic links are never followed."""
    import stat

    seen = 0
    for directory, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames] if directory == top else [*dirnames, *filenames]:
            path = os.path.join(directory, name) if name != "." else top
            seen += 1
            if seen > SWEEP_MAX_ENTRIES:
                log.warning("--dir holds over %d entries; setuid bits were cleared in the "
                            "first ones only", SWEEP_MAX_ENTRIES)
                return
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_mode & 0o6000 and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                log.warning("cleared the setuid/setgid bits of %s, left by the payload", path)
                try:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o6000)
                except OSError as e:
                    log.warning("could not clear the setuid bits of %s: %s", path, e.strerror)


def _kill(r: Run) -> None:
    if r.stage1_pid:
        os.kill(r.stage1_pid, signal.SIGKILL)
        os.waitpid(r.stage1_pid, 0)
        r.stage1_pid = 0
    if r.init_pid and not r.init_reaped:
        # init's death kills its pid namespace, and reaping init waits for every
        # process in it to be gone (pid_namespaces(7)); the cgroup is then empty,
        # unless something outside the namespace joined it.
        os.kill(r.init_pid, signal.SIGKILL)
        try:
            _adopt(r)
            _, _, usage = os.wait4(r.init_pid, 0)
        except (SandboxError, ChildProcessError) as e:
            # The zygote died before handing init over: init is killed, and reaped
            # by whoever adopted it. This run's result is already an error.
            log.warning("init %d was not reaped here: %s", r.init_pid, e)
            usage = None
        r.init_reaped = True
        r.rusage = usage
        if r.cgroup.pids():
            r.cgroup.kill()
        log.info("the run is over; nothing of it is left")


def _close_fds(r: Run) -> None:
    fds = [r.control_w, r.report_r, r.listener_fd] + [s.read_fd for s in r.streams]
    fds += r.to_close
    if r.stdin_feed is not None:
        fds.append(r.stdin_feed[0])
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    if r.listener_sock is not None:
        r.listener_sock.close()


def _report(r: Run) -> result.Result:
    if r.error is not None:
        raise SandboxError(r.error)
    if r.exec_errno is not None:
        raise ExecError(r.plan.argv[0], r.exec_errno)
    wall = (r.ended or time.monotonic()) - r.payload_started
    utime, stime = (r.rusage.ru_utime, r.rusage.ru_stime) if r.rusage else (0.0, 0.0)
    user = max(0.0, utime - r.init_setup_cpu_s, r.tree_times[0])
    system = max(stime, r.tree_times[1])
    total = max(user + system, r.cpu_seen_s)
    cgroup_ns = r.cgroup.cpu_time_ns()
    if cgroup_ns is not None:
        setup_s = r.init_setup_cpu_s + r.launch_cpu_s
        total = max(0.0, cgroup_ns / 1e9 - setup_s, user + system)
        user, system = _with_unreaped_share(r.cgroup, user, system, total)
    oom = r.cgroup.oom_killed()
    verdict, reason = result.decide(r.status, r.tripped, oom, r.violation)
    limits = r.plan.limits
    if verdict == "RE" and limits.cpu_time_s is not None and total >= limits.cpu_time_s:
        verdict, reason = "TLE", "cpu"
    peak = r.cgroup.peak_memory_bytes()
    out = result.Result(
        verdict=verdict,
        reason=reason,
        cpu_time_s={"user": round(user, 4), "system": round(system, 4), "total": round(total, 4)},
        wall_time_s=round(wall, 4),
        peak_memory_bytes=peak if peak is not None else max(
            r.max_rss_kib * 1024, r.peak_rss_bytes
        ),
        oom_killed=oom,
        limits=_limit_report(r),
        violation={"syscall": r.violation} if r.violation else None,
        rootfs={"name": r.plan.rootfs, "mode": r.root_mode},
        warnings=list(r.cgroup.warnings),
    )
    if r.status is not None:
        sig = result.signal_of(r.status)
        out.signal = result.signal_name(sig) if sig else None
        out.exit_code = None if sig else result.exit_of(r.status)
    elif r.tripped is not None or oom:
        # Killed before init could report it (by sbx for a limit, or by the kernel's
        # OOM killer): say so, and never let the exit status read as success.
        out.signal = "SIGKILL"
    for stream in r.streams:
        if stream.capture:
            setattr(out, stream.name, b"".join(stream.chunks))
    return out


def _with_unreaped_share(cgroup, user: float, system: float, total: float) -> tuple:
    """user and system from init's rusage miss processes killed before anything
    reaped them (a fork bomb stopped at its wall limit); the cgroup's total has them.
    The missing time is split as the cgroup's own user/system counters split."""
    missing = total - (user + system)
    if missing <= 0.001:
        return user, system
    split = cgroup.cpu_split()
    if not split or sum(split) <= 0:
        return user, system
    share = split[0] / sum(split)
    return user + missing * share, system + missing * (1 - share)


def _limit_report(r: Run) -> dict:
    limits = r.plan.limits
    mech = r.cgroup.mechanisms
    report = {
        "memory_max_bytes": (limits.memory_max_bytes, mech.get("memory", "none")),
        "pids_max": (limits.pids_max, mech.get("pids", "none")),
        "cpus": (limits.cpus, mech.get("cpus", "none")),
        "cpu_time_s": (limits.cpu_time_s, mech.get("cpu_time", "supervisor")),
        "wall_timeout_s": (limits.wall_timeout_s, "supervisor"),
        "output_max_bytes": (limits.output_max_bytes, "supervisor"),
        "fsize_max_bytes": (limits.fsize_max_bytes, "rlimit"),
        "nofile_max": (limits.nofile_max, "rlimit"),
        "tmpfs_size_bytes": (limits.tmpfs_size_bytes, "tmpfs"),
    }
    return {
        name: {"value": value, "mechanism": mechanism if value is not None else "none"}
        for name, (value, mechanism) in report.items()
    }
