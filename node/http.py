"""The node's HTTP server and its probes: `HttpServer(config, app)` runs the Starlette app from
`node.dicomweb.create_app` with uvicorn in a background thread; `HealthProbe` answers ``GET /readyz``;
`probe_routes(...)` gives the app its ``/healthz``, ``/readyz`` and ``/metrics`` routes.

Given the probe, `HttpServer` answers ``GET /readyz`` itself with `HealthProbe.report` — the checks plus each
supervised loop's heartbeat (`node.supervise`) — 200 when ready, 503 when not; ``/healthz`` stays the app's
liveness answer. The server's own event loop is supervised as loop ``http`` (it beats every uvicorn tick).
With ``[tls] https = true`` it serves HTTPS with `node.tls.server_context` (client certificates as configured).
Connections run under `node.httpguard` (header deadline, body read timeout, per-address and total caps)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvicorn
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import parse_host_header
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from node.audit import AuditTrail
from node.auth import Authenticator
from node.config import NodeConfig, is_loopback
from node.db import clock_skew_seconds
from node.errors import DatabaseError
from node.httpguard import HttpLimits, guarded_protocol
from node.logs import get_logger
from node.metrics import Metrics
from node.refusals import Refusals
from node.supervise import Heartbeats
from node.tls import server_context

LOOP = "http"  # the server's name in the heartbeat registry


class HealthProbe:
    """Readiness checks for ``GET /readyz``: the database answers, the spool is writable — and, given
    ``spool_root`` (`node.spool.Spool.root_problem`), still the spool it started on (its identity marker reads
    the same), not the bare mount point of a volume gone —, the models are loaded, and (given ``heartbeats``) no supervised loop is dead or stuck.

    ``models_ready`` is called at each check (e.g. ``worker.ready.is_set``; ``lambda: True`` when the worker is
    disabled). `check()` returns ``{name: "ok" | reason}`` for every check; `report()` adds each loop's heartbeat.
    Both are blocking: run them off the event loop.
    """

    def __init__(self, engine: Engine, spool_dir: Path, models_ready: Callable[[], bool],
                 heartbeats: Heartbeats | None = None, admission: Callable[[], dict[str, Any]] | None = None,
                 device: Callable[[], dict[str, Any]] | None = None,
                 processes: Callable[[], dict[str, Any]] | None = None,
                 spool_root: Callable[[], str | None] | None = None) -> None:
        if not callable(models_ready):
            raise TypeError(f"models_ready must be callable, not {type(models_ready).__name__}")
        self.engine = engine
        self.spool_dir = Path(spool_dir)
        self.models_ready = models_ready
        self.heartbeats = heartbeats
        self.admission = admission  # e.g. `Admission.report`: shown in the report, never makes the node not ready
        self.device = device  # e.g. `Worker.device_report`: what the models run on (a CPU fallback is still ready)
        self.processes = processes  # the supervisor's role processes (node.processes.read_table), when one runs
        self.spool_root = spool_root  # None while the spool root is the spool it started on, else why not

    def check(self) -> dict[str, str]:
        checks = {"database": self._database(), "spool": self._spool(), "models": self._models()}
        if self.heartbeats is not None:
            checks["loops"] = "; ".join(self.heartbeats.problems()) or "ok"
        if self.processes is not None:
            checks["processes"] = _process_problems(self.processes)
        return checks

    def report(self) -> dict[str, Any]:
        """``{"ready": bool, "checks": check(), "loops": {name: heartbeat age, limit, alive, stuck, restarts}}``,
        plus ``"admission"`` (what admission control accepts now) when given: a paused node is still alive and
        ready — it refuses new data with 0xA700 / 503 and resumes by itself; ``"device"`` (node.device) when
        given; and on PostgreSQL ``"clock_skew_seconds"``, this host's clock minus the database's (informational:
        `node.db.clock_skew_seconds`; alerted on from the metric)."""
        checks = self.check()
        loops = self.heartbeats.snapshot() if self.heartbeats is not None else {}
        report: dict[str, Any] = {
            "ready": all(v == "ok" for v in checks.values()),
            "checks": checks,
            "loops": {name: status.as_dict() for name, status in sorted(loops.items())},
        }
        if self.processes is not None:
            report["processes"] = _process_table(self.processes)
        if self.admission is not None:
            try:
                report["admission"] = self.admission()
            except Exception as exc:  # noqa: BLE001 - a readiness probe answers; it does not raise
                report["admission"] = {"error": type(exc).__name__}
        if self.device is not None:
            report["device"] = self.device()
        try:
            skew = clock_skew_seconds(self.engine)
        except (DatabaseError, SQLAlchemyError):
            skew = None  # the database check above says why
        if skew is not None:
            report["clock_skew_seconds"] = round(skew, 3)
        return report

    def _database(self) -> str:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as exc:
            return f"database does not answer: {type(exc).__name__}"
        return "ok"

    def _spool(self) -> str:
        if self.spool_root is not None and (problem := self.spool_root()) is not None:
            return problem
        try:
            fd, name = tempfile.mkstemp(prefix=".readyz-", dir=self.spool_dir)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            return f"spool is not writable: {exc.strerror or type(exc).__name__}"
        return "ok"

    def _models(self) -> str:
        try:
            return "ok" if self.models_ready() else "models are not loaded"
        except Exception as exc:  # noqa: BLE001 - a readiness probe answers; it does not raise
            return f"models readiness check failed: {type(exc).__name__}"


def _process_table(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - a readiness probe answers; it does not raise
        return {"error": type(exc).__name__}


def _process_problems(read: Callable[[], dict[str, Any]]) -> str:
    """"ok" when the supervisor reports every role process alive, else what is not."""
    table = _process_table(read)
    if "error" in table:
        return f"process table unreadable: {table['error']}"
    down = [f"{p['name']}: not running (restarts {p['restarts']})" for p in table.get("processes", [])
            if not p.get("alive")]
    unwell = [f"{p['name']}: {problem}" for p in table.get("processes", []) for problem in p.get("problems", [])]
    return "; ".join(down + unwell) or "ok"


class _Probes:
    """The app's own probe endpoints; `probe_routes` turns the bound methods into routes."""

    def __init__(self, health: HealthProbe, metrics: Metrics, auth: Authenticator, metrics_require_token: bool) -> None:
        self.health = health
        self.metrics = metrics
        self.auth = auth
        self.metrics_require_token = metrics_require_token
        self.log = get_logger(component="http")

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(self, request: Request) -> Response:
        checks = await run_in_threadpool(self.health.check)
        ready = all(v == "ok" for v in checks.values())
        if not ready:
            self.log.warning("not_ready", **{k: v for k, v in checks.items() if v != "ok"})
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.metrics_require_token:
            denied = await self.auth.check(request, "metrics")
            if denied is not None:
                return denied
        body, content_type = await run_in_threadpool(self.metrics.render)
        return Response(body, headers={"Content-Type": content_type})


