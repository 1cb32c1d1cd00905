"""`pacsnode demo`: the whole path on loopback — Orthanc as the PACS, the node, the OHIF viewer — fed with
synthetic phantom studies, so a person sees the AI results (TID 1500 SR + SEG) in a real viewer within minutes.

`register(subparsers)` adds the ``demo`` subcommand. `Demo(settings)` starts the pieces and stops them by PID
(also usable from tests): Orthanc with a temporary config and its DICOMweb plugin; the node (`pacsnode serve` as a
child process, Orthanc its destination); and the viewer server (`create_viewer_app`), which serves OHIF's static
build with a generated ``app-config.js`` and proxies ``/dicom-web`` and ``/wado`` to Orthanc from one origin.
`Demo.send_phantoms` writes phantom series and stores them with a real SCU; `Demo.wait_for_results` polls Orthanc
until each study has its SR and SEG. Failures to start or to get results raise `DemoError`. Every study it makes
is synthetic and every result says "not for clinical use". The OHIF build comes from ``demo/fetch-ohif.sh``
(pinned, fetched once into ``demo/.cache``), so the demo runs from a clone of the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from node.errors import NodeError

if TYPE_CHECKING:
    import httpx
    from starlette.applications import Starlette

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo"
OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_PATH = "/dicom-web"
WADO_PATH = "/wado"
NODE_AET, ORTHANC_AET, MODALITY_AET = "PACSNODE", "ORTHANC", "DEMO-CT"
PHANTOM_SEED = 20240917
# Response headers that belong to one hop, never forwarded by the proxy (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-connection"}
)
# Cross-origin isolation lets the viewer use SharedArrayBuffer (its decoders and volume loader).
ISOLATION_HEADERS = ((b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp"))


class DemoError(NodeError):
    """A demo piece could not start (missing tool, port, download) or results did not arrive in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    while True:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"{what} does not listen on port {port}") from None
            time.sleep(0.1)


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM by PID, wait up to ``timeout``, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _peer_env() -> dict[str, str]:
    # TCP_NODELAY=1: DCMTK-based peers (storescu, Orthanc) stall every small C-STORE otherwise (see peers.md).
    return {**os.environ, "TCP_NODELAY": "1"}


# -- OHIF static build --------------------------------------------------------------------------------------------
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
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the viewer server did not start on {self._host}:{self._port}")
            time.sleep(0.05)

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


