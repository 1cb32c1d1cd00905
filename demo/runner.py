"""The demo's node config, phantom studies, SR reading, and `Demo`, which runs Orthanc + node + viewer (the
processes through `peers`)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from demo.common import MODALITY_AET, NODE_AET, OHIF_VERSION, ORTHANC_AET, PHANTOM_SEED, DemoError
from demo.pacs import demo_orthanc
from demo.viewer import ViewerServer, app_config_js, create_viewer_app, ohif_dist
from peers import (
    NodeProcess,
    OrthancServer,
    PeerError,
    PeerMissingError,
    PeerTimeoutError,
    free_port,
    storescu,
    wait_until,
)


@contextlib.contextmanager
def _as_demo_error() -> Iterator[None]:
    """The harness's `PeerError` (a peer missing, not starting, not answering) as the demo's `DemoError`."""
    try:
        yield
    except PeerError as exc:
        raise DemoError(str(exc)) from exc


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
    try:
        result = storescu(port, *dirs, called_ae=called_ae, calling_ae=MODALITY_AET, host=host, timeout=600)
    except PeerMissingError:
        result = None
    if result is not None:
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
    orthanc: OrthancServer | None = None
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
            with _as_demo_error():
                self.orthanc = demo_orthanc(s.workdir / "orthanc", dicom_port=s.orthanc_dicom_port,
                                            http_port=s.orthanc_http_port, node_port=node_port)
                self._stack.append(self.orthanc.stop)
                self.orthanc.start()
                log(f"Orthanc: DICOM {ORTHANC_AET}@127.0.0.1:{self.orthanc.dicom_port}, HTTP {self.orthanc.url}")
                config_path = s.workdir / "node.toml"
                http_port = free_port()
                config_path.write_text(node_toml(port=node_port, http_port=http_port, data_dir=s.workdir / "node",
                                                 orthanc_dicom_port=self.orthanc.dicom_port, weights_dir=s.weights_dir))
                self.node = NodeProcess(config_path, node_port, s.workdir / "node.log", NODE_AET, s.workdir / "node",
                                        http_port)
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
            if piece is not None:
                piece.kill()

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
        with _as_demo_error():
            self.orthanc.push_studies([p.study_uid for p in phantoms], "node")
        return sender

    def wait_for_results(self, phantoms: Sequence[Phantom], timeout: float = 300.0,
                         on_result: Callable[[StudyResult], None] = lambda _r: None) -> list[StudyResult]:
        """Poll Orthanc until every phantom's study has an SR and a SEG; returns them in the phantoms' order.
        Raises `DemoError` naming the studies still missing after ``timeout`` seconds."""
        if self.orthanc is None:
            raise RuntimeError("demo not started")
        orthanc = self.orthanc
        done: dict[str, StudyResult] = {}

        def collect() -> bool:
            stored = orthanc.series_by_study()
            for p in phantoms:
                series = stored.get(p.study_uid, {})
                if p.study_uid in done or not series.get("SR") or not series.get("SEG"):
                    continue
                result = StudyResult(p, series["SR"][0], series["SEG"][0])
                result.sr = read_sr(orthanc.series_file(result.sr_series_uid))
                result.viewer_url = self.study_url(p.study_uid, result.seg_series_uid)
                done[p.study_uid] = result
                on_result(result)
            return len(done) == len(phantoms)

        try:
            with _as_demo_error():
                wait_until(collect, timeout, "the SR and SEG of every phantom at Orthanc", interval=0.5)
        except DemoError as exc:
            if not isinstance(exc.__cause__, PeerTimeoutError):
                raise
            missing = [p.case_id for p in phantoms if p.study_uid not in done]
            log = self.node.log_path if self.node else "?"
            raise DemoError(f"no SR+SEG after {timeout:.0f} s for {', '.join(missing)} (node log: {log})") from None
        return [done[p.study_uid] for p in phantoms]
