"""The node's HTTP server and readiness probe: `HttpServer(config, app)` runs the Starlette app from
`node.dicomweb.create_app` with uvicorn in a background thread; `HealthProbe` answers ``GET /readyz``."""

from __future__ import annotations

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

from node.config import NodeConfig
from node.logs import get_logger


class HealthProbe:
    """Readiness checks for ``GET /readyz``: the database answers, the spool is writable, the models are loaded.

    ``models_ready`` is called at each check (e.g. ``worker.ready.is_set``; ``lambda: True`` when the worker is
    disabled). `check()` returns ``{name: "ok" | reason}`` for every check; blocking, run it off the event loop.
    """

    def __init__(self, engine: Engine, spool_dir: Path, models_ready: Callable[[], bool]) -> None:
        if not callable(models_ready):
            raise TypeError(f"models_ready must be callable, not {type(models_ready).__name__}")
        self.engine = engine
        self.spool_dir = Path(spool_dir)
        self.models_ready = models_ready

    def check(self) -> dict[str, str]:
        return {"database": self._database(), "spool": self._spool(), "models": self._models()}

    def _database(self) -> str:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as exc:
            return f"database does not answer: {type(exc).__name__}"
        return "ok"

    def _spool(self) -> str:
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
        except Exception as exc:  # a readiness probe answers; it does not raise
            return f"models readiness check failed: {type(exc).__name__}"


class _UvicornServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: threading.Event) -> None:
        super().__init__(config)
        self._started_event = started

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._started_event.set()


class HttpServer:
    """Runs ``app`` with uvicorn in a background thread on ``[node] host:http_port``.

    `start()` binds the socket itself (so a port in use raises `OSError` here, not inside a thread) and returns
    once uvicorn serves; `port` is the bound port. `stop(timeout)` stops accepting, lets running requests finish
    for up to ``timeout`` seconds, then cancels them."""

    def __init__(self, config: NodeConfig, app: Starlette, *, graceful_seconds: float = 10.0) -> None:
        if graceful_seconds <= 0:
            raise ValueError(f"graceful_seconds must be > 0, not {graceful_seconds}")
        self._host = config.node.host
        self._port = config.node.http_port
        self._app = app
        self._graceful = graceful_seconds
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: Any = None
        self._log = get_logger(component="http")

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    def start(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = socket.create_server((self._host, self._port), family=family, backlog=128)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,  # keep the node's structlog setup
            access_log=False,  # the app logs its own events, with UIDs and sizes only
            timeout_graceful_shutdown=int(self._graceful) or 1,
        )
        started = threading.Event()
        self._server = _UvicornServer(config, started)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not started.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                self._sock.close()
                self._server = self._thread = self._sock = None
                raise RuntimeError(f"HTTP server did not start on {self._host}:{self._port}")
        self._log.info("http_listening", host=self._host, port=self.port)

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; a second stage forces the connections shut when ``timeout`` passes."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout if timeout is not None else self._graceful + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._sock.close()
        self._server = self._thread = self._sock = None
        self._log.info("http_stopped")


__all__ = ["HealthProbe", "HttpServer"]
