"""node.logs: each event is one JSON line written in one call, so role processes sharing stderr (unbuffered, as
under PYTHONUNBUFFERED in the Docker image) never glue their lines together; at DEBUG a STOW-RS delivery logs no
credential of its destination."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from node.config import Destination
from node.errors import SendError
from node.logs import configure_logging, get_logger
from node.senders import StowSender
from tests.ctgen import write_ct_series


class Writes:
    """A text stream that records each ``write`` call as the OS would see it unbuffered."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_event_is_one_line_in_one_write():
    stream = Writes()
    configure_logging("INFO", stream)
    try:
        get_logger(component="test").info("instance_stored", sop_uid="1.2.3", size=9514, PatientName="X")
    finally:
        configure_logging("INFO", sys.stderr)
    assert len(stream.calls) == 1, stream.calls
    (line,) = stream.calls
    assert line.endswith("\n") and line.count("\n") == 1
    event = json.loads(line)
    assert event["event"] == "instance_stored" and event["sop_uid"] == "1.2.3"
    assert event.get("PatientName") in (None, "[removed]")  # the PHI filter still runs


class _Stored(BaseHTTPRequestHandler):
    """A PACS that stores whatever is posted (the answer's content does not matter here)."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_debug_level_stow_delivery_logs_no_credentials(tmp_path: Path):
    """dicomweb-client logs each request's URL and headers at DEBUG: neither the bearer token nor the password of
    a ``user:password@`` URL may reach the node's logs."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stored)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://node:pw-s3cret@127.0.0.1:{httpd.server_address[1]}/dicom-web"
    stream = Writes()
    configure_logging("DEBUG", stream)
    try:
        files = write_ct_series(tmp_path / "r", slices=1, size=8).paths
        with contextlib.suppress(SendError):  # stored or not ("{}" names no instance): only the logs matter here
            StowSender(5).send(Destination(name="w", kind="dicomweb", url=url, token="tok-s3cret"), files)
    finally:
        configure_logging("INFO", sys.stderr)
        httpd.shutdown()
    logged = "".join(stream.calls)
    assert '"level": "debug"' in logged  # DEBUG was on (urllib3's connection lines at least)
    assert "s3cret" not in logged


class FullDisk:
    """A log stream on a disk that fills: once ``full``, every write fails with ENOSPC."""

    full = False

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        return len(text)

    def flush(self) -> None:
        pass


def test_a_failing_log_stream_drops_lines_and_never_fails_a_stored_instance(tmp_path: Path):
    """A full log disk made the listener answer a C-STORE it had stored and indexed with a failure status (found by
    review: the log call after the commit raised into pynetdicom's handler), so the modality stopped the series.
    Lines are dropped and counted instead."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from node.logs import dropped_lines
    from node.metrics import Metrics
    from tests.unit.test_hostile_dimse import AE_TITLE, Node

    files = write_ct_series(tmp_path / "s", slices=3, size=16).paths
    metrics = Metrics()
    before = dropped_lines()
    stream = FullDisk()
    configure_logging("INFO", stream)  # type: ignore[arg-type]
    node = Node(tmp_path / "n")  # its loggers bind the stream configured now
    try:
        stream.full = True
        get_logger(component="test").info("anything")
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(*node.address, ae_title=AE_TITLE)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(p).Status) for p in files]
        assoc.release()
    finally:
        stream.full = False  # space is back
        node.stop()
        configure_logging("INFO", sys.stderr)
    assert statuses == [0, 0, 0]
    assert len(node.spooled()) == 3
    assert dropped_lines() > before + 3  # the node logs each stored instance
    assert "pacsnode_log_lines_dropped_total" in metrics.render()[0].decode()
