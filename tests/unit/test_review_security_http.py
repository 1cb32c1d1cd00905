"""Security review of the HTTP front door (node.http, node.httpguard, node.auth) as a pen-tester on the hospital
network would attack it: the real app (DICOMweb, probes, /metrics, /admin over a real ingest stack) in the real
uvicorn server (`HttpServer`), over HTTPS where the TLS handshake is what is attacked, with raw sockets, Python's
``ssl`` and curl as the clients. Attackers connect from 127.0.0.2 so the per-address cap leaves 127.0.0.1 alone.

- HTTPS: a client that opens TCP and never sends a ClientHello, or dribbles one, is dropped at the header deadline;
  connections still in their handshake count against the per-address cap (before, neither held: asyncio did the
  handshake before the guard saw the connection, with its own 60 s timeout and no cap).
- Authentication: no route answers with data without the token (trailing and double slashes, percent-encoding,
  HEAD/OPTIONS, case, a second Authorization header); the presented token, right or wrong, never reaches the log;
  an oversized Authorization header or a flood of headers is a 431, not a 500.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Mount
from structlog.testing import capture_logs

from node.admin import admin_routes
from node.audit import AuditTrail, read_records
from node.auth import Authenticator
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.dispatch import Dispatcher
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.queue import JobQueue
from node.spool import Spool
from peers.process import wait_until
from tests.conftest import free_port, require_tool
from tests.tlscerts import Pki, make_pki

TOKEN = "pentest-token-0123456789"
DEST_SECRET = "destination-secret-9a8b7c"
HEADER_TIMEOUT = 0.8
PER_PEER = 3
ATTACKER = "127.0.0.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Web:
    """The node's whole HTTP app (as node.service builds it: DICOMweb, probes, /metrics, /admin) in HttpServer."""

    def __init__(self, tmp_path: Path, pki: Pki, *, https: bool, tls: dict[str, Any], **node: Any) -> None:
        settings = {"data_dir": str(tmp_path / "data"), "http_port": free_port(), "dicomweb_token": TOKEN,
                    "http_host": "127.0.0.1", "metrics_require_token": True,
                    "http_header_timeout_seconds": HEADER_TIMEOUT, "http_max_connections_per_peer": PER_PEER, **node}
        if https:
            tls = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "https": True, **tls}
        destination = {"name": "pacs", "kind": "dicomweb", "url": f"https://user:{DEST_SECRET}@pacs.example/dicomweb",
                       "token": DEST_SECRET}
        self.config = NodeConfig.model_validate({"node": settings, "tls": tls, "destinations": [destination]})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        spool, index, self.metrics = Spool(self.config.node.spool_dir), Index(self.engine), Metrics()
        auth = Authenticator(TOKEN, metrics=self.metrics)
        health = HealthProbe(self.engine, spool.root, lambda: True)
        app = create_app(self.config, Ingestor(spool, index), index, health=health, metrics=self.metrics,
                         token=TOKEN, authenticator=auth)
        app.router.routes.append(Mount("/admin", routes=admin_routes(
            lambda: self.config, self.engine, token=TOKEN, dispatcher=Dispatcher(self.config, self.engine, {}),
            queue=JobQueue(self.engine, self.config.queue), index=index, authenticator=auth)))
        self.audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title="PACSNODE")
        self.server = HttpServer(self.config, app, health=health, metrics=self.metrics, audit=self.audit)
        self.server.start()
        self.opened: list[socket.socket] = []
        self.ca = pki.ca
        self.https = https

    def connect(self, source: str = ATTACKER) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5, source_address=(source, 0))
        self.opened.append(sock)
        return sock

    def tls(self, source: str = ATTACKER) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx.wrap_socket(self.connect(source), server_hostname="localhost")

    def request(self, raw: bytes, source: str = "127.0.0.1") -> bytes:
        """Send ``raw`` as it stands (over TLS when HTTPS) and return the whole answer (the connection closes)."""
        with contextlib.closing(self.tls(source) if self.https else self.connect(source)) as sock:
            sock.sendall(raw)
            chunks = []
            with contextlib.suppress(TimeoutError, ConnectionResetError, ssl.SSLError):
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

    def refused(self, reason: str) -> float:
        for line in self.metrics.render()[0].decode().splitlines():
            if line.startswith("pacsnode_peers_refused_total{") and f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def close(self) -> None:
        for sock in self.opened:
            with contextlib.suppress(OSError):
                sock.close()
        self.server.stop(2.0)
        self.audit.close()
        self.engine.dispose()


