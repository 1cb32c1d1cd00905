"""The HTTP side against slow and greedy clients (node.httpguard): idle connections, slowloris heads, stalled
bodies, connection floods from one address, oversized headers and declared-oversized STOW bodies. Each test runs
the real app (`create_app` over a real ingest stack) in the real uvicorn server (`HttpServer`) on loopback, with
raw sockets as the attackers and httpx as the legitimate client; the attackers connect from 127.0.0.2 so that
per-address caps leave 127.0.0.1 alone."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from node.config import NodeSection
from node.dicomweb import create_app
from node.http import HealthProbe, HttpServer
from node.httpguard import LINGER_QUIET_SECONDS, HttpLimits
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.refusals import LOG_BURST
from peers.process import wait_until
from tests.conftest import free_port
from tests.ctgen import write_ct_series
from tests.unit.test_hostile_stow import STOW_TYPE, Node, body, part

HEADER_TIMEOUT = 0.6
BODY_TIMEOUT = 0.8
ATTACKER = "127.0.0.2"


class Served:
    """A node's app behind the real uvicorn server with short HTTP deadlines."""

    def __init__(self, tmp_path: Path, **node: Any) -> None:
        settings = dict(http_header_timeout_seconds=HEADER_TIMEOUT, http_body_timeout_seconds=BODY_TIMEOUT)
        settings.update(node)
        self.node = Node(tmp_path, **settings)
        self.metrics = Metrics()
        self.server = HttpServer(self.node.config, self.node.app, metrics=self.metrics)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def healthz(self) -> int:
        with httpx.Client(timeout=3) as client:
            return client.get(f"{self.url}/healthz").status_code

    def connect(self, source: str = ATTACKER) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5, source_address=(source, 0))
        self.opened.append(sock)
        return sock

    opened: list[socket.socket]

    def refused(self, reason: str) -> float:
        text = self.metrics.render()[0].decode()
        for line in text.splitlines():
            if line.startswith("pacsnode_peers_refused_total{") and f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def close(self) -> None:
        for sock in self.opened:
            with contextlib.suppress(OSError):
                sock.close()
        self.server.stop(2.0)
        self.node.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def _serve(**node: Any) -> Served:
        s = Served(tmp_path / f"s{len(made)}", **node)
        s.opened = []
        made.append(s)
        return s

    yield _serve
    for s in made:
        s.close()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (anything it sent is read and dropped), or None."""
    t0 = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - t0 < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
    return None


def test_what_uvicorn_alone_does_with_an_idle_connection(tmp_path):
    """The gap this module closes: plain uvicorn (timeout_keep_alive=5) keeps a connection that never sends a
    byte open past its keep-alive timeout — the timer is armed only after a response."""
    import threading

    import uvicorn

    node = Node(tmp_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    server = uvicorn.Server(uvicorn.Config(node.app, lifespan="off", log_config=None, timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "uvicorn to start", interval=0.02)
        idle = socket.create_connection(sock.getsockname(), timeout=5)
        assert closed_within(idle, 2.5) is None  # 2.5 s > timeout_keep_alive: still open
        idle.close()
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
        node.close()


def test_an_idle_connection_is_dropped_after_the_header_timeout_and_others_are_served(serve):
    s = serve()
    idle = [s.connect() for _ in range(5)]
    assert s.healthz() == 200  # meanwhile
    for sock in idle:
        waited = closed_within(sock, HEADER_TIMEOUT + 1.5)
        assert waited is not None, "an idle connection was kept past the header timeout"
    assert s.refused("http_header_timeout") == 5
    assert s.healthz() == 200


def test_a_slowloris_head_is_dropped_at_the_header_deadline_although_bytes_keep_coming(serve):
    s = serve()
    sock = s.connect()
    t0 = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Padding: a\r\n" * 100
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for byte in head:
            sock.send(bytes([byte]))
            if closed_within(sock, 0.05) is not None:
                break
    elapsed = time.monotonic() - t0
    assert HEADER_TIMEOUT * 0.8 <= elapsed <= HEADER_TIMEOUT + 1.0, elapsed
    assert s.refused("http_header_timeout") == 1
    assert s.healthz() == 200


def test_a_slowloris_head_after_a_kept_alive_response_is_dropped_too(serve):
    """uvicorn's keep-alive timer is cancelled by the first byte of the next request; the head deadline is not."""
    s = serve()
    sock = s.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(3)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-a: b\r\n" * 100:
            sock.send(bytes([byte]))
            if closed_within(sock, 0.05) is not None:
                break
    assert HEADER_TIMEOUT * 0.8 <= time.monotonic() - t0 <= HEADER_TIMEOUT + 1.0
    assert s.refused("http_header_timeout") == 1


