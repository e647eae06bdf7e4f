"""Run commands under a seccomp policy the way sbx's payload will, without sbx.

    python -m tests.probes.harness POLICY [--mark] -- CMD [ARG...] [--- CMD ...]

For each command (several are separated by a lone ``---``): fork; the child sets
no_new_privs, installs the filter with sandbox.kernel.seccomp.install, passes the
listener fd to the parent with sendmsg, and execs the command; the parent watches
the listener and the child. One JSON line per command on stdout:

    {"cmd": [...], "exit": 0}           exited with this status
    {"cmd": [...], "signal": 31}        killed by this signal
    {"cmd": [...], "violation": "ptrace"}  a kill action, named by the supervisor

POLICY "none" runs without a filter (the baseline). ``--mark`` rewrites every errno
the filter returns to 200 + errno (EPERM -> 201, ENOSYS -> 238), so a test can tell
a refusal by the filter from the same errno coming from the kernel itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
from sandbox.record import replace

from sandbox.kernel import seccomp

PR_SET_NO_NEW_PRIVS = 38
MARK_BASE = 200
TIMEOUT_S = 30


def mark_errnos(f: seccomp.Filter) -> seccomp.Filter:
    out = bytearray(f.bpf)
    for offset in range(0, len(out), seccomp.SOCK_FILTER.size):
        code, jt, jf, k = seccomp.SOCK_FILTER.unpack_from(out, offset)
        if code == seccomp.BPF_RET_K and k & 0xFFFF0000 == seccomp.RET_ERRNO:
            k = seccomp.RET_ERRNO | (MARK_BASE + (k & 0xFFFF))
            seccomp.SOCK_FILTER.pack_into(out, offset, code, jt, jf, k)
    return replace(f, bpf=bytes(out))


def child(f: seccomp.Filter | None, cmd: list[str], sock: socket.socket) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        listener = seccomp.install(f) if f is not None else None
        fds = [listener] if listener is not None else []
        socket.send_fds(sock, [b"L" if fds else b"-"], fds)
        if listener is not None:
            os.close(listener)
        os.execv(cmd[0], cmd)
    except BaseException as exc:  # report and leave without running atexit hooks
        os.write(2, f"harness child: {exc}\n".encode())
    os._exit(127)


def supervise(pid: int, sock: socket.socket) -> dict:
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    listener = fds[0] if fds else None
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if listener is not None:
        poller.register(listener, select.POLLIN)
    result: dict = {}
    while not result:
        events = dict(poller.poll(TIMEOUT_S * 1000))
        if not events:
            result["timeout"] = True
        elif events.get(listener, 0) & select.POLLIN:
            # A pending notification: a kill action. The call stays blocked.
            result["violation"] = seccomp.read_violation(listener)
        elif events.get(listener, 0) & select.POLLHUP:
            # No task uses the filter any more (the child is exiting): not a
            # violation; wait for the exit itself.
            poller.unregister(listener)
        elif pidfd in events:
            break
    if result:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if not result:
        if os.WIFSIGNALED(status):
            result["signal"] = os.WTERMSIG(status)
        else:
            result["exit"] = os.WEXITSTATUS(status)
    for fd in (pidfd, listener):
        if fd is not None:
            os.close(fd)
    return result


def run_one(f: seccomp.Filter | None, cmd: list[str]) -> dict:
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        child(f, cmd, child_sock)
    child_sock.close()
    with parent_sock:
        return {"cmd": cmd, **supervise(pid, parent_sock)}


def main(argv: list[str]) -> int:
    split = argv.index("--")
    options, rest = argv[:split], argv[split + 1 :]
    policy = options[0]
    f = None if policy == "none" else seccomp.prepare(policy)
    if f is not None and "--mark" in options:
        f = mark_errnos(f)
    commands, current = [], []
    for arg in rest + ["---"]:
        if arg == "---":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    for cmd in commands:
        print(json.dumps(run_one(f, cmd)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
