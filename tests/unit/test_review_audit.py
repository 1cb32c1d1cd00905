"""Review of the audit trail on the DICOMweb side: what a STOW-RS request and QIDO-RS queries leave in it, through
the real uvicorn server (`tests.unit.test_review_dicomweb_read.Served`), on SQLite and a real PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path

import httpx

from tests.ctgen import write_ct_series
from tests.unit.test_review_dicomweb_read import Served, served  # noqa: F401 - the fixture

BOUNDARY = "review-audit-boundary"


def stow(s: Served, paths: list[Path]) -> httpx.Response:
    body = io.BytesIO()
    for path in paths:
        body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body.write(f"--{BOUNDARY}--\r\n".encode())
    return httpx.post(f"{s.base}/studies", content=body.getvalue(), timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})


def test_every_patient_of_a_study_received_is_in_its_record(served: Served, tmp_path: Path) -> None:  # noqa: F811
    """A study whose series belong to two patients (a mis-merged study: a series of patient B filed under patient
    A's Study Instance UID) sent in one STOW-RS request: the 110104 record named only the patient of the first
    file read, so "whose data did this node receive?" missed patient B. Every patient goes in (PS3.15 A.5.3.4:
    a patient participant object for each patient)."""
    a = write_ct_series(tmp_path / "a", slices=3, size=16, seed=1, patient_id="REVIEW-PID-A")
    b = write_ct_series(tmp_path / "b", slices=2, size=16, seed=2, patient_id="REVIEW-PID-B", study_uid=a.study_uid)
    assert stow(served, [*a.paths, *b.paths]).status_code == 200
    served.audit.close()
    (record,) = [r for r in served.records() if r["event"] == "instances_received"]
    objects = record["ParticipantObjectIdentification"]
    patients = sorted(o["ParticipantObjectID"] for o in objects if o["ParticipantObjectTypeCode"] == "1")
    assert patients == ["REVIEW-PID-A", "REVIEW-PID-B"]
    assert record["pacsnode"]["instances"] == 5 and objects[0]["ParticipantObjectID"] == a.study_uid
