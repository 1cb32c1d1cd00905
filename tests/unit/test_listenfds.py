"""node.listenfds: the listening socket a supervisor binds is found again by its number in the environment, on the
same port; a port that differs (a reload changed it) or a descriptor that is not open here means none."""

from __future__ import annotations

import socket

from node.listenfds import DIMSE, DIMSE_TLS, ENV, bind, env_value, inherited


def test_inherited_finds_the_shared_socket_on_its_port() -> None:
    shared = bind("127.0.0.1", 0, backlog=8)
    try:
        port = shared.getsockname()[1]
        environ = {ENV: env_value({DIMSE: shared})}
        got = inherited(DIMSE, port, environ)
        assert got is not None and got.fileno() != shared.fileno() and got.getsockname()[1] == port
        assert got.getblocking() is False  # a listener that loses the race gets EAGAIN, not a blocked loop
        client = socket.create_connection(("127.0.0.1", port), timeout=5)  # one queue: accepted through the copy
        conn, _ = _accept(got)
        conn.close()
        client.close()
        got.close()
        assert shared.fileno() >= 0  # closing a listener's copy leaves the supervisor's open
        assert inherited(DIMSE, 0, environ) is not None  # port 0 in the config: whatever the supervisor bound
        assert inherited(DIMSE_TLS, port, environ) is None  # not bound
        assert inherited(DIMSE, port + 1 if port < 65535 else port - 1, environ) is None  # another port
        assert inherited(DIMSE, port, {}) is None  # no supervisor
    finally:
        shared.close()


def test_a_stale_descriptor_means_none() -> None:
    shared = bind("127.0.0.1", 0, backlog=8)
    value, port = env_value({DIMSE: shared}), shared.getsockname()[1]
    shared.close()
    assert inherited(DIMSE, port, {ENV: value}) is None


def _accept(sock: socket.socket) -> tuple[socket.socket, object]:
    import select

    select.select([sock], [], [], 5)
    return sock.accept()
