"""DICOMweb app: STOW-RS against a real Ingestor/Index/Spool, QIDO-RS over the index, health, readiness, metrics."""

from __future__ import annotations

import io
import socket
import threading
import warnings
from pathlib import Path

import httpx
import pydicom
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

with warnings.catch_warnings():
    # starlette 1.x prefers the httpx2 package for its TestClient; httpx still works and is what we install.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node import dicomweb, stow
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dicomweb import STOW_CALLING_AE, create_app
from node.http import HealthProbe, HttpServer
from node.index import Index, associations
from node.ingest import Ingestor
from node.metrics import Metrics
from node.qido import QIDO_MAX_RESULTS
from node.spool import MARKER, Spool
from tests.conftest import free_port
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes

BOUNDARY = "pacsnode-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED_SEQ, REFERENCED_SEQ, FAILURE_REASON = "00081198", "00081199", "00081197"
REF_SOP_CLASS, REF_SOP_INSTANCE, RETRIEVE_URL = "00081150", "00081155", "00081190"
CANNOT_UNDERSTAND, DATASET_MISMATCH, TS_NOT_SUPPORTED = 0xC000, 0xA900, 0xC122


def multipart(parts: list[bytes], boundary: str = BOUNDARY, part_type: str | None = "application/dicom") -> bytes:
    """A multipart/related body (the test's own encoder; the integration test uses dicomweb-client's)."""
    out = io.BytesIO()
    for data in parts:
        out.write(f"--{boundary}\r\n".encode())
        if part_type is not None:
            out.write(f"Content-Type: {part_type}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


class Node:
    """A real ingest stack on temp SQLite + temp spool, and the HTTP app over it."""

    def __init__(self, tmp_path: Path, token: str | None = None, **app_kwargs: object) -> None:
        self.config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
        init_schema(self.engine)
        self.spool = Spool(self.config.node.spool_dir)
        self.index = Index(self.engine)
        self.models = threading.Event()
        self.metrics = Metrics()
        self.released: list[int] = []
        self.health = HealthProbe(self.engine, self.spool.root, self.models.is_set)
        self.app = create_app(
            self.config,
            Ingestor(self.spool, self.index),
            self.index,
            health=self.health,
            metrics=self.metrics,
            token=token,
            on_released=lambda: self.released.append(1),
            **app_kwargs,  # type: ignore[arg-type]
        )
        self.client = TestClient(self.app)

    def stow(self, parts: list[bytes], *, study: str | None = None, content_type: str = STOW_TYPE,
             headers: dict[str, str] | None = None, body: bytes | None = None) -> httpx.Response:
        url = "/dicomweb/studies" + (f"/{study}" if study else "")
        return self.client.post(
            url, content=multipart(parts) if body is None else body, headers={"Content-Type": content_type, **(headers or {})}
        )

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.rglob("*.dcm"))

    def instance_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM instances")).scalar_one())

    def metric(self, name: str, **labels: str) -> float:
        text = self.client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.client.close()
    n.engine.dispose()


@pytest.fixture
def ct(tmp_path):
    return write_ct_series(tmp_path / "in", slices=3, size=16, seed=7)


