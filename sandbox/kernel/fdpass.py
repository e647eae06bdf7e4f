"""Passing one file descriptor between the payload and the supervisor (SCM_RIGHTS).

Written over the C module `_socket`: importing `socket` builds its enums at every start
of sbx, which costs more than everything here.
"""

from __future__ import annotations

import _socket
import array

_FD_SIZE = array.array("i").itemsize


def pair() -> tuple[_socket.socket, _socket.socket]:
    """A connected pair of datagram sockets, both close-on-exec."""
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)


def send_fd(sock_fd: int, fd: int) -> None:
    sock = _socket.socket(fileno=sock_fd)
    try:
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [fd]))]
        sock.sendmsg([b"L"], ancillary)
    finally:
        sock.detach()


def receive_fd(sock: _socket.socket) -> int | None:
    """One descriptor from the peer, or None if the message carried none."""
    _, ancillary, _, _ = sock.recvmsg(16, _socket.CMSG_SPACE(_FD_SIZE))
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            return fds[0] if fds else None
    return None
