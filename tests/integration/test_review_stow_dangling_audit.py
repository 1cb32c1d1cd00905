"""Review: what the audit trail says of a STOW-RS request found open at restart (its listener died while the
request was stored or its receipt written; tests/integration/test_review_stow_receipt_crash.py). The restart
audited the request's row as a DIMSE association's: its receipt (110104) named the user "STOW-RS" - the marker the
request's row is opened with - instead of the token's holder that the request's own receipt names, and it was
followed by a 110114 Logout "association aborted (found open at restart)" for an HTTP request that never logged
in. What an auditor needs: the receipt naming who sent it, and no fake logout. The row is told by its calling AE
(`node.index.DanglingAssociation.stow`); the logout is gone. Who sent it is not in the row: `audit_dangling_closed`
names ``stow_user``, which its callers (node/service.py, node/processes.py) give from the config: the token's holder
(the node has one token), or anonymous.

The window is held open as in test_review_stow_receipt_crash (a FIFO audit file the test fills, the listener
SIGKILLed while its write of the receipt blocks)."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
import pytest

from tests.conftest import wait_until
from tests.ctgen import write_ct_series
from tests.integration.test_audit_trail import LEAN_PROCESSES, listener_process
from tests.integration.test_review_stow_receipt_crash import (
    BOUNDARY,
    _Pipe,
    fifo_audit,
    receipts_after_killing,
    stow_body,
)

pytestmark = pytest.mark.integration

TOKEN = "stow-dangling-token"
PATIENT = "STOW-DANGLING-PID-7"


def test_a_stow_request_found_open_at_restart_names_its_sender_and_logs_no_one_out(start_node, tmp_path):
    fifo = tmp_path / "audit.fifo"
    pipe = _Pipe(fifo)
    node = start_node(extra_toml=f"dicomweb_token = {json.dumps(TOKEN)}\n" + LEAN_PROCESSES + fifo_audit(fifo))
    ready = f"http://127.0.0.1:{node.http_port}/readyz"
    series = write_ct_series(tmp_path / "s", slices=2, size=16, seed=12, patient_id=PATIENT)
    body = stow_body(series.paths)
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the listener dies before it answers
            httpx.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", content=body, timeout=120,
                       headers=headers)

    wait_until(lambda: httpx.get(ready, timeout=10).status_code == 200, 60, "the node ready")
    pid = listener_process(node)["pid"]
    sender = threading.Thread(target=post, daemon=True)
    try:
        pipe.fill()
        sender.start()
        received = receipts_after_killing(node, pipe, fifo, pid, "the STOW receipt")
        node.stop()  # every record the restart wrote is in the pipe once the node is gone
        records = pipe.records()
    finally:
        pipe.draining.set()
        sender.join(30)
        node.stop()
        pipe.close()
    (record,) = received
    context = record["pacsnode"]
    request_id = context.get("request_id") or context["association_id"]
    logouts = [r for r in records if r["event"] == "association_ended"
               and r.get("pacsnode", {}).get("association_id") == request_id]
    assert logouts == []  # an HTTP request has no login, so no logout
    assert context["front_door"] == "STOW-RS" and context["found_open_at_restart"] is True
    users = {p["UserID"] for p in record["ActiveParticipant"]}
    assert "dicomweb-token" in users and "STOW-RS" not in users, record["ActiveParticipant"]
    assert PATIENT not in node.log_text()


def test_the_stow_marker_is_the_one_the_request_rows_are_opened_with() -> None:
    from node.dicomweb import STOW_CALLING_AE
    from node.index import STOW_REQUEST_AE

    assert STOW_CALLING_AE == STOW_REQUEST_AE
