"""Review: a DIMSE association's receipt (110104) must survive the listener dying while it is written, as a STOW
request's must (test_review_stow_receipt_crash, whose FIFO and /proc probe this reuses). `DimseServer._close`
closed the association's index row *before* writing its records, so a listener killed in between left the
instances stored and indexed and the row closed: the restart, which audits only the rows left open, wrote nothing,
and the trail never said who sent them. The records now come first (at least once: twice if the kill falls
between them and the row's close)."""

from __future__ import annotations

import threading

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import wait_until
from tests.ctgen import write_ct_series
from tests.integration.test_audit_trail import LEAN_PROCESSES, listener_process
from tests.integration.test_review_stow_receipt_crash import _Pipe, fifo_audit, receipts_after_killing

pytestmark = pytest.mark.integration

PATIENT = "DIMSE-CRASH-PID-42"


def test_a_listener_killed_while_writing_an_association_s_receipt_still_leaves_the_receipt(start_node, tmp_path):
    fifo = tmp_path / "audit.fifo"
    pipe = _Pipe(fifo)
    node = start_node(extra_toml=LEAN_PROCESSES + fifo_audit(fifo))
    ready = f"http://127.0.0.1:{node.http_port}/readyz"
    series = write_ct_series(tmp_path / "s", slices=2, size=16, seed=12, patient_id=PATIENT)
    wait_until(lambda: httpx.get(ready, timeout=10).status_code == 200, 60, "the node ready")
    pid = listener_process(node)["pid"]
    ae = AE(ae_title="CRASHCT")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(dcmread(p)).Status) for p in series.paths]
        assert statuses == [0, 0]
        pipe.fill()  # the association's end writes its records now: the first one blocks
        threading.Thread(target=assoc.release, daemon=True).start()
        received = receipts_after_killing(node, pipe, fifo, pid, "the receipt")
    finally:
        pipe.draining.set()
        assoc.abort()
        node.stop()
        pipe.close()
    study, patient = received[0]["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == series.study_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 2}]
    assert patient["ParticipantObjectID"] == PATIENT
    assert PATIENT not in node.log_text()
