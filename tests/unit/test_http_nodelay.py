"""The node's HTTP connections have TCP_NODELAY (node.httpguard.no_delay), over HTTP and HTTPS, checked on the real
uvicorn server's accepted sockets. Without it every response after the first on a kept-alive connection waited
~40 ms for the client's delayed ACK (measured: 43-44 ms a request for /healthz, QIDO-RS and 401s alike, against
~0.5 ms), because asyncio sets the option only on sockets whose proto is IPPROTO_TCP and the node's listening
socket (socket.create_server, or one inherited from the supervisor) has proto 0."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from node.config import NodeConfig
from node.http import HttpServer
from tests.conftest import free_port
from tests.tlscerts import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_accepted_http_connections_have_tcp_nodelay(tmp_path: Path, pki: Pki, https: bool) -> None:
    node: dict[str, object] = {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port()}
    tls = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "https": True} if https else {}
    config = NodeConfig.model_validate({"node": node, "tls": tls})
    app = Starlette(routes=[Route("/h", lambda request: PlainTextResponse("ok"))])
    server = HttpServer(config, app)
    server.start()
    scheme = "https" if https else "http"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)) if https else True) as client:
            for _ in range(3):  # kept alive: one connection
                assert client.get(f"{scheme}://localhost:{server.port}/h").text == "ok"
            connections = list(server._server.server_state.connections)
            assert len(connections) == 1
            sock = connections[0].transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.stop()