@pytest.fixture
def web(tmp_path: Path, pki: Pki) -> Iterator[Any]:
    made: list[Web] = []

    def _web(https: bool = True, tls: dict[str, Any] | None = None, **node: Any) -> Web:
        made.append(Web(tmp_path / f"w{len(made)}", pki, https=https, tls=tls or {}, **node))
        return made[-1]

    yield _web
    for w in made:
        w.close()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (what it sent is dropped), or None if still open then."""
    t0 = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - t0 < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# -- HTTPS: the handshake is under the guard's deadlines and caps ---------------------------------------------------
def test_https_connection_that_never_says_hello_is_dropped_at_the_header_deadline(web) -> None:
    node = web()
    silent = node.connect()
    took = closed_within(silent, HEADER_TIMEOUT + 3)
    assert took is not None, "a TCP connection without a ClientHello outlived the header deadline"
    wait_until(lambda: node.refused("tls_handshake_failed") >= 1, 5, "the dropped handshake to be counted")
    assert status(node.request(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")) == 200


def test_https_dribbled_client_hello_is_dropped_at_the_header_deadline(web) -> None:
    node = web()
    hello = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(*hello, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    record = hello[1].read()  # the ClientHello, sent one byte every 0.1 s
    sock = node.connect()
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in record[:-1]:
            sock.sendall(bytes([byte]))
            if time.monotonic() - t0 > HEADER_TIMEOUT + 3:
                break
            time.sleep(0.1)  # the attacker's pace, not a synchronisation
    assert closed_within(sock, 0.5) is not None
    assert time.monotonic() - t0 < HEADER_TIMEOUT + 3, "a dribbled ClientHello outlived the header deadline"


def test_https_handshakes_count_against_the_per_address_cap(web) -> None:
    node = web(http_header_timeout_seconds=30.0)  # long deadline: only the cap can close them
    silent = [node.connect() for _ in range(PER_PEER)]
    extra = [node.connect() for _ in range(5)]
    for sock in extra:
        assert closed_within(sock, 3) is not None, "a connection over the per-address cap was kept in its handshake"
    assert all(closed_within(sock, 0.2) is None for sock in silent)  # those within the cap wait for their hello
    assert node.refused("peer_connection_refused") >= len(extra)
    # another address is served meanwhile, over TLS, with its request answered and the token checked
    answer = node.request(b"GET /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status(answer) == 401
    for sock in silent:
        sock.close()
    # the slots come back when the silent ones go: the attacker's address may connect again
    healthz = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    wait_until(lambda: status(node.request(healthz, ATTACKER)) == 200, 10, "the attacker's slots to be released")


def test_https_client_without_a_certificate_when_required_gets_no_answer(web, pki: Pki) -> None:
    node = web(tls={"ca_file": str(pki.ca), "client_certificates": "required"})
    url = f"https://localhost:{node.server.port}/healthz"
    curl = require_tool("curl")
    base = [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert", str(pki.ca)]
    none = subprocess.run([*base, url], capture_output=True, text=True, timeout=30)
    assert none.stdout == "000", none
    other = subprocess.run([*base, "--cert", str(pki.other_server_cert), "--key", str(pki.other_server_key), url],
                           capture_output=True, text=True, timeout=30)
    assert other.stdout == "000", other
    good = subprocess.run([*base, "--cert", str(pki.client_cert), "--key", str(pki.client_key), url],
                          capture_output=True, text=True, timeout=30)
    assert good.stdout == "200", good
    with capture_logs() as logs:
        subprocess.run([*base, url], capture_output=True, text=True, timeout=30)
        wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, "the refusal's log line")
    # each refused certificate is audited as a login failure, as DICOM TLS's are (it was not at all)

    def failed() -> list[str]:
        path = node.audit.path
        return [r["EventIdentification"]["EventOutcomeDescription"] for r in read_records(path)
                if r["event"] == "tls_handshake_failed"] if path.exists() else []

    reasons = wait_until(lambda: len(failed()) >= 3 and failed(), 10, "three handshake failures audited")
    assert len(reasons) == 3 and all(r.startswith("HTTPS handshake failed: ") for r in reasons), reasons
    assert "certificate verify failed" in reasons[1], reasons


# -- authentication: no way round the token, no token in the log, big headers refused cleanly -----------------------
PROTECTED = [  # (method, path): each must answer without data when no valid token is shown
    *[("GET", p) for p in (
        "/dicomweb/studies", "/dicomweb/studies/", "//dicomweb/studies", "/dicomweb//studies", "/dicomweb/%73tudies",
        "/%64icomweb/studies", "/DICOMWEB/studies", "/dicomweb/Studies", "/dicomweb/studies/1.2.3/series",
        "/dicomweb/studies/1.2.3//series", "/./dicomweb/studies", "/x/../dicomweb/studies", "/dicomweb/studies%2f",
        "/dicomweb/studies;x", "/dicomweb/studies?PatientID=*", "/metrics", "/metrics/", "//metrics", "/%6detrics",
        "/METRICS", "/metrics?x=1", "/admin/retry", "/admin//retry")],
    *[(m, p) for m in ("HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "get")
      for p in ("/dicomweb/studies", "/metrics", "/admin/retry")],
    *[("POST", p) for p in ("/dicomweb/studies", "/dicomweb/studies/1.2.3", "/dicomweb/studies/", "//dicomweb/studies",
                            "/admin/retry", "/admin//retry", "/admin/retry/", "/ADMIN/retry", "/admin/%72etry")],
]
SECRET_SEEN = "Wrong-secret-4f1c9e"


def _ask(node: Web, method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close", *headers]
    if method.upper() in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/x-www-form-urlencoded", "Content-Length: 8"]
        return node.request(("\r\n".join(lines) + "\r\n\r\nall=jobs").encode())
    return node.request(("\r\n".join(lines) + "\r\n\r\n").encode())


def test_no_route_answers_with_data_without_the_token(web) -> None:
    node = web(https=False)  # routing is the same over HTTPS (test_oversized_... goes through the handshake)
    for method, path in PROTECTED:
        for credentials in ((), (f"Authorization: Basic {TOKEN}",), (f"X-Token: {TOKEN}",),
                            (f"Authorization: Bearer {SECRET_SEEN}", f"Authorization: Bearer {TOKEN}")):
            answer = _ask(node, method, path, *credentials)
            code = status(answer)
            assert code in (307, 400, 401, 403, 404, 405, 413, 415, 431), (method, path, credentials, answer[:300])
            assert b"pacsnode_" not in answer, (method, path, credentials)  # no metrics
    for value in (SECRET_SEEN, TOKEN[:-1], f"{TOKEN}x", "", f"{TOKEN}\x00"):
        assert status(_ask(node, "GET", "/dicomweb/studies", f"Authorization: Bearer {value}")) in (400, 401)
    assert status(_ask(node, "GET", "/dicomweb/studies", f"Authorization: {TOKEN}")) == 401
    with_token = _ask(node, "GET", "/metrics", f"Authorization: Bearer {TOKEN}")
    assert status(with_token) == 200 and b"pacsnode_" in with_token  # the token itself does work
    assert status(_ask(node, "GET", "/dicomweb/studies", f"Authorization: bearer   {TOKEN}  ")) == 200


def test_presented_tokens_never_reach_the_log(web) -> None:
    node = web(https=False)
    with capture_logs() as logs:
        for value in (SECRET_SEEN, TOKEN):
            _ask(node, "GET", "/dicomweb/studies", f"Authorization: Bearer {value}")
            _ask(node, "GET", f"/dicomweb/studies?access_token={value}")
            _ask(node, "GET", "/metrics", f"Authorization: Basic {value}")
            _ask(node, "POST", "/admin/retry", f"Authorization: Bearer {value}")
            node.request(f"POST /admin/retry HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: "
                         f"application/x-www-form-urlencoded\r\nContent-Length: {len(value) + 15}\r\n\r\n"
                         f"all=jobs&token={value}".encode())
        wait_until(lambda: len([e for e in logs if e["event"] == "auth_failed"]) >= 7, 5, "the failures' log lines")
    assert logs
    for event in logs:
        text = repr(event)
        assert SECRET_SEEN not in text and TOKEN not in text and DEST_SECRET not in text, event
    for path in ("/admin/", "/readyz", "/healthz"):  # what anyone may read shows no credential either
        answer = _ask(node, "GET", path)
        assert status(answer) == 200 and TOKEN.encode() not in answer and DEST_SECRET.encode() not in answer, path
        assert path != "/admin/" or b"pacs.example" in answer  # the page does show the destination, masked
    metrics = _ask(node, "GET", "/metrics", f"Authorization: Bearer {TOKEN}")
    assert status(metrics) == 200 and TOKEN.encode() not in metrics and DEST_SECRET.encode() not in metrics


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_oversized_or_odd_authorization_headers_get_a_4xx_never_a_500(web, https: bool) -> None:
    node = web(https=https)
    limit = node.config.node.http_max_header_bytes
    huge = _ask(node, "GET", "/dicomweb/studies", "Authorization: Bearer " + "A" * (limit * 4))
    assert status(huge) == 431, huge[:200]
    many = _ask(node, "GET", "/dicomweb/studies", *[f"X-H{i}: {'v' * 20}" for i in range(limit // 16)])
    assert status(many) == 431, many[:200]
    below = _ask(node, "GET", "/dicomweb/studies", *[f"X-H{i}: v" for i in range(300)])
    assert status(below) == 401, below[:200]
    odd = [b"Authorization: Bearer \xff\xfe\x80token", b"Authorization: Bearer " + "é".encode() + b"x",
           b"Authorization: \x00Bearer x", b"Authorization:Bearer", b"Authorization: Bearer " + b"\t" * 10]
    for header in odd:
        answer = node.request(b"GET /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + header
                              + b"\r\n\r\n")
        assert status(answer) in (400, 401), (header, answer[:200])
    assert status(node.request(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")) == 200
