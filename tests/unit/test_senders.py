"""StowSender against a real local HTTP server answering chosen statuses: which failures retry, which dead-letter,
and a 202 whose FailedSOPSequence names refused instances."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from node.config import Destination
from node.senders import PermanentSendError, StowSender, TransientSendError
from tests.ctgen import write_ct_series


class Answer:
    status = 200
    body: dict = {}
    seen: list[dict] = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        Answer.seen.append({"path": self.path, "type": self.headers["Content-Type"],
                            "auth": self.headers.get("Authorization")})
        body = json.dumps(Answer.body).encode()
        self.send_response(Answer.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Answer.status, Answer.body, Answer.seen = 200, {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    httpd.shutdown()


@pytest.fixture
def files(tmp_path):
    return write_ct_series(tmp_path / "r", slices=2, size=8).paths


def dest(url, token=None):
    return Destination(name="web", kind="dicomweb", url=url, token=token)


def test_success_posts_multipart_related_with_token(server, files):
    StowSender(5).send(dest(server, token="t0k"), files)
    (seen,) = Answer.seen
    assert seen["path"] == "/dicom-web/studies"
    assert seen["type"].startswith("multipart/related") and 'type="application/dicom"' in seen["type"]
    assert seen["auth"] == "Bearer t0k"


@pytest.mark.parametrize(("status", "error"), [
    (503, TransientSendError), (500, TransientSendError), (429, TransientSendError), (401, TransientSendError),
    (404, TransientSendError), (400, PermanentSendError), (409, PermanentSendError), (415, PermanentSendError),
])
def test_http_statuses_are_classified(server, files, status, error):
    Answer.status = status
    with pytest.raises(error, match=f"HTTP {status}"):
        StowSender(5).send(dest(server), files)


def test_unreachable_is_transient(files):
    with pytest.raises(TransientSendError, match="unreachable"):
        StowSender(2).send(dest("http://127.0.0.1:9/dicom-web"), files)


def failed_sop(reason: int) -> dict:
    """A Store Instances Response naming SOP 1.2.3 as failed with ``reason``."""
    return {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [reason]}}]}}


@pytest.mark.parametrize(("status", "reason", "error"), [
    (202, 0xA900, PermanentSendError), (202, 0xA700, TransientSendError),
    (409, 0xA700, TransientSendError), (409, 0xC000, PermanentSendError),
])
def test_failed_instances_are_classified_by_their_failure_reasons(server, files, status, reason, error):
    """A 202 (some stored) or a 409 (none stored, PS3.18) naming failed instances: their reasons decide. A PACS with
    a full disk answers 0xA700 (this node's own STOW-RS does): worth retrying, not dead-lettering every result."""
    Answer.status, Answer.body = status, failed_sop(reason)
    prefix = "HTTP 409.*" if status == 409 else ""
    with pytest.raises(error, match=f"{prefix}1.2.3: status 0x{reason:04X}"):
        StowSender(5).send(dest(server), files)


def test_a_409_without_a_store_instances_response_is_permanent(server, files):
    Answer.status, Answer.body = 409, {"error": "not a Store Instances Response"}
    with pytest.raises(PermanentSendError, match="HTTP 409$"):
        StowSender(5).send(dest(server), files)
