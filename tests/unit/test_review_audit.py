"""Review of the audit trail on the DICOMweb side: what a STOW-RS request and QIDO-RS queries leave in it, through
the real uvicorn server (`tests.unit.test_review_dicomweb_read.Served`), on SQLite and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import httpx

from tests.conftest import wait_until
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


def _blocked_in_a_pipe_write() -> bool:
    """Whether a thread of this process waits in write(2) on a full pipe (the stalled audit file)."""
    for wchan in Path("/proc/self/task").glob("*/wchan"):
        with contextlib.suppress(OSError):
            if wchan.read_text().endswith("pipe_write"):
                return True
    return False


def test_a_stalled_audit_write_does_not_stop_the_http_server(tmp_path: Path) -> None:
    """The audit file on a volume that stalls (an NFS server gone, here a FIFO nobody reads): a QIDO-RS query's
    record was written on uvicorn's one event loop, so the whole HTTP side — /healthz, /readyz, STOW-RS — hung
    until the write returned, and an orchestrator restarted the node. The query's own request may wait for its
    record; the server must keep answering others ("a failing audit write never blocks the data path")."""
    fifo, drain = stalled_fifo(tmp_path)
    s = Served(tmp_path, f"sqlite:///{tmp_path / 'node.db'}", audit={"path": str(fifo), "rotate_daily": False})
    query = threading.Thread(target=lambda: httpx.get(f"{s.base}/studies", timeout=60), daemon=True)
    try:
        query.start()
        wait_until(_blocked_in_a_pipe_write, 10, "the query blocked on the audit pipe")
        assert httpx.get(f"http://127.0.0.1:{s.http.port}/healthz", timeout=5).text == "ok"
    finally:
        wait_until(lambda: (_drained(drain), not query.is_alive())[1], 30, "the query answered")
        s.close()
        os.close(drain)


def stalled_fifo(tmp_path: Path) -> tuple[Path, int]:
    """An audit "file" that stalls: a FIFO whose pipe is already full. Returns it and our end (read it empty with
    `_drained` to let the writer go on; close it at the end)."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    drain = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(drain, b"\n" * 65536)
    return fifo, drain


def _drained(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 1 << 20)