def probe_routes(health: HealthProbe, metrics: Metrics, auth: Authenticator, *,
                 metrics_require_token: bool) -> list[Route]:
    """``GET /healthz`` (liveness: always 200 "ok"), ``GET /readyz`` (`HealthProbe.check`: 200 or 503; an
    `HttpServer` given the probe answers it first with the fuller `HealthProbe.report`) and ``GET /metrics``
    (Prometheus text; behind ``auth`` when ``metrics_require_token``)."""
    probes = _Probes(health, metrics, auth, metrics_require_token)
    return [
        Route("/healthz", probes.healthz, methods=["GET"]),
        Route("/readyz", probes.readyz, methods=["GET"]),
        Route("/metrics", probes.metrics_endpoint, methods=["GET"]),
    ]


class _Readiness:
    """ASGI app: ``GET /readyz`` from `HealthProbe.report`; every other request goes to ``app``."""

    def __init__(self, app: Any, probe: HealthProbe) -> None:
        self._app = app
        self._probe = probe
        self._log = get_logger(component="http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz" and scope["method"] in ("GET", "HEAD"):
            report = await run_in_threadpool(self._probe.report)
            if not report["ready"]:
                self._log.warning("not_ready", **{k: v for k, v in report["checks"].items() if v != "ok"})
            await JSONResponse(report, status_code=200 if report["ready"] else 503)(scope, receive, send)
            return
        await self._app(scope, receive, send)


class _UvicornServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: threading.Event, beat: Callable[[], None]) -> None:
        super().__init__(config)
        self._started_event = started
        self._beat = beat

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._started_event.set()

    async def on_tick(self, counter: int) -> bool:
        self._beat()  # every 0.1 s while the event loop turns
        return await super().on_tick(counter)


