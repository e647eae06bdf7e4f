"""Attack: reach the host over the network from inside.

The test runs its own servers on the host (a TCP server on 127.0.0.1 and an abstract
unix socket, both per network namespace) and the payload tries to reach them. Only
servers this test starts are ever aimed at.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid

CONNECT = """
import socket, sys
kind, address = sys.argv[1], sys.argv[2]
try:
    if kind == "tcp":
        s = socket.create_connection(("127.0.0.1", int(address)), timeout=3)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect("\\0" + address)
    s.sendall(b"escaped")
    print("connected", s.recv(16).decode())
except OSError as e:
    print("failed", type(e).__name__)
"""


class Server:
    """Accepts connections in a thread and records whether any arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                self.accepted += 1
                conn.sendall(b"host")

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=2)
        self.sock.close()


def run_client(caller, kind: str, address: str) -> str:
    done = caller.run(
        [
            "exec",
            "--json",
            "--wall",
            "20",
            "--",
            "python3",
            "-c",
            CONNECT,
            kind,
            address,
        ]
    )
    res = json.loads(done.stdout)
    assert res["verdict"] == "OK", res
    return res["stdout"].strip()


def test_host_loopback_tcp_server_is_not_reachable(caller):
    server = Server(socket.create_server(("127.0.0.1", 0)))
    port = server.sock.getsockname()[1]
    try:
        # The control: the server answers a client on the host.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as probe:
            assert probe.recv(4) == b"host"
        outcome = run_client(caller, "tcp", str(port))
    finally:
        server.close()
    assert outcome.startswith("failed"), outcome
    assert server.accepted == 1, "a connection from inside reached the host"


def test_host_abstract_unix_socket_is_not_reachable(caller):
    name = f"sbx-test-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen()
    server = Server(sock)
    try:
        outcome = run_client(caller, "unix", name)
    finally:
        server.close()
    assert outcome.startswith("failed"), outcome
    assert server.accepted == 0


def test_no_route_out_and_no_interface_but_lo(caller):
    code = (
        "import socket; print(socket.if_nameindex()); "
        "print(open('/proc/net/route').read().count('\\n') - 1)"
    )
    done = caller.run(["exec", "--json", "--", "python3", "-c", code])
    res = json.loads(done.stdout)
    lines = res["stdout"].splitlines()
    assert lines[0] == "[(1, 'lo')]"
    assert lines[1] == "0", "an IPv4 route leaves the sandbox"
