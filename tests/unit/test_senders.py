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


def test_partial_failure_in_a_202_is_classified_by_failure_reason(server, files):
    Answer.status = 202
    Answer.body = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [0xA900]}}]}}
    with pytest.raises(PermanentSendError, match="1.2.3"):
        StowSender(5).send(dest(server), files)
    Answer.body["00081198"]["Value"][0]["00081197"]["Value"] = [0xA700]
    with pytest.raises(TransientSendError):
        StowSender(5).send(dest(server), files)


def test_unreachable_is_transient(files):
    with pytest.raises(TransientSendError, match="unreachable"):
        StowSender(2).send(dest("http://127.0.0.1:9/dicom-web"), files)


def test_a_409_is_classified_by_the_failure_reasons_it_names(server, files):
    """PS3.18: 409 when no instance was stored, the reasons in the body. A PACS with a full disk answers 0xA700
    (this node's own STOW-RS does): worth retrying, not dead-lettering every result at once."""
    Answer.status = 409
    Answer.body = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [0xA700]}}]}}
    with pytest.raises(TransientSendError, match="HTTP 409.*1.2.3: status 0xA700"):
        StowSender(5).send(dest(server), files)
    Answer.body["00081198"]["Value"][0]["00081197"]["Value"] = [0xC000]
    with pytest.raises(PermanentSendError, match="0xC000"):
        StowSender(5).send(dest(server), files)
    Answer.body = {"error": "not a Store Instances Response"}
    with pytest.raises(PermanentSendError, match="HTTP 409$"):
        StowSender(5).send(dest(server), files)