class _LoopbackHostOnly:
    """For a server bound to loopback: answer only requests addressed to a loopback name or address (Host header).
    A web page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) counts as same-origin to the browser
    of someone on the node's machine or with a tunnel to it, and could otherwise store instances and read QIDO
    and /admin on a node that trusts loopback (no token). Refused with 400, as starlette's TrustedHostMiddleware
    does (which cannot express "any 127.0.0.0/8 address")."""

    def __init__(self, app: Any, bound: str) -> None:
        self._app = app
        self._bound = bound.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(Headers(scope=scope).get("host")):
            await PlainTextResponse("Invalid host header: this node answers loopback names only",
                                    status_code=400)(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _allowed(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 health checkers send none; a browser always does
            return True
        parsed = parse_host_header(header)
        host = parsed.host.lower().rstrip(".") if parsed is not None else ""  # "localhost." is localhost
        if is_loopback(host) or host.endswith(".localhost") or host == self._bound:
            return True
        try:  # "127.1", "[::ffff:127.0.0.1]": loopback in other spellings
            address = ipaddress.ip_address(socket.inet_aton(host)) if "." in host and ":" not in host else None
        except OSError:
            address = None
        mapped = host.strip("[]")
        if address is None and ":" in mapped:
            with contextlib.suppress(ValueError):
                address = ipaddress.IPv6Address(mapped).ipv4_mapped
        return address is not None and address.is_loopback


class HttpServer:
    """Runs ``app`` with uvicorn in a background thread on ``[node] http_host:http_port``.

    `start()` binds the socket itself (so a port in use raises `OSError` here, not inside a thread) and returns
    once uvicorn serves; `port` is the bound port. `stop(timeout)` stops accepting, lets running requests finish
    for up to ``timeout`` seconds, then cancels them. With ``health``, ``GET /readyz`` is answered by
    `HealthProbe.report`; with ``heartbeats``, the server is a supervised loop (restarted on the same port)."""

    def __init__(self, config: NodeConfig, app: Starlette, *, graceful_seconds: float = 10.0,
                 health: HealthProbe | None = None, heartbeats: Heartbeats | None = None,
                 metrics: Metrics | None = None, reuse_port: bool = False, audit: AuditTrail | None = None) -> None:
        if graceful_seconds <= 0:
            raise ValueError(f"graceful_seconds must be > 0, not {graceful_seconds}")
        self._host = config.node.http_host
        self._port = config.node.http_port
        self._reuse_port = reuse_port  # listener processes share the port (SO_REUSEPORT, node.roles)
        self._app: Any = app if health is None else _Readiness(app, health)
        if is_loopback(self._host):
            self._app = _LoopbackHostOnly(self._app, self._host)
        self._graceful = graceful_seconds
        self._limits = HttpLimits.from_config(config.node)
        self._refusals = Refusals("http", metrics)
        self._audit = audit  # failed HTTPS client-certificate handshakes (node.httpguard.TlsHandshake)
        self._heartbeats = heartbeats or Heartbeats()
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: Any = None
        self._bound_port: int | None = None  # the port served last (a restart serves it again)
        # Built now: a certificate that does not load is a ConfigError before anything listens.
        self._ssl = server_context(config.tls) if config.tls.https else None
        self._log = get_logger(component="http")

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    def start(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._launch(self._port, timeout)
        self._heartbeats.register(LOOP, 1.0, alive=self._alive, restart=self._restart)
        self._log.info("http_listening", host=self._host, port=self.port, https=self._ssl is not None)

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _restart(self) -> None:
        """The supervisor's restart: clear away the ended server, serve again on the port it had."""
        if self._alive():
            return
        port = self._bound_port if self._bound_port is not None else self._port
        self._shutdown(1.0)
        self._launch(port, 30.0)
        self._log.warning("http_restarted", host=self._host, port=self.port)

    def _launch(self, port: int, timeout: float) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = socket.create_server((self._host, port), family=family, backlog=128,
                                          reuse_port=self._reuse_port)
        self._bound_port = self.port
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,  # keep the node's structlog setup
            access_log=False,  # the app logs its own events, with UIDs and sizes only
            proxy_headers=False,  # no proxy in front: X-Forwarded-For from a loopback client chose the audited peer
            timeout_graceful_shutdown=int(self._graceful) or 1,
            http=guarded_protocol(self._limits, self._refusals, self._ssl, self._audit),  # HTTPS: the guard's handshake
            ws="none",  # no WebSocket routes; an installed websockets package would take upgrades past the guard
            **self._limits.uvicorn_settings(),
        )
        started = threading.Event()
        self._server = _UvicornServer(config, started, lambda: self._heartbeats.beat(LOOP))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not started.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                self._sock.close()
                self._server = self._thread = self._sock = None
                raise RuntimeError(f"HTTP server did not start on {self._host}:{port}")

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; a second stage forces the connections shut when ``timeout`` passes."""
        self._heartbeats.unregister(LOOP)
        if self._shutdown(timeout):
            self._log.info("http_stopped")

    def _shutdown(self, timeout: float | None) -> bool:
        if self._server is None or self._thread is None:
            return False
        self._server.should_exit = True
        self._thread.join(timeout if timeout is not None else self._graceful + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._sock.close()
        self._server = self._thread = self._sock = None
        return True


__all__ = ["HealthProbe", "HttpServer"]
