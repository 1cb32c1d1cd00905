"""PHI review, through the real front doors: series whose identifying attributes are malformed (a wrong VR, a value
too long, bytes the declared character set does not decode, a single-component name) go to a running node by DCMTK
storescu, pynetdicom and STOW-RS (httpx), through completion, the worker (shipped models) and a dead-lettered
delivery; then every place the node writes text an operator reads is searched for the marker the values carry: the
log (stderr), each table of its database (job and delivery errors), the STOW-RS answers, the C-STORE responses,
``/admin``, ``/metrics``, ``/readyz`` and ``pacsnode status``. The audit trail, which may carry the patient ID, is
not searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from peers import dcmtk
from tests.conftest import REPO, free_port, require_tool, require_weights, wait_until
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration

MARKER = "ZZPHIMARKER"
_M = MARKER.encode()
# name → the raw elements (keyword, VR, value) each instance of the series carries instead of ctgen's
VARIANTS: dict[str, list[tuple[str, str, bytes]]] = {
    # storescu
    "birth-date-as-IS": [("PatientBirthDate", "IS", _M + b"1 ")],  # read for the age: pydicom warned the value
    "single-component-name": [("PatientName", "PN", _M + b"2 ")],  # highdicom warned the name, per result
    "long-id-and-accession": [("PatientID", "LO", _M * 10), ("AccessionNumber", "SH", _M * 3 + b"\\" + _M)],
    "institution-and-referrer-wrong-VR": [("InstitutionName", "DS", _M + b"3 "),
                                          ("ReferringPhysicianName", "DA", _M + b"4 ")],
    # pynetdicom
    "age-and-sex-as-IS": [("PatientAge", "IS", _M + b"5 "), ("PatientSex", "IS", _M + b"6 ")],
    "name-as-IS-and-other-ids": [("PatientName", "IS", _M + b"7 "),
                                 ("OtherPatientIDs", "LO", _M + b"8\\" + _M + b"9\\" + _M * 7)],
    # STOW-RS
    "charset-unknown": [("SpecificCharacterSet", "CS", b"ISO_IR 999"),
                        ("PatientName", "PN", b"D\xf6E^" + _M + b"\xff\xfe ")],
    "utf8-broken-and-description-as-IS": [("SpecificCharacterSet", "CS", b"ISO_IR 192"),
                                          ("PatientName", "PN", b"D\xc3E^" + _M + b"\xff"),
                                          ("StudyDescription", "IS", _M + b"0 ")],
}
DOORS = {"storescu": list(VARIANTS)[:4], "pynetdicom": list(VARIANTS)[4:6], "stow": list(VARIANTS)[6:]}


def _write_series(folder: Path, changes: list[tuple[str, str, bytes]], seed: int) -> list[Path]:
    series = write_ct_series(folder, slices=8, size=32, seed=seed)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        for keyword, vr, value in changes:
            value += b" " if len(value) % 2 else b""
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)  # written as it stands
        ds.save_as(path)
    return series.paths


def _bad_vr_part(path: Path) -> bytes:
    """A Part 10 file whose PatientName element carries "QQ" for a VR: refused at the door (0xC000)."""
    data = path.read_bytes()
    assert data.count(b"\x10\x00\x10\x00PN") == 1
    return data.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00QQ")


def _stow(port: int, parts: list[bytes]) -> httpx.Response:
    boundary = "PHIREVIEW"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return httpx.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=body + f"--{boundary}--\r\n".encode(),
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
                      timeout=60)


def _pynetdicom(node, paths: list[Path]) -> list[str]:
    """Each C-STORE response, as the text of its status data set."""
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])  # raw elements go out as they are
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return [str(assoc.send_c_store(pydicom.dcmread(p))) for p in paths]
    finally:
        assoc.release()


def _tables(url: str) -> dict[str, str]:
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {name: json.dumps([dict(r._mapping) for r in conn.execute(sa.select(table))], default=str)
                    for name, table in meta.tables.items()}
    finally:
        engine.dispose()


def _jobs_and_deliveries_ended(url: str, series: int) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            jobs = [r.state for r in conn.execute(sa.text("SELECT state FROM jobs"))]
            deliveries = [r.state for r in conn.execute(sa.text("SELECT state FROM deliveries"))]
    finally:
        engine.dispose()
    return (len(jobs) == series and all(s not in ("queued", "running") for s in jobs)
            and len(deliveries) == series and all(s == "dead" for s in deliveries))


@pytest.mark.one_backend  # what reaches the logs and pages, not the database (~30 s a backend)
def test_malformed_patient_values_reach_no_log_error_or_page(start_node, tmp_path):
    require_weights()
    require_tool("storescu")
    node = start_node(extra_toml=f"""
[completion]
stable_seconds = 2
sweep_seconds = 0.5
[gate]
min_slices = 8
scope_check = false
[dispatch]
initial_backoff_seconds = 0.2
max_backoff_seconds = 0.5
give_up_after_seconds = 1
[[destinations]]
name = "pacs"
kind = "dimse"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
""")
    paths = {name: _write_series(tmp_path / name, changes, seed=500 + n)
             for n, (name, changes) in enumerate(VARIANTS.items())}
    said: list[str] = []  # what the node answered the senders

    done = dcmtk.storescu(node.port, *[tmp_path / name for name in DOORS["storescu"]], calling_ae="CT1")
    assert done.returncode == 0, done.stderr
    said += [status for name in DOORS["pynetdicom"] for status in _pynetdicom(node, paths[name])]
    assert all("(0000,0900) Status" in s and "US: 0" in s for s in said), said
    for name in DOORS["stow"]:
        answer = _stow(node.http_port, [p.read_bytes() for p in paths[name]])
        assert answer.status_code == 200, answer.text
        said.append(answer.text)
    refused = _stow(node.http_port, [_bad_vr_part(paths["single-component-name"][0])])
    assert refused.status_code == 409, refused.text
    said.append(refused.text)

    wait_until(lambda: _jobs_and_deliveries_ended(node.db_url, len(VARIANTS)), 300,
               "every job ended and its delivery dead-lettered")
    pages = {path: httpx.get(f"http://127.0.0.1:{node.http_port}{path}", timeout=30).text
             for path in ("/admin/", "/metrics", "/readyz")}
    for args in ([], ["--json"]):
        status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(node.config_path), *args],
                                cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        pages[f"pacsnode status {args}"] = status.stdout + status.stderr
    tables = _tables(node.db_url)
    node.stop()
    assert node.log_path is not None
    log = node.log_path.read_text(errors="replace")

    assert all(event in log for event in ("job_done", "instance_refused", "delivery_dead")), log[-3000:]
    assert [line for line in log.splitlines() if MARKER in line] == []
    assert [text for text in said if MARKER in text] == []
    assert {name: text.count(MARKER) for name, text in {**pages, **tables}.items() if MARKER in text} == {}
