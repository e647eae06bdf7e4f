"""Passing one file descriptor between the payload and the supervisor (SCM_RIGHTS).

Written over the C module `_socket`: importing `socket` builds its enums at every start
of sbx, which costs more than everything here.
"""

from __future__ import annotations

import _socket
import array
import os

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


# A message with descriptors on a stream socket: an 8-byte length carrying the
# descriptors, then the body (which may be large: a run's files for /box).
_HEADER_BYTES = 8


def send_message(sock: _socket.socket, body: bytes, fds: list[int]) -> None:
    header = len(body).to_bytes(_HEADER_BYTES, "little")
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
    sent = sock.sendmsg([header], ancillary if fds else [])
    if sent != _HEADER_BYTES:
        sock.sendall(header[sent:])
    sock.sendall(body)


def receive_message(sock: _socket.socket, max_fds: int) -> tuple[bytes, list[int]] | None:
    """The next message and its descriptors; None when the peer has closed."""
    # Close-on-exec like every descriptor sbx opens: received without it, they would
    # reach the payload across its execve.
    header, ancillary, flags, _ = sock.recvmsg(
        _HEADER_BYTES, _socket.CMSG_SPACE(max_fds * _FD_SIZE), _socket.MSG_CMSG_CLOEXEC
    )
    if not header:
        return None
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    if flags & _socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError("more descriptors than expected came with a message")
    header += _receive_exactly(sock, _HEADER_BYTES - len(header))
    body = _receive_exactly(sock, int.from_bytes(header, "little"))
    return body, list(fds)


def _receive_exactly(sock: _socket.socket, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the peer closed in the middle of a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