def test_a_body_that_stalls_is_dropped_after_the_body_timeout_and_nothing_is_stored(serve, tmp_path):
    s = serve()
    data = write_ct_series(tmp_path / "ct", slices=1, size=16).paths[0].read_bytes()
    payload = body(part(data))
    sock = s.connect()
    sock.sendall(
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[: len(payload) // 2]
    )
    t0 = time.monotonic()
    waited = closed_within(sock, BODY_TIMEOUT + 2.0)
    assert waited is not None, "a stalled body was kept past the body timeout"
    assert time.monotonic() - t0 >= BODY_TIMEOUT * 0.8
    assert s.refused("http_body_timeout") == 1
    assert s.node.spooled() == []
    assert s.healthz() == 200


def test_a_slow_body_that_keeps_coming_is_not_cut_off(serve, tmp_path):
    s = serve()
    data = write_ct_series(tmp_path / "ct", slices=1, size=16).paths[0].read_bytes()
    payload = body(part(data))
    sock = s.connect(source="127.0.0.1")
    sock.sendall(
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
    )
    pieces = 4
    step = -(-len(payload) // pieces)
    t0 = time.monotonic()
    for i in range(pieces):  # whole request takes ~2 body timeouts, each gap half of one
        time.sleep(BODY_TIMEOUT / 2)
        sock.sendall(payload[i * step : (i + 1) * step])
    sock.settimeout(5)
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert time.monotonic() - t0 > BODY_TIMEOUT
    assert len(s.node.spooled()) == 1


def test_connections_from_one_address_over_its_cap_are_closed_and_logged_a_few_times(serve):
    s = serve(http_max_connections_per_peer=4)
    held = [s.connect() for _ in range(4)]
    with capture_logs() as logs:
        flood = [s.connect() for _ in range(30)]
        for sock in flood:
            assert closed_within(sock, 1.0) is not None
    assert all(closed_within(sock, 0.05) is None for sock in held)
    assert s.healthz() == 200  # another address still gets in
    assert s.refused("peer_connection_refused") == 30
    logged = [e for e in logs if e["event"] == "peer_connection_refused"]
    assert len(logged) == LOG_BURST, f"{len(logged)} log events for 30 refusals"
    assert all(ATTACKER in e["peer"] for e in logged)


def test_requests_over_the_connection_limit_get_503(serve):
    s = serve(http_max_connections=3)
    held = [s.connect(source="127.0.0.1") for _ in range(3)]
    assert s.healthz() == 503
    for sock in held:
        sock.close()
    wait_until(lambda: s.healthz() == 200, 3, "/healthz once the held connections closed")


@pytest.mark.parametrize("limit", [4096, None])
def test_headers_over_the_header_limit_get_431_whether_they_come_at_once_or_in_pieces(serve, limit):
    s = serve(**({"http_max_header_bytes": limit} if limit else {}))
    size = (limit or NodeSection().http_max_header_bytes) + 1024
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    for pieces in (1, 7):  # one read (h11's own limit misses it) or several
        sock = s.connect()
        step = -(-len(head) // pieces)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(pieces):
                sock.sendall(head[i * step : (i + 1) * step])
        sock.settimeout(3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 431")
    assert s.refused("http_header_too_large") == 2
    ok = s.connect(source="127.0.0.1")
    ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fine: " + b"a" * (size // 2 - 1024) + b"\r\n\r\n")
    ok.settimeout(3)
    assert ok.recv(65536).startswith(b"HTTP/1.1 200")


def test_stow_requests_have_a_size_limit_by_default():
    assert NodeSection().stow_max_request_bytes == 2 << 30


def test_a_stow_body_declared_over_the_limit_is_413_before_any_of_it_is_sent(tmp_path):
    n = Node(tmp_path)
    index = Index(n.engine)
    app = create_app(
        n.config, Ingestor(n.spool, index), index, health=HealthProbe(n.engine, n.spool.root, lambda: True),
        metrics=Metrics(), token=None, max_request_bytes=1 << 20,
    )
    server = HttpServer(n.config, app)
    server.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
            f"Content-Length: {2 << 20}\r\n\r\n".encode()
        )  # the head only: the answer must not wait for the body
        answer = b""
        while chunk := sock.recv(65536):  # the node closes after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"exceeds 1048576 bytes" in answer
        assert b"connection: close" in answer.lower()  # closed at once, not held until keep-alive ends
        sock.close()
    finally:
        server.stop(2.0)
        n.close()


def test_a_pipelined_head_over_the_header_limit_gets_431_too(serve):
    """A second request sent together with the first waits in h11's buffer while the first is answered, and is
    then parsed whole, past h11's own limit on incomplete heads: its size is counted too. A pipelined request
    under the limit is still answered."""
    s = serve(http_max_header_bytes=4096)
    small = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
    sock = s.connect()
    sock.sendall(small + big)
    answers = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        sock.settimeout(3)
        while chunk := sock.recv(65536):
            answers += chunk
    assert answers.startswith(b"HTTP/1.1 200") and answers.count(b"HTTP/1.1 ") == 2, answers[:200]
    assert b"HTTP/1.1 431" in answers
    assert s.refused("http_header_too_large") == 1
    ok = s.connect(source="127.0.0.1")
    ok.sendall(small + small)
    ok.settimeout(3)
    both = b""
    while both.count(b"HTTP/1.1 200") < 2:
        both += ok.recv(65536)


def served_from(s: Served, source: str) -> bool:
    """Whether a new connection from ``source`` gets ``GET /healthz`` answered 200."""
    with contextlib.suppress(OSError), socket.create_connection(
        ("127.0.0.1", s.server.port), timeout=2, source_address=(source, 0)
    ) as probe:
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return probe.recv(65536).startswith(b"HTTP/1.1 200")
    return False


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body) from ``sock``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536) or pytest.fail(f"closed after {answer[:100]!r}")
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(answer) < len(head) + 4 + length:
        answer += sock.recv(65536) or pytest.fail(f"closed after {answer[:100]!r}")
    return answer


def mount_admin(s: Served) -> None:
    from starlette.routing import Mount

    from node.admin import admin_routes
    from node.dispatch import Dispatcher
    from node.queue import JobQueue

    n = s.node
    s.node.app.router.routes.append(Mount("/admin", routes=admin_routes(
        lambda: n.config, n.engine, token="s3cret-token", dispatcher=Dispatcher(n.config, n.engine, {}),
        queue=JobQueue(n.engine, n.config.queue), index=Index(n.engine))))


ANSWERED_EARLY = {  # requests answered before their (declared, never sent) body is read
    "healthz": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n", b"HTTP/1.1 200"),
    "stow-part-type": (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: 100000000\r\n\r\n".encode() + part(b"hello", "Content-Type: text/plain\r\n"),
        b"HTTP/1.1 415",
    ),
    "admin-form-size": (
        b"POST /admin/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 10000000\r\n\r\n",
        b"HTTP/1.1 413",
    ),
    "admin-form-type": (
        b"POST /admin/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n",
        b"HTTP/1.1 415",
    ),
}


@pytest.mark.parametrize("request_name", list(ANSWERED_EARLY))
def test_a_connection_answered_before_its_body_was_read_is_closed_within_the_body_timeout(serve, request_name):
    """The response went out with h11 still waiting for the body: neither deadline applied any more, and the next
    byte cancelled uvicorn's keep-alive timer for good, so a client held the connection (its per-address and
    limit_concurrency slot) forever with one byte. Now it is closed by ``body_timeout`` after the answer: with one
    connection allowed per address, a second one from the attacker's address is served again by then."""
    s = serve(http_max_connections_per_peer=1)
    mount_admin(s)
    request, status = ANSWERED_EARLY[request_name]
    sock = s.connect()
    sock.sendall(request)
    sock.settimeout(3)
    assert sock.recv(65536).startswith(status)
    sock.sendall(b"x")  # one byte after the answer, then silence
    t0 = time.monotonic()
    while not served_from(s, ATTACKER):
        assert time.monotonic() - t0 < BODY_TIMEOUT + 2.0, "a connection answered early was held open"
        time.sleep(0.05)
    assert time.monotonic() - t0 <= BODY_TIMEOUT + HttpLimits.from_config(s.node.config.node).tick + 0.5


def test_an_early_answer_reaches_a_client_still_sending_its_body(serve):
    """No reset under a client that keeps sending after a refusal: the answer is followed by a FIN, what it sends
    is read and dropped (closing with it unread would reset the connection and could lose the answer)."""
    s = serve()
    request, status = ANSWERED_EARLY["stow-part-type"]
    sock = s.connect()
    sock.sendall(request)
    sock.settimeout(3)
    time.sleep(0.3)  # the answer is in; the client has not read it yet and goes on sending
    for _ in range(8):
        sock.sendall(b"y" * 32768)
    answer = read_response(sock)
    assert answer.startswith(status)
    assert sock.recv(65536) == b""  # EOF after the answer, no ConnectionResetError
    assert b"application/dicom" in answer


def test_keep_alive_still_holds_for_requests_whose_body_was_read(serve):
    """Only a connection answered before its body arrived is closed: a request whose (small) body came with its
    head, and a STOW-RS request read to its end, leave the connection open for the next request."""
    s = serve()
    sock = s.connect(source="127.0.0.1")
    sock.settimeout(3)
    refused = body(part(b"hello", "Content-Type: text/plain\r\n"))
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(refused)}\r\n\r\n".encode() + refused,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ):
        sock.sendall(request)
        answer = read_response(sock)
        assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 415")), answer[:100]
        assert b"connection: close" not in answer.lower()
    assert closed_within(sock, BODY_TIMEOUT + 0.5) is None  # kept alive (uvicorn's keep-alive is 5 s)