def with_meta(path: Path, **meta_values: str) -> bytes:
    """The file at ``path`` with its file meta rewritten (dataset bytes untouched), e.g. to announce another
    transfer syntax or SOP instance than the dataset has."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    for keyword, value in meta_values.items():
        setattr(meta, keyword, value)
    del meta.FileMetaInformationGroupLength
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset_bytes(path)


def files(series) -> list[bytes]:
    return [p.read_bytes() for p in series.paths]


def uids_in(seq: dict) -> list[str]:
    return [item[REF_SOP_INSTANCE]["Value"][0] for item in seq.get("Value", [])]


# -- STOW-RS ---------------------------------------------------------------------------------------------------
def test_stow_three_instances_stores_durably_and_answers_200(node, ct):
    r = node.stow(files(ct))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert sorted(uids_in(body[REFERENCED_SEQ])) == sorted(ct.sop_uids)
    assert FAILED_SEQ not in body
    item = body[REFERENCED_SEQ]["Value"][0]
    assert item[REF_SOP_CLASS]["Value"] == [CTImageStorage]
    assert item[RETRIEVE_URL]["vr"] == "UR" and body[RETRIEVE_URL]["vr"] == "UR"
    # files in the spool, byte-identical datasets; rows in the index; the request recorded like an association
    assert len(node.spooled()) == 3
    for path, sop_uid in zip(ct.paths, ct.sop_uids, strict=True):
        row = node.index.get_instance(sop_uid)
        assert row is not None and row.calling_ae == STOW_CALLING_AE
        assert dataset_bytes(Path(row.path)) == dataset_bytes(path)
        assert pydicom.dcmread(row.path).file_meta.SourceApplicationEntityTitle == STOW_CALLING_AE
    assert node.index.get_series(ct.series_uid).instance_count == 3
    with node.engine.connect() as conn:
        assoc = conn.execute(sa.select(associations)).one()
    assert (assoc.calling_ae, assoc.state) == (STOW_CALLING_AE, "released")
    assert node.released == [1]


def test_stow_to_the_matching_study_url_and_idempotent_resend(node, ct):
    assert node.stow(files(ct), study=ct.study_uid).status_code == 200
    again = node.stow(files(ct), study=ct.study_uid)
    assert again.status_code == 200 and len(uids_in(again.json()[REFERENCED_SEQ])) == 3
    assert node.instance_rows() == 3 and node.index.get_series(ct.series_uid).instance_count == 3


def test_body_larger_than_the_in_memory_buffer_spills_and_stores(node, ct, monkeypatch):
    monkeypatch.setattr(dicomweb, "IN_MEMORY_BODY_BYTES", 1024)  # every part goes through the disk file
    r = node.stow(files(ct))
    assert r.status_code == 200 and len(node.spooled()) == 3


def test_deflated_part_is_stored(node, ct):
    ds = pydicom.dcmread(ct.paths[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert node.stow([buf.getvalue()], study=ct.study_uid).status_code == 200
    row = node.index.get_instance(ct.sop_uids[0])
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert pydicom.dcmread(row.path).pixel_array.shape == (16, 16)


def test_a_failing_release_hook_does_not_fail_the_request(tmp_path, ct):
    n = Node(tmp_path)
    try:
        def broken() -> None:
            raise RuntimeError("sweeper is down")

        n.app = create_app(
            n.config, Ingestor(n.spool, n.index), n.index, health=n.health, metrics=n.metrics, token=None,
            on_released=broken,
        )
        with TestClient(n.app) as client:
            r = client.post("/dicomweb/studies", content=multipart(files(ct)), headers={"Content-Type": STOW_TYPE})
        assert r.status_code == 200 and n.instance_rows() == 3
    finally:
        n.engine.dispose()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "multipart/form-data; boundary=" + BOUNDARY,
        'multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY,
        "multipart/related; boundary=" + BOUNDARY,  # no type parameter
        "",
    ],
)
def test_wrong_content_type_is_415_and_stores_nothing(node, ct, content_type):
    r = node.stow(files(ct), content_type=content_type)
    assert r.status_code == 415, r.text
    assert node.spooled() == [] and node.instance_rows() == 0


def test_unquoted_type_parameter_is_accepted(node, ct):
    r = node.stow(files(ct), content_type=f"Multipart/Related; type=application/dicom; boundary=\"{BOUNDARY}\"")
    assert r.status_code == 200, r.text


def test_a_non_dicom_part_is_415_and_stores_nothing(node, ct):
    good = multipart(files(ct)[:2])
    bad_part = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n".encode()
    r = node.stow([], body=bad_part + good)
    assert r.status_code == 415
    assert node.spooled() == [] and node.instance_rows() == 0


def test_parts_without_content_type_take_the_root_type(node, ct):
    r = node.stow([], body=multipart(files(ct), part_type=None))
    assert r.status_code == 200


@pytest.mark.parametrize(
    "case",
    ["no_boundary", "other_boundary", "truncated_in_second_part", "no_closing_boundary", "zero_parts", "empty_body"],
)
def test_malformed_body_is_400_and_stores_nothing(node, ct, case):
    body = multipart(files(ct))
    content_type = STOW_TYPE
    if case == "no_boundary":
        content_type = 'multipart/related; type="application/dicom"'
    elif case == "other_boundary":
        body = multipart(files(ct), boundary="something-else")
    elif case == "truncated_in_second_part":
        body = body[: len(files(ct)[0]) + len(files(ct)[1]) // 2]  # the first part is complete, the second is not
    elif case == "no_closing_boundary":
        body = body[: body.rindex(f"--{BOUNDARY}--".encode())]
    elif case == "zero_parts":
        body = f"--{BOUNDARY}--\r\n".encode()
    else:
        body = b""
    r = node.stow([], body=body, content_type=content_type)
    assert r.status_code == 400, r.text
    assert node.spooled() == [] and node.instance_rows() == 0
    assert node.metric("pacsnode_stow_requests_total", status="400") == 1


def test_garbled_part_among_good_ones_is_202_with_c000(node, ct):
    good = files(ct)
    truncated = good[2][:-10]  # a Part 10 file whose pixel data is cut short: its meta still names its UIDs
    r = node.stow([good[0], bytes(range(256)) * 8, good[1], truncated])
    assert r.status_code == 202, r.text
    body = r.json()
    assert sorted(uids_in(body[REFERENCED_SEQ])) == sorted(ct.sop_uids[:2])
    failed = body[FAILED_SEQ]["Value"]
    assert [f[FAILURE_REASON]["Value"][0] for f in failed] == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND] == [49152] * 2
    assert failed[1][REF_SOP_INSTANCE]["Value"] == [ct.sop_uids[2]]
    assert len(node.spooled()) == 2 and node.instance_rows() == 2
    assert node.metric("pacsnode_rejections_total", reason="InvalidDatasetError", source="stow") == 2


def test_study_mismatch_is_409_and_stores_nothing(node, ct, tmp_path):
    other = write_ct_series(tmp_path / "other", slices=1, size=16, seed=8)
    r = node.stow(files(ct), study=other.study_uid)
    assert r.status_code == 409, r.text
    failed = r.json()[FAILED_SEQ]["Value"]
    assert [f[FAILURE_REASON]["Value"][0] for f in failed] == [DATASET_MISMATCH] * 3
    assert REFERENCED_SEQ not in r.json()
    assert node.spooled() == [] and node.instance_rows() == 0


def test_mixed_studies_to_a_study_url_is_202(node, ct, tmp_path):
    other = write_ct_series(tmp_path / "other", slices=1, size=16, seed=8)
    r = node.stow([*files(ct), *files(other)], study=ct.study_uid)
    assert r.status_code == 202
    assert uids_in(r.json()[FAILED_SEQ]) == other.sop_uids
    assert node.instance_rows() == 3


def test_a_study_url_that_is_not_a_uid_is_400(node, ct):
    assert node.stow(files(ct), study="1.2.abc").status_code == 400
    assert node.instance_rows() == 0


def test_unsupported_transfer_syntax_fails_the_instance_with_c122(node, ct):
    r = node.stow([with_meta(ct.paths[0], TransferSyntaxUID="1.2.840.10008.1.2.4.100")])  # MPEG2: not decodable
    assert r.status_code == 409
    assert r.json()[FAILED_SEQ]["Value"][0][FAILURE_REASON]["Value"] == [TS_NOT_SUPPORTED]
    assert node.instance_rows() == 0


def test_meta_and_dataset_must_agree(node, ct):
    r = node.stow([with_meta(ct.paths[0], MediaStorageSOPInstanceUID="1.2.3.4")])
    assert r.status_code == 409
    assert r.json()[FAILED_SEQ]["Value"][0][FAILURE_REASON]["Value"] == [DATASET_MISMATCH]


def test_request_over_the_size_limit_is_413_and_stores_nothing(tmp_path, ct):
    n = Node(tmp_path, max_request_bytes=len(files(ct)[0]) + 100)
    try:
        r = n.stow(files(ct))
        assert r.status_code == 413
        assert n.spooled() == [] and n.instance_rows() == 0
    finally:
        n.engine.dispose()


def test_bearer_token(tmp_path, ct):
    n = Node(tmp_path, token="s3cret")
    try:
        assert n.stow(files(ct)).status_code == 401
        assert n.stow(files(ct), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert n.stow(files(ct), headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert n.instance_rows() == 0
        r = n.stow(files(ct), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert n.client.get("/dicomweb/studies").status_code == 401
        assert n.client.get("/dicomweb/studies", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert n.client.get("/healthz").status_code == 200  # probes stay open
        assert n.metric("pacsnode_stow_requests_total", status="401") == 3
    finally:
        n.engine.dispose()


def test_empty_token_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="token"):
        Node(tmp_path, token=" ")


# -- QIDO-RS ---------------------------------------------------------------------------------------------------
def test_qido_lists_studies_and_series_with_counts(node, ct, tmp_path):
    second = write_ct_series(tmp_path / "second", slices=2, size=16, seed=9, study_uid=ct.study_uid)
    lone = write_ct_series(tmp_path / "lone", slices=1, size=16, seed=10)
    assert node.stow([*files(ct), *files(second), *files(lone)]).status_code == 200

    r = node.client.get("/dicomweb/studies")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    studies = {pydicom.Dataset.from_json(d).StudyInstanceUID: pydicom.Dataset.from_json(d) for d in r.json()}
    assert set(studies) == {ct.study_uid, lone.study_uid}
    s = studies[ct.study_uid]
    assert (s.NumberOfStudyRelatedSeries, s.NumberOfStudyRelatedInstances, s.ModalitiesInStudy) == (2, 5, "CT")
    assert "PatientName" not in s

    only = node.client.get("/dicomweb/studies", params={"StudyInstanceUID": lone.study_uid}).json()
    assert [d["0020000D"]["Value"][0] for d in only] == [lone.study_uid]
    by_tag = node.client.get("/dicomweb/studies", params={"0020000D": lone.study_uid}).json()
    assert by_tag == only
    assert node.client.get("/dicomweb/studies", params={"ModalitiesInStudy": "MR"}).json() == []
    paged = [node.client.get("/dicomweb/studies", params={"limit": 1, "offset": i}).json() for i in range(3)]
    assert [len(p) for p in paged] == [1, 1, 0]
    assert {p[0]["0020000D"]["Value"][0] for p in paged[:2]} == set(studies)

    r = node.client.get(f"/dicomweb/studies/{ct.study_uid}/series")
    got = {d["0020000E"]["Value"][0]: d for d in r.json()}
    assert set(got) == {ct.series_uid, second.series_uid}
    assert got[ct.series_uid]["00201209"]["Value"] == [3] and got[second.series_uid]["00201209"]["Value"] == [2]
    assert got[ct.series_uid]["00080060"]["Value"] == ["CT"]
    one = node.client.get(f"/dicomweb/studies/{ct.study_uid}/series", params={"SeriesInstanceUID": second.series_uid})
    assert [d["0020000E"]["Value"][0] for d in one.json()] == [second.series_uid]


def test_qido_bad_parameters(node):
    assert node.client.get("/dicomweb/studies", params={"limit": "x"}).status_code == 400
    assert node.client.get("/dicomweb/studies", params={"offset": "-1"}).status_code == 400
    assert node.client.get("/dicomweb/studies", params={"StudyInstanceUID": "1.2.x"}).status_code == 400
    assert node.client.get("/dicomweb/studies/not-a-uid/series").status_code == 400
    r = node.client.get("/dicomweb/studies", params={"PatientName": "X*"})
    assert r.status_code == 200 and r.json() == [] and "PatientName" in r.headers["warning"]
    # unknown names outside printable ASCII (or with quotes) are echoed masked, never a 500 from the header
    odd = node.client.get("/dicomweb/studies?%E2%82%AC=1&a%22b=2&c%0D%0Ad=3")
    assert odd.status_code == 200 and odd.json() == []
    assert '?' in odd.headers["warning"] and '"' not in odd.headers["warning"].split('"', 2)[1]


def held_series(node: Node, studies: int, series_per_study: int = 1, first: int = 0) -> None:
    """Index rows of ``studies`` studies the node holds (QIDO-RS reads only the series table)."""
    from node.schema import series

    rows = [dict(series_uid=f"1.2.3.{i}.{j}", study_uid=f"1.2.3.{i}", modality="CT", state="complete",
                 instance_count=5, first_received_at=0, last_received_at=0, state_changed_at=0)
            for i in range(first, first + studies) for j in range(series_per_study)]
    with node.engine.begin() as conn:
        conn.execute(sa.insert(series), rows)


def more_warning(r: httpx.Response) -> bool:
    return any("There are additional results that can be requested" in w for w in r.headers.get_list("warning"))


def test_qido_says_when_matches_are_left_out(node):
    """PS3.18 8.3.4.4: an answer cut off by the limit — the client's, or the node's 1000 — carries Warning 299; the
    last page, or one that holds every match, does not. Studies and series alike."""
    held_series(node, 1005)
    capped = node.client.get("/dicomweb/studies")
    assert len(capped.json()) == QIDO_MAX_RESULTS == 1000 and more_warning(capped)
    asked_more = node.client.get("/dicomweb/studies", params={"limit": 5000})
    assert len(asked_more.json()) == 1000 and more_warning(asked_more)
    page = node.client.get("/dicomweb/studies", params={"limit": 10, "offset": 990})
    assert len(page.json()) == 10 and more_warning(page)
    for limit in (10, 5):  # the last page, short or exactly full
        last = node.client.get("/dicomweb/studies", params={"limit": limit, "offset": 1000})
        assert len(last.json()) == 5 and "warning" not in last.headers
    both = node.client.get("/dicomweb/studies", params={"limit": 2, "PatientName": "X*"})
    assert more_warning(both) and any("PatientName" in w for w in both.headers.get_list("warning"))
    held_series(node, 1, series_per_study=3, first=2000)  # series: the same
    cut, whole = (node.client.get("/dicomweb/studies/1.2.3.2000/series", params={"limit": n}) for n in (2, 3))
    assert (len(cut.json()), more_warning(cut), len(whole.json()), more_warning(whole)) == (2, True, 3, False)


# -- health, readiness, metrics --------------------------------------------------------------------------------
def test_healthz(node):
    r = node.client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok")


def test_readyz_follows_the_models(node):
    r = node.client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": "ok", "spool": "ok", "models": "models are not loaded"}
    node.models.set()
    r = node.client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert [p.name for p in node.spool.root.iterdir()] == [MARKER]  # the probe leaves nothing behind


def test_readiness_names_a_missing_spool_and_a_dead_database(tmp_path):
    dead = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    checks = HealthProbe(dead, tmp_path / "missing-spool", lambda: True).check()
    assert checks["models"] == "ok"
    assert checks["database"].startswith("database does not answer")
    assert checks["spool"].startswith("spool is not writable")

    def boom() -> bool:
        raise RuntimeError("x")

    assert "failed" in HealthProbe(dead, tmp_path, boom).check()["models"]


def test_metrics_move_after_a_stow(node, ct):
    node.metrics.bind(queue_depth=lambda: 4, series=node.index.series_counts)
    assert node.metric("pacsnode_instances_received_total", source="stow") == 0
    assert node.stow(files(ct)).status_code == 200
    assert node.metric(
        "pacsnode_instances_received_total", source="stow", sop_class="CTImageStorage",
        transfer_syntax="ExplicitVRLittleEndian",
    ) == 3
    assert node.metric("pacsnode_received_bytes_total", source="stow") == sum(len(b) for b in files(ct))
    assert node.metric("pacsnode_stow_requests_total", status="200") == 1
    assert node.metric("pacsnode_queue_depth") == 4
    assert node.metric("pacsnode_series", state="receiving") == 1
    assert node.client.get("/metrics").headers["content-type"].startswith("text/plain")


# -- the server ------------------------------------------------------------------------------------------------
def test_http_server_starts_serves_and_stops(tmp_path):
    n = Node(tmp_path)
    port = free_port()
    config = n.config.model_copy(update={"node": n.config.node.model_copy(update={"host": "127.0.0.1", "http_port": port})})
    server = HttpServer(config, n.app)
    server.start()
    try:
        assert server.port == port
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).text == "ok"
        with pytest.raises(OSError):  # the port is taken: start() fails here, not in a thread
            HttpServer(config, n.app).start()
    finally:
        server.stop()
        n.engine.dispose()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_ingest_accepts_exactly_the_bytes_after_the_meta(ct):
    data = ct.paths[0].read_bytes()
    meta, offset = stow.split_part10(data)
    assert data[offset:] == dataset_bytes(ct.paths[0])
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
