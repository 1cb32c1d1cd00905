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
import io
import json
import os
import signal
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.ctgen import write_ct_series
from tests.integration.test_audit_trail import LEAN_PROCESSES
from tests.integration.test_review_stow_receipt_crash import BOUNDARY, _blocked_writing, _gone, _Pipe

pytestmark = pytest.mark.integration

TOKEN = "stow-dangling-token"
PATIENT = "STOW-DANGLING-PID-7"


def test_a_stow_request_found_open_at_restart_names_its_sender_and_logs_no_one_out(start_node, tmp_path):
    fifo = tmp_path / "audit.fifo"
    pipe = _Pipe(fifo)
    node = start_node(extra_toml=f"dicomweb_token = {json.dumps(TOKEN)}\n" + LEAN_PROCESSES +
                      f'[audit]\npath = {json.dumps(str(fifo))}\nrotate_daily = false\nrotate_bytes = 0\n')
    ready = f"http://127.0.0.1:{node.http_port}/readyz"

    def listener() -> dict[str, Any]:
        try:
            report = httpx.get(ready, timeout=10).json()
        except httpx.HTTPError:
            return {"restarts": 0, "alive": False}
        return dict(next(p for p in report["processes"]["processes"] if p["name"] == "listener-0"))

    series = write_ct_series(tmp_path / "s", slices=2, size=16, seed=12, patient_id=PATIENT)
    body = io.BytesIO()
    for path in series.paths:
        body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body.write(f"--{BOUNDARY}--\r\n".encode())
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the listener dies before it answers
            httpx.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", content=body.getvalue(), timeout=120,
                       headers=headers)

    wait_until(lambda: httpx.get(ready, timeout=10).status_code == 200, 60, "the node ready")
    pid = listener()["pid"]
    sender = threading.Thread(target=post, daemon=True)
    try:
        pipe.fill()
        sender.start()
        wait_until(lambda: _blocked_writing(pid, fifo), 30, "the listener blocked writing the STOW receipt",
                   diagnostics=lambda: node.log_text()[-3000:])
        os.kill(pid, signal.SIGKILL)
        # Dead before the pipe drains: a writer woken by room before it sees the signal still writes its record.
        wait_until(lambda: _gone(pid), 30, "the listener dead")
        pipe.draining.set()
        wait_until(lambda: (p := listener())["restarts"] == 1 and p["alive"], 60, "the listener restarted",
                   diagnostics=lambda: node.log_text()[-3000:])
        received = wait_until(lambda: [r for r in pipe.records() if r["event"] == "instances_received"], 30,
                              "the STOW receipt in the audit trail", diagnostics=lambda: node.log_text()[-3000:])
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
