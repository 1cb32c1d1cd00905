"""The viewer server: OHIF's static build on one origin with Orthanc's DICOMweb proxied behind it."""

from __future__ import annotations

import contextlib
import mimetypes
import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo.common import (
    DEMO_DIR,
    DICOMWEB_PATH,
    HOP_BY_HOP,
    ISOLATION_HEADERS,
    WADO_PATH,
    DemoError,
)
from peers.process import PeerTimeoutError, wait_until

if TYPE_CHECKING:
    import httpx
    from starlette.applications import Starlette

def ohif_dist(cache: Path | None = None) -> Path:
    """The pinned OHIF build's ``dist/`` folder, fetched once by ``demo/fetch-ohif.sh``; raises `DemoError`."""
    script = DEMO_DIR / "fetch-ohif.sh"
    if not script.exists():
        raise DemoError(f"{script} is missing: run the demo from a clone of the repository")
    env = {**os.environ, **({"PACSNODE_DEMO_CACHE": str(cache)} if cache else {})}
    result = subprocess.run(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    dist = Path(lines[-1]) if result.returncode == 0 and lines else None
    if dist is None or not (dist / "index.html").exists():
        raise DemoError(f"could not fetch the OHIF viewer ({script} exited with {result.returncode})")
    return dist


def app_config_js(friendly_name: str = "Orthanc (pacs-ai-node demo)") -> str:
    """``app-config.js`` for OHIF: one DICOMweb source on the page's own origin (demo/app-config.template.js)."""
    template = (DEMO_DIR / "app-config.template.js").read_text()
    return (
        template.replace("{{DICOMWEB_PATH}}", DICOMWEB_PATH)
        .replace("{{WADO_PATH}}", WADO_PATH)
        .replace("{{FRIENDLY_NAME}}", friendly_name.replace("'", ""))
    )


# -- the viewer server --------------------------------------------------------------------------------------------
class _IsolationHeaders:
    """ASGI middleware adding COOP/COEP to every response (static files, config and proxied DICOMweb alike)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_isolated(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ISOLATION_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_isolated)


def create_viewer_app(dist: Path, orthanc_url: str, config_js: str, *,
                      transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """Starlette app serving OHIF from ``dist`` on one origin with Orthanc behind it.

    ``/app-config.js`` → ``config_js``; ``/dicom-web/...`` and ``/wado`` → proxied to ``orthanc_url`` with the
    browser's Host header kept (Orthanc builds bulk-data URLs from it, so they point back at this server);
    502 when Orthanc does not answer. Existing files under ``dist`` are served as they are; other page routes
    (``/viewer``, ``/``) get ``index.html``; a missing file with an extension is a 404. ``transport`` replaces
    the HTTP transport to Orthanc (tests).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    root = dist.resolve()
    index = root / "index.html"
    if not index.exists():
        raise DemoError(f"{dist} is not an OHIF build (no index.html)")
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=orthanc_url, timeout=httpx.Timeout(120.0, connect=5.0),
                                     transport=transport) as client:
            del client.headers["accept-encoding"]  # pass the browser's own choice through, add none
            state["client"] = client
            yield

    async def app_config(_request: Request) -> Response:
        return Response(config_js, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def proxy(request: Request) -> Response:
        client = state["client"]
        raw = bytes(request.scope.get("raw_path") or b"").lower()
        path = request.url.path  # decoded once; Orthanc decodes what it is sent again
        if (b"%2f" in raw or b"%5c" in raw or "%" in path or "\\" in path
                or any(seg in (".", "..") for seg in path.split("/"))):
            # /dicom-web/..%2ftools/shutdown (and ..%252f, decoded once here, again by Orthanc) reached Orthanc's whole
            # REST API as /tools/shutdown (found by review). DICOMweb paths hold UIDs and keywords: no '%' or '\\'.
            return PlainTextResponse("not a DICOMweb path", status_code=404)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        body = await request.body() if request.method not in ("GET", "HEAD", "OPTIONS") else None
        upstream = client.build_request(request.method, target, headers=headers, content=body)
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"Orthanc did not answer: {type(exc).__name__}", status_code=502)
        response = StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                     background=BackgroundTask(answer.aclose))
        response.raw_headers = [(k, v) for k, v in answer.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        return response

    async def static(request: Request) -> Response:
        rel = request.path_params.get("path", "")
        target = (root / rel).resolve()
        if rel and target.is_relative_to(root) and target.is_file():
            media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            return FileResponse(target, media_type=media_type)
        if Path(rel).suffix:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-store"})

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]
    routes = [
        Route("/app-config.js", app_config),
        Route(DICOMWEB_PATH + "/{rest:path}", proxy, methods=methods),
        Route(WADO_PATH, proxy, methods=methods),
        Route("/{path:path}", static, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_IsolationHeaders)
    return app


class ViewerServer:
    """Runs the viewer app with uvicorn in a thread on ``host:port`` (0: a free port). `start()` binds the socket
    itself (a port in use raises `DemoError` here) and returns once uvicorn serves; `stop()` is graceful, then
    forced after ``timeout``."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app, self._host, self._port = app, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        if self._sock is None:
            raise RuntimeError("viewer server not started")
        return f"http://{self._host}:{self._sock.getsockname()[1]}"

    def start(self, timeout: float = 30.0) -> None:
        import uvicorn

        try:
            self._sock = socket.create_server((self._host, self._port), backlog=128)
        except OSError as exc:
            raise DemoError(f"viewer port {self._host}:{self._port}: {exc}") from exc
        config = uvicorn.Config(self._app, lifespan="on", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="viewer-http", daemon=True)
        self._thread.start()
        server, thread = self._server, self._thread
        with contextlib.suppress(PeerTimeoutError):  # started, its thread ended, or the time is up
            wait_until(lambda: server.started or not thread.is_alive(), timeout, "the viewer server")
        if not server.started:
            self.stop()
            raise DemoError(f"the viewer server did not start on {self._host}:{self._port}")

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

