"""StowSender against a real local HTTP server playing the PACS: which answers store a delivery (a Store Instances
Response accounting for every instance sent), which failures retry and which dead-letter, redirects, the timeout,
and a rejection note sent only after the rest of its delivery is stored."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from node.config import Destination
from node.results import AlgorithmIdentity, build_rejection_kos, build_results
from node.senders import NOTE_HELD, PermanentSendError, StowSender, TransientSendError
from tests.ctgen import write_ct_series
from tests.unit.results_support import cached_series

Reply = tuple[int, str, bytes]  # status, Content-Type, body


def referencing(uids: list[str], failed: dict[str, int] | None = None) -> dict:
    """A Store Instances Response (DICOM JSON): ``uids`` stored, ``failed`` (UID → Failure Reason) not."""
    body: dict = {}
    if uids:
        body["00081199"] = {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}} for u, r in failed.items()]}
    return body


def stored_all(posted: list[Dataset]) -> Reply:
    return 200, "application/dicom+json", json.dumps(referencing([str(ds.SOPInstanceUID) for ds in posted])).encode()


class Pacs:
    """What the test PACS answers (``reply`` of the posted datasets, after ``delay`` seconds) and what it saw."""

    def __init__(self) -> None:
        self.reply: Callable[[list[Dataset]], Reply] = stored_all
        self.delay = 0.0
        self.posts: list[list[Dataset]] = []
        self.seen: list[dict] = []
        self.gets: list[str] = []


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_POST(self):  # noqa: N802 - http.server's naming
        pacs: Pacs = self.server.pacs  # type: ignore[attr-defined]
        body = self._body()
        ctype = self.headers["Content-Type"]
        pacs.seen.append({"path": self.path, "type": ctype, "auth": self.headers.get("Authorization")})
        boundary = re.search(r'boundary="?([^";]+)', ctype).group(1).encode()
        parts = body.split(b"\r\n--" + boundary)[1:-1]
        posted = [pydicom.dcmread(BytesIO(part.partition(b"\r\n\r\n")[2])) for part in parts]
        pacs.posts.append(posted)
        time.sleep(pacs.delay)
        self._answer(*pacs.reply(posted))

    def do_GET(self):  # noqa: N802 - a login page, where a redirect would lead
        self.server.pacs.gets.append(self.path)  # type: ignore[attr-defined]
        self._answer(200, "text/html; charset=utf-8", b"<html><form>Sign in</form></html>")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size + 2)[:-2])
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, ctype: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def pacs():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.pacs = Pacs()  # type: ignore[attr-defined]
    httpd.pacs.url = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield httpd.pacs  # type: ignore[attr-defined]
    httpd.shutdown()


@pytest.fixture
def files(tmp_path):
    return write_ct_series(tmp_path / "r", slices=2, size=8).paths


def dest(url, token=None):
    return Destination(name="web", kind="dicomweb", url=url, token=token)


def test_success_posts_multipart_related_with_token(pacs, files):
    StowSender(5).send(dest(pacs.url, token="t0k"), files)
    (seen,) = pacs.seen
    assert seen["path"] == "/dicom-web/studies"
    assert seen["type"].startswith("multipart/related") and 'type="application/dicom"' in seen["type"]
    assert seen["auth"] == "Bearer t0k"
    assert len(pacs.posts[0]) == 2


@pytest.mark.parametrize(("status", "error"), [
    (503, TransientSendError), (500, TransientSendError), (429, TransientSendError), (401, TransientSendError),
    (404, TransientSendError), (400, PermanentSendError), (409, PermanentSendError), (415, PermanentSendError),
])
def test_http_statuses_are_classified(pacs, files, status, error):
    pacs.reply = lambda posted: (status, "application/dicom+json", b"{}")
    with pytest.raises(error, match=f"HTTP {status}"):
        StowSender(5).send(dest(pacs.url), files)


def test_unreachable_is_transient(files):
    with pytest.raises(TransientSendError, match="unreachable"):
        StowSender(2).send(dest("http://127.0.0.1:9/dicom-web"), files)


@pytest.mark.parametrize(("status", "reason", "error"), [
    (202, 0xA900, PermanentSendError), (202, 0xA700, TransientSendError),
    (409, 0xA700, TransientSendError), (409, 0xC000, PermanentSendError),
])
def test_failed_instances_are_classified_by_their_failure_reasons(pacs, files, status, reason, error):
    """A 202 (some stored) or a 409 (none stored, PS3.18) naming failed instances: their reasons decide. A PACS with
    a full disk answers 0xA700 (this node's own STOW-RS does): worth retrying, not dead-lettering every result."""
    def reply(posted: list[Dataset]) -> Reply:
        first, *rest = [str(ds.SOPInstanceUID) for ds in posted]
        stored = rest if status == 202 else []
        failed = {first: reason} | ({} if status == 202 else dict.fromkeys(rest, reason))
        return status, "application/dicom+json", json.dumps(referencing(stored, failed)).encode()

    pacs.reply = reply
    prefix = "HTTP 409.*" if status == 409 else ""
    with pytest.raises(error, match=f"{prefix}: status 0x{reason:04X}"):
        StowSender(5).send(dest(pacs.url), files)


@pytest.mark.parametrize("reason", [0x0000, 0x0001, 0x0107, 0xB000, 0xB00F])
def test_an_instance_in_failed_sop_sequence_is_never_stored_whatever_its_reason(pacs, files, reason):
    """PS3.18: FailedSOPSequence names instances not stored (warnings go in ReferencedSOPSequence). A reason C-STORE
    would count as stored — 0x0000, a warning, a vendor's 0xBxxx code (Azure uses that range) — counted the
    instance as delivered (found by review); only 0x0111, a duplicate of one the PACS holds, does."""
    def reply(posted):
        uids = [str(ds.SOPInstanceUID) for ds in posted]
        return 202, "application/dicom+json", json.dumps(referencing(uids[1:], {uids[0]: reason})).encode()

    pacs.reply = reply
    with pytest.raises(TransientSendError, match="status 0x0110"):
        StowSender(5).send(dest(pacs.url), files)


def test_a_409_without_a_store_instances_response_is_permanent(pacs, files):
    pacs.reply = lambda posted: (409, "application/dicom+json", b'{"error": "not a Store Instances Response"}')
    with pytest.raises(PermanentSendError, match="HTTP 409$"):
        StowSender(5).send(dest(pacs.url), files)


def _failing_first(posted: list[Dataset]) -> bytes:
    uids = [str(ds.SOPInstanceUID) for ds in posted]
    return json.dumps(referencing(uids[1:], {uids[0]: 0xA900})).encode()


@pytest.mark.parametrize(("reply", "error", "match"), [
    pytest.param(lambda p: (202, "application/dicom+json; charset=utf-8", _failing_first(p)), PermanentSendError,
                 "status 0xA900", id="202-charset-failed-instance"),
    pytest.param(lambda p: (202, "application/dicom+json", b""), TransientSendError,
                 "HTTP 202 without a Store Instances Response \\(empty body\\)", id="202-empty"),
    pytest.param(lambda p: (200, "text/html", b"<html>proxy says hi</html>"), TransientSendError,
                 "HTTP 200 without a Store Instances Response \\(text/html body\\)", id="200-html"),
    pytest.param(lambda p: (200, "application/dicom+json", b"[1, 2"), TransientSendError,
                 "malformed application/dicom\\+json", id="200-malformed-json"),
    pytest.param(lambda p: (200, "application/dicom+json; charset=utf-8",
                            json.dumps(referencing([str(p[0].SOPInstanceUID)])).encode()), TransientSendError,
                 "not in the Store Instances Response", id="200-one-of-two"),
    pytest.param(lambda p: (204, "application/dicom+json", b""), TransientSendError,
                 "HTTP 204 without a Store Instances Response", id="204"),
])
def test_an_answer_that_does_not_account_for_every_instance_is_not_a_delivery(pacs, files, reply, error, match):
    pacs.reply = reply
    with pytest.raises(error, match=match):
        StowSender(5).send(dest(pacs.url), files)


@pytest.mark.parametrize(("location", "shown"), [
    ("/login?next=%2Fdicom-web", "{base}/login"),
    ("http://admin:s3cret@127.0.0.1/login?session=abc123", "http://admin:********@127.0.0.1/login"),
])
def test_a_redirect_is_not_followed_and_is_transient(pacs, files, location, shown):
    """A POST redirected to a login page: requests would follow it as a GET and take the page's 200 for a store.
    The error names where it led, without credentials or query."""
    pacs.reply = lambda posted: (302, "text/html", b"", (("Location", location),))
    shown = shown.format(base=pacs.url.removesuffix("/dicom-web"))
    with pytest.raises(TransientSendError, match=re.escape(f"HTTP 302, a redirect to {shown} (not followed)")) as err:
        StowSender(5).send(dest(pacs.url), files)
    assert "s3cret" not in str(err.value) and "abc123" not in str(err.value)
    assert pacs.gets == [] and len(pacs.posts) == 1


def _xml(posted: list[Dataset], failed_reason: int | None) -> bytes:
    def item(uid: str, reason: int | None) -> str:
        extra = "" if reason is None else (
            f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value></DicomAttribute>')
        return (f'<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{uid}</Value>'
                f"</DicomAttribute>{extra}</Item>")

    uids = [str(ds.SOPInstanceUID) for ds in posted]
    stored = uids if failed_reason is None else uids[1:]
    failed = "" if failed_reason is None else (
        f'<DicomAttribute tag="00081198" vr="SQ">{item(uids[0], failed_reason)}</DicomAttribute>')
    return (f'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
            f'NativeDICOM"><DicomAttribute tag="00081199" vr="SQ">{"".join(item(u, None) for u in stored)}'
            f"</DicomAttribute>{failed}</NativeDicomModel>").encode()


def test_xml_and_duplicate_answers(pacs, files):
    """A DICOM XML answer with a media type parameter is read; a duplicate SOP instance (0x0111, the PACS holds the
    node's deterministic UID already) counts as stored, in a 202 and in a 409 naming every instance."""
    pacs.reply = lambda posted: (200, "application/dicom+xml; charset=utf-8", _xml(posted, None))
    StowSender(5).send(dest(pacs.url), files)
    pacs.reply = lambda posted: (202, "application/dicom+xml", _xml(posted, 0xC000))
    with pytest.raises(PermanentSendError, match="status 0xC000"):
        StowSender(5).send(dest(pacs.url), files)
    pacs.reply = lambda posted: (202, "application/dicom+xml", _xml(posted, 0x0111))
    StowSender(5).send(dest(pacs.url), files)
    pacs.reply = lambda posted: (409, "application/dicom+json", json.dumps(referencing([], dict.fromkeys(
        [str(ds.SOPInstanceUID) for ds in posted], 0x0111))).encode())
    StowSender(5).send(dest(pacs.url), files)


def test_the_configured_timeout_bounds_the_request(pacs, files):
    """dicomweb-client passes its own timeout (20 s) to every request unless told another: the configured one must
    bound the wait for an answer, whether shorter or longer than that default."""
    pacs.delay = 2.0
    started = time.monotonic()
    with pytest.raises(TransientSendError, match="no answer within 0.5 s"):
        StowSender(0.5).send(dest(pacs.url), files)
    assert time.monotonic() - started < 1.8
    StowSender(5).send(dest(pacs.url), files)  # a 2 s answer within 5 s is stored


# -- a rejection note waits for the rest of its delivery -----------------------------------------------------------


def delivery(out: Path) -> list[Path]:
    """A real version-2 delivery as the worker writes it: SR, SEG, key-images KOS, then the rejection note
    withdrawing version 1's SR and SEG."""
    sources, findings = cached_series()
    algorithm = AlgorithmIdentity(name="pneumonia-attn", version="0.3.1")
    v1 = build_results(sources, findings, algorithm)
    v2 = build_results(sources, findings, algorithm, series_version=2)
    assert v1.seg is not None and v2.seg is not None and v2.key_images is not None
    note = build_rejection_kos([v1.sr, v1.seg], algorithm, source_series_uid=str(sources[0].SeriesInstanceUID),
                               series_version=2)
    out.mkdir()
    paths = []
    for name, ds in (("sr", v2.sr), ("seg", v2.seg), ("key", v2.key_images), ("withdraw", note)):
        ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
        paths.append(out / f"{name}.dcm")
    return paths


def test_a_rejection_note_is_posted_alone_once_the_rest_is_stored(pacs, tmp_path):
    paths = delivery(tmp_path / "v2")
    note_uid = str(pydicom.dcmread(paths[-1]).SOPInstanceUID)
    first = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths[:-1]]

    def refuse_seg(posted: list[Dataset]) -> Reply:
        failed = {str(ds.SOPInstanceUID): 0xA700 for ds in posted if ds.Modality == "SEG"}
        stored = [str(ds.SOPInstanceUID) for ds in posted if ds.Modality != "SEG"]
        return 202, "application/dicom+json", json.dumps(referencing(stored, failed)).encode()

    pacs.reply = refuse_seg  # the new SEG is not stored: version 1 must not be withdrawn
    with pytest.raises(TransientSendError, match="status 0xA700") as err:
        StowSender(5).send(dest(pacs.url), paths[::-1])  # whatever the order of the files
    assert str(err.value).endswith(NOTE_HELD)
    assert [[str(ds.SOPInstanceUID) for ds in post] for post in pacs.posts] == [first[::-1]]
    pacs.reply, pacs.posts = stored_all, []
    StowSender(5).send(dest(pacs.url), paths)
    assert [[str(ds.SOPInstanceUID) for ds in post] for post in pacs.posts] == [first, [note_uid]]
    assert pacs.posts[1][0].ConceptNameCodeSequence[0].CodeValue == "113001"  # "Rejected for Quality Reasons"