# -- Orthanc ------------------------------------------------------------------------------------------------------
class Orthanc:
    """One Orthanc process over a temporary storage folder: DICOM and HTTP on the given ports, DICOMweb plugin on,
    HTTP for local clients, DICOM for the listed modalities from their hosts only. `start()` returns once
    ``GET /system`` and the DICOM port answer."""

    def __init__(self, workdir: Path, *, dicom_port: int, http_port: int, modalities: Mapping[str, Sequence[Any]]) -> None:
        exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
        if exe is None:
            raise DemoError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, or make sysdeps)")
        if not DICOMWEB_PLUGIN.exists():
            raise DemoError(f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}: apt-get install orthanc-dicomweb)")
        self.executable = exe
        self.workdir = workdir
        self.dicom_port, self.http_port = dicom_port, http_port
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            "Name": "PACSNODE-DEMO", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "DicomServerEnabled": True, "DicomAet": ORTHANC_AET, "DicomPort": dicom_port, "DicomCheckCalledAet": True,
            # Orthanc 1.10 cannot bind to loopback: local clients only for HTTP, and for DICOM only the modalities
            # listed here, from their own host.
            "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_PATH + "/"},  # Host unset: URLs follow the request's Host
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        import httpx

        with self.log_path.open("ab") as log:
            # own session: a terminal's Ctrl-C reaches only the demo, which stops the pieces in order
            self.proc = subprocess.Popen([self.executable, str(self.config_path)], cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, env=_peer_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DemoError(f"Orthanc exited with {self.proc.returncode}; see {self.log_path}")
            try:
                httpx.get(self.url + "/system", timeout=1.0).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise DemoError(f"Orthanc's HTTP API did not answer within {timeout:.0f} s") from None
                time.sleep(0.1)
        _wait_for_port(self.dicom_port, deadline, self.proc, "Orthanc")

    def stop(self, timeout: float = 20.0) -> None:
        _stop_process(self.proc, timeout)

    def rest(self, path: str) -> Any:
        import httpx

        try:
            response = httpx.get(self.url + path, timeout=30.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(f"Orthanc GET {path}: {exc}") from exc
        return response.json()

    def file(self, series_uid: str) -> bytes:
        """The Part 10 file of the first instance of a series (SR, SEG: one instance each)."""
        import httpx

        found = self._post("/tools/find", {"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}})
        if not found:
            raise DemoError(f"series {series_uid} is not in Orthanc")
        return httpx.get(f"{self.url}/instances/{found[0]}/file", timeout=30.0).content

    def _post(self, path: str, body: Any) -> Any:
        import httpx

        try:
            content = body if isinstance(body, str) else json.dumps(body)
            response = httpx.post(self.url + path, content=content, timeout=300.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(f"Orthanc POST {path}: {exc}") from exc
        return response.json()

    def push_studies(self, study_uids: Sequence[str], modality: str) -> None:
        """C-STORE the studies to the ``DicomModalities`` entry ``modality`` (Orthanc as the SCU; synchronous)."""
        ids = []
        for uid in study_uids:
            found = [r["ID"] for r in self._post("/tools/lookup", uid) if r.get("Type") == "Study"]
            if not found:
                raise DemoError(f"study {uid} is not in Orthanc")
            ids.extend(found)
        self._post(f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True})

    def series_by_study(self) -> dict[str, dict[str, list[str]]]:
        """{StudyInstanceUID: {Modality: [SeriesInstanceUID, ...]}} of everything stored."""
        studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID") for s in self.rest("/studies?expand")}
        out: dict[str, dict[str, list[str]]] = {}
        for series in self.rest("/series?expand"):
            study = studies.get(series.get("ParentStudy"))
            tags = series.get("MainDicomTags", {})
            if study and "SeriesInstanceUID" in tags:
                out.setdefault(study, {}).setdefault(tags.get("Modality", ""), []).append(tags["SeriesInstanceUID"])
        return out


# -- the node -----------------------------------------------------------------------------------------------------
def node_toml(*, port: int, http_port: int, data_dir: Path, orthanc_dicom_port: int, weights_dir: Path | None) -> str:
    """The node's demo config: loopback, fast completion and retries, Orthanc as its one destination."""
    weights = f"[worker]\nweights_dir = {json.dumps(str(weights_dir))}\n" if weights_dir else ""
    return f"""# written by pacsnode demo
[node]
ae_title = "{NODE_AET}"
host = "127.0.0.1"
port = {port}
data_dir = {json.dumps(str(data_dir))}
http_port = {http_port}

[completion]
stable_seconds = 10
sweep_seconds = 0.5

[[completion.senders]]  # the demo's modality sends each series in one association
calling_ae = "{MODALITY_AET}"
mode = "release"

[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 5

{weights}
[[destinations]]
name = "orthanc"
kind = "dimse"
ae_title = "{ORTHANC_AET}"
host = "127.0.0.1"
port = {orthanc_dicom_port}
"""


class NodeProcess:
    """`pacsnode serve` as a child process (own session, log file); `start()` returns once its DIMSE port answers."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path, self.port, self.log_path = config_path, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        # The demo's config is complete: drop PACSNODE_<SECTION>__<KEY> overrides meant for another node.
        env = {k: v for k, v in _peer_env().items() if not (k.startswith("PACSNODE_") and "__" in k)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        _wait_for_port(self.port, time.monotonic() + timeout, self.proc, f"the node (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        _stop_process(self.proc, timeout)


# -- phantoms and results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SrSummary:
    finding: str | None  # "present" | "absent" | None (not in the SR)
    probability: float | None
    outline_sop_uid: str | None  # the CT image the lesion outline (SCOORD) is drawn on, if any


def read_sr(sr_bytes: bytes) -> SrSummary:
    """The pneumonia finding, its probability and the lesion outline's image from the node's TID 1500 SR."""
    from io import BytesIO

    import pydicom

    from node.results import codes

    sr = pydicom.dcmread(BytesIO(sr_bytes))
    finding: str | None = None
    probability: float | None = None
    outline: str | None = None
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        name = item.get("ConceptNameCodeSequence")
        code = name[0].CodeValue if name else None
        if code == codes.PNEUMONIA.value and "ConceptCodeSequence" in item:
            value = item.ConceptCodeSequence[0].CodeValue
            finding = {codes.PRESENT.value: "present", codes.ABSENT.value: "absent"}.get(value, value)
        elif code == codes.PNEUMONIA_PROBABILITY.value and "MeasuredValueSequence" in item:
            probability = float(str(item.MeasuredValueSequence[0].NumericValue))
        elif item.get("ValueType") == "SCOORD":
            refs = [r for c in item.get("ContentSequence", []) for r in c.get("ReferencedSOPSequence", [])]
            outline = str(refs[0].ReferencedSOPInstanceUID) if refs else outline
        stack.extend(item.get("ContentSequence", []))
    return SrSummary(finding, probability, outline)


@dataclass
class Phantom:
    label: str  # "pneumonia" | "normal": the phantom's ground truth
    case_id: str
    dicom_dir: Path
    study_uid: str
    series_uid: str
    lesion_volume_ml: float


@dataclass
class StudyResult:
    phantom: Phantom
    sr_series_uid: str
    seg_series_uid: str
    sr: SrSummary = SrSummary(None, None, None)
    viewer_url: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.phantom.label, "case_id": self.phantom.case_id, "study_uid": self.phantom.study_uid,
            "series_uid": self.phantom.series_uid, "lesion_volume_ml": self.phantom.lesion_volume_ml,
            "sr_series_uid": self.sr_series_uid, "seg_series_uid": self.seg_series_uid, "finding": self.sr.finding,
            "probability": self.sr.probability, "outline_sop_uid": self.sr.outline_sop_uid,
            "viewer_url": self.viewer_url,
        }


def make_phantoms(out: Path, *, pneumonia: int, normal: int, size: int = 256, slices: int = 48,
                  seed: int = PHANTOM_SEED) -> list[Phantom]:
    """Phantom CT series: ``pneumonia`` clear cases (not subtle, lesions ≥ 15 ml) then ``normal`` ones."""
    from training.phantom import generate_case

    made: list[Phantom] = []
    index = 0
    for label, wanted in (("pneumonia", pneumonia), ("normal", normal)):
        count = 0
        while count < wanted:
            if index > 50 * (pneumonia + normal):
                raise DemoError(f"no clear {label} phantom found in {index} tries")
            row = generate_case(seed, index, int(label == "pneumonia"), out, size=(size, size), slices=(slices, slices))
            index += 1
            volume = float(str(row["lesion_volume_ml"]))
            if label == "pneumonia" and (row["subtle"] or volume < 15):
                shutil.rmtree(out / str(row["case_id"]), ignore_errors=True)
                continue
            made.append(Phantom(label, str(row["case_id"]), out / str(row["dicom_dir"]), str(row["study_instance_uid"]),
                                str(row["series_instance_uid"]), volume))
            count += 1
    return made


def send_series(dirs: Sequence[Path], port: int, called_ae: str, host: str = "127.0.0.1") -> str:
    """C-STORE the folders to ``called_ae@host:port`` over one association: DCMTK ``storescu`` when installed,
    else the node's own SCU. Returns which sender was used; raises `DemoError` when an instance is refused."""
    storescu = shutil.which("storescu")
    if storescu:
        result = subprocess.run(
            [storescu, "-aet", MODALITY_AET, "-aec", called_ae, "+sd", "+r", host, str(port), *map(str, dirs)],
            env=_peer_env(), capture_output=True, text=True, timeout=600, check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"storescu failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return "storescu"
    from node.scu import Peer, read_files, send_datasets

    datasets = read_files(dirs)
    results = send_datasets(Peer(host, port, called_ae=called_ae, calling_ae=MODALITY_AET), datasets)
    failed = [r for r in results if not r.ok]
    if failed or len(results) != len(datasets):
        raise DemoError(f"{len(failed) or len(datasets) - len(results)} of {len(datasets)} instances not stored")
    return "node.scu"


# -- the whole demo -----------------------------------------------------------------------------------------------
@dataclass
class DemoSettings:
    workdir: Path
    host: str = "127.0.0.1"
    viewer_port: int = 0  # 0: a free port
    orthanc_http_port: int = 0
    orthanc_dicom_port: int = 0
    node_port: int = 0
    weights_dir: Path | None = None  # None: the node's shipped weights
    ohif_dist: Path | None = None  # None: fetched by demo/fetch-ohif.sh


@dataclass
class Demo:
    """Orthanc + node + viewer server on loopback. `start()` brings them up (stopping what it started if one
    fails); `stop()` stops them newest first; `kill()` SIGKILLs the child processes (second Ctrl-C)."""

    settings: DemoSettings
    orthanc: Orthanc | None = None
    node: NodeProcess | None = None
    viewer: ViewerServer | None = None
    _stack: list[Callable[[], None]] = field(default_factory=list)

    @property
    def viewer_url(self) -> str:
        if self.viewer is None:
            raise RuntimeError("demo not started")
        return self.viewer.url

    def study_url(self, study_uid: str, seg_series_uid: str | None = None) -> str:
        query = {"StudyInstanceUIDs": study_uid}
        if seg_series_uid:
            query["initialSeriesInstanceUID"] = seg_series_uid
        return f"{self.viewer_url}/viewer?{urlencode(query)}"

    def start(self, log: Callable[[str], None] = lambda _m: None) -> None:
        s = self.settings
        s.workdir.mkdir(parents=True, exist_ok=True)
        dist = s.ohif_dist or ohif_dist()
        node_port = s.node_port or free_port()
        try:
            self.orthanc = Orthanc(s.workdir / "orthanc", dicom_port=s.orthanc_dicom_port or free_port(),
                                   http_port=s.orthanc_http_port or free_port(),
                                   modalities={"node": (NODE_AET, "127.0.0.1", node_port),
                                               "scanner": (MODALITY_AET, "127.0.0.1", 104)})
            self._stack.append(self.orthanc.stop)
            self.orthanc.start()
            log(f"Orthanc: DICOM {ORTHANC_AET}@127.0.0.1:{self.orthanc.dicom_port}, HTTP {self.orthanc.url}")
            config_path = s.workdir / "node.toml"
            config_path.write_text(node_toml(port=node_port, http_port=free_port(), data_dir=s.workdir / "node",
                                             orthanc_dicom_port=self.orthanc.dicom_port, weights_dir=s.weights_dir))
            self.node = NodeProcess(config_path, node_port, s.workdir / "node.log")
            self._stack.append(self.node.stop)
            self.node.start()
            log(f"node: DICOM {NODE_AET}@127.0.0.1:{node_port} (log: {self.node.log_path})")
            self.viewer = ViewerServer(create_viewer_app(dist, self.orthanc.url, app_config_js()), s.host, s.viewer_port)
            self._stack.append(self.viewer.stop)
            self.viewer.start()
            log(f"viewer: {self.viewer.url}/ (OHIF {OHIF_VERSION})")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        while self._stack:
            self._stack.pop()()

    def kill(self) -> None:
        for piece in (self.node, self.orthanc):
            if piece is not None and piece.proc is not None and piece.proc.poll() is None:
                piece.proc.kill()

    def __enter__(self) -> Demo:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def send_phantoms(self, phantoms: Sequence[Phantom]) -> str:
        """The scanner stores the series at the PACS (a real SCU), the PACS routes them to the node (Orthanc's
        C-STORE SCU), as a hospital would wire it. Returns the scanner side's sender."""
        if self.orthanc is None:
            raise RuntimeError("demo not started")
        sender = send_series([p.dicom_dir for p in phantoms], self.orthanc.dicom_port, ORTHANC_AET)
        self.orthanc.push_studies([p.study_uid for p in phantoms], "node")
        return sender

    def wait_for_results(self, phantoms: Sequence[Phantom], timeout: float = 300.0,
                         on_result: Callable[[StudyResult], None] = lambda _r: None) -> list[StudyResult]:
        """Poll Orthanc until every phantom's study has an SR and a SEG; returns them in the phantoms' order.
        Raises `DemoError` naming the studies still missing after ``timeout`` seconds."""
        if self.orthanc is None:
            raise RuntimeError("demo not started")
        done: dict[str, StudyResult] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(phantoms):
            stored = self.orthanc.series_by_study()
            for p in phantoms:
                series = stored.get(p.study_uid, {})
                if p.study_uid in done or not series.get("SR") or not series.get("SEG"):
                    continue
                result = StudyResult(p, series["SR"][0], series["SEG"][0])
                result.sr = read_sr(self.orthanc.file(result.sr_series_uid))
                result.viewer_url = self.study_url(p.study_uid, result.seg_series_uid)
                done[p.study_uid] = result
                on_result(result)
            if len(done) < len(phantoms):
                if time.monotonic() > deadline:
                    missing = [p.case_id for p in phantoms if p.study_uid not in done]
                    log = self.node.log_path if self.node else "?"
                    raise DemoError(f"no SR+SEG after {timeout:.0f} s for {', '.join(missing)} (node log: {log})")
                time.sleep(0.5)
        return [done[p.study_uid] for p in phantoms]


# -- the command --------------------------------------------------------------------------------------------------
DESCRIPTION = ("Start Orthanc, the node and the OHIF viewer on loopback, send synthetic phantom CT studies through "
               "the node and print the viewer URL of each study with its AI results. Ctrl-C stops everything. "
               "Not for clinical use.")


def register(subparsers: Any) -> None:
    """Add ``demo`` to an argparse subparsers object (``args.func`` runs it and returns the exit code)."""
    p = subparsers.add_parser("demo", help="Orthanc + node + OHIF viewer on loopback, fed with phantom studies",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, help="keep Orthanc's storage, the node's data and logs here "
                   "(default: a temporary folder removed on exit)")
    p.add_argument("--viewer-port", type=int, default=0, help="viewer HTTP port (default: a free port)")
    p.add_argument("--orthanc-http-port", type=int, default=0, help="Orthanc HTTP port (default: a free port)")
    p.add_argument("--orthanc-dicom-port", type=int, default=0, help="Orthanc DICOM port (default: a free port)")
    p.add_argument("--node-port", type=int, default=0, help="the node's DICOM port (default: a free port)")
    p.add_argument("--weights-dir", type=Path, help="model weights folder (<name>/<version>/; default: shipped)")
    p.add_argument("--pneumonia", type=int, default=2, help="pneumonia phantom studies (default 2)")
    p.add_argument("--normal", type=int, default=1, help="normal phantom studies (default 1)")
    p.add_argument("--size", type=int, default=256, help="phantom matrix size (default 256)")
    p.add_argument("--slices", type=int, default=48, help="slices per phantom series (default 48)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results (default 300)")
    p.add_argument("--summary", type=Path, help="also write the studies, results and URLs to this JSON file")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C/SIGTERM. Exit 0 after a clean stop, 1 when a piece failed, 130 when forced."""
    if args.pneumonia < 0 or args.normal < 0 or args.pneumonia + args.normal == 0:
        print("pacsnode demo: --pneumonia and --normal must be >= 0 and not both 0", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pacsnode-demo-"))).resolve()
    settings = DemoSettings(workdir=workdir, viewer_port=args.viewer_port, orthanc_http_port=args.orthanc_http_port,
                            orthanc_dicom_port=args.orthanc_dicom_port, node_port=args.node_port,
                            weights_dir=args.weights_dir)
    demo = Demo(settings)
    # Both signals stop the demo the same way; SIGINT explicitly too, as a background job may inherit it ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {message}", flush=True)

    status = 0
    try:
        say(f"pacsnode demo: working in {workdir}{'' if keep else ' (removed on exit)'}")
        demo.start(log=say)
        phantoms = make_phantoms(workdir / "phantoms", pneumonia=args.pneumonia, normal=args.normal,
                                 size=args.size, slices=args.slices)
        sender = demo.send_phantoms(phantoms)
        say(f"sent {len(phantoms)} phantom series ({args.slices} slices, {args.size} px) to Orthanc with {sender}, "
            "routed to the node; waiting for its SR + SEG at Orthanc ...")

        def announce(r: StudyResult) -> None:
            p = "" if r.sr.probability is None else f", p={r.sr.probability:.2f}"
            say(f"{r.phantom.case_id} ({r.phantom.label} phantom): AI says pneumonia {r.sr.finding or '?'}{p}")

        results = demo.wait_for_results(phantoms, timeout=args.timeout, on_result=announce)
        if args.summary:
            summary = {"viewer": demo.viewer_url + "/", "orthanc": demo.orthanc.url if demo.orthanc else None,
                       "workdir": str(workdir), "studies": [r.as_dict() for r in results]}
            tmp = args.summary.with_name(args.summary.name + ".tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, args.summary)
        print(f"\nReady in {time.monotonic() - t0:.0f} s. Study list: {demo.viewer_url}/", flush=True)
        for r in results:
            print(f"  {r.phantom.case_id} {r.phantom.label:9s} AI: pneumonia {r.sr.finding or '?'}\n    {r.viewer_url}",
                  flush=True)
        print("Synthetic phantoms, research models: not for clinical use. Ctrl-C to stop.", flush=True)
        while True:  # until Ctrl-C or SIGTERM
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except DemoError as exc:
        print(f"pacsnode demo: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:

        def force(_signum: int, _frame: FrameType | None) -> None:
            demo.kill()
            os._exit(130)

        signal.signal(signal.SIGINT, force)
        signal.signal(signal.SIGTERM, force)
        print("stopping (Ctrl-C again to force) ...", file=sys.stderr, flush=True)
        demo.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        print("stopped", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