def test_an_early_answered_connection_closes_once_the_client_goes_quiet(serve):
    """Over HTTPS there is no FIN after an early answer, so a pooled client that had sent its whole body reused the
    connection and its next request went unanswered until body_timeout (60 s; found by review). The connection is
    closed once the client has sent nothing for LINGER_QUIET_SECONDS — here with a 30 s body timeout."""
    s = serve(http_body_timeout_seconds=30)
    request, status = ANSWERED_EARLY["stow-part-type"]
    sock = s.connect()
    sock.sendall(request)
    sock.settimeout(10)
    assert read_response(sock).startswith(status)
    assert sock.recv(65536) == b""  # (plain TCP: the FIN after the answer; the server may still be reading)
    time.sleep(LINGER_QUIET_SECONDS + 2 * HttpLimits.from_config(s.node.config.node).tick + 0.5)
    with pytest.raises(OSError):  # closed by now: what the client sends is reset, not read and dropped
        for _ in range(3):
            sock.sendall(b"z" * 1024)
            time.sleep(0.1)


def test_a_loopback_node_answers_loopback_host_names_only_and_ignores_forwarded_for(tmp_path: Path) -> None:
    """Found by review: a web page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin to
    the browser of someone on the node's machine or with a tunnel to it, and could store instances and read QIDO and
    /admin on a loopback node without a token (the default). Such a node now answers loopback names only (400
    otherwise). And X-Forwarded-For from a loopback client chose the peer the node logged and audited (uvicorn's
    proxy_headers trusted 127.0.0.1); no proxy stands in front, so it is ignored."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from node.config import NodeConfig

    def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.client.host if request.client else "?")

    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path), "http_port": free_port()}})
    server = HttpServer(config, Starlette(routes=[Route("/who", whoami)]))
    server.start()
    port = server.port
    url = f"http://127.0.0.1:{port}/who"
    try:
        with httpx.Client(timeout=5) as client:
            answers = {host: client.get(url, headers={"Host": host}).status_code for host in (
                f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "127.0.0.2", "node.localhost", "LocalHost.",
                "127.1", f"[::ffff:127.0.0.1]:{port}", f"rebind.attacker.example:{port}", "10.0.0.5",
                "127.0.0.1.attacker.example", "[::ffff:10.0.0.5]", "")}
            spoofed = client.get(url, headers={"X-Forwarded-For": "10.66.6.6, 10.1.2.3"}).text
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # HTTP/1.0, no Host: a health checker
            sock.sendall(b"GET /who HTTP/1.0\r\n\r\n")
            no_host = sock.recv(100)
    finally:
        server.stop()
    assert answers == {f"127.0.0.1:{port}": 200, "localhost": 200, f"[::1]:{port}": 200, "127.0.0.2": 200,
                       "node.localhost": 200, "LocalHost.": 200, "127.1": 200, f"[::ffff:127.0.0.1]:{port}": 200,
                       f"rebind.attacker.example:{port}": 400, "10.0.0.5": 400, "127.0.0.1.attacker.example": 400,
                       "[::ffff:10.0.0.5]": 400, "": 400}
    assert no_host.startswith(b"HTTP/1.1 200")
    assert spoofed == "127.0.0.1"
