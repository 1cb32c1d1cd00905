"""Unit tests for node/reachability.py: what a check round records (real SQLite, a recorder standing in for the
network check, an injected clock), the real checks against a closed port, a real pynetdicom SCP and an HTTP server
redirecting to a login page, the loop's re-check on reload, and the per-destination report."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher, deliveries
from node.errors import SendError
from node.reachability import Reachability, ReachabilityLoop, check_destination, destination_report
from node.states import DeliveryState
from node.supervise import Heartbeats
from tests.conftest import free_port, wait_until
from tests.fakeclock import FakeClock


def dimse(name: str, port: int = 104, ae: str = "PACS") -> Destination:
    return Destination(name=name, kind=DestinationKind.DIMSE, ae_title=ae, host="127.0.0.1", port=port)


class Checker:
    def __init__(self) -> None:
        self.down: dict[str, str] = {}
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, dest: Destination, calling_ae: str, timeout: float) -> None:
        with self.lock:
            self.calls.append(dest.name)
        if dest.name in self.down:
            raise SendError(self.down[dest.name])


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    return engine


def test_a_round_records_reachable_and_why_not_and_keeps_the_last_success(engine):
    clock, checker = FakeClock(1000.0), Checker()
    config = NodeConfig(destinations=(dimse("a"), dimse("b")))
    reach = Reachability(config, engine, check=checker, clock=clock)
    checker.down["b"] = "association refused"
    assert reach.check_all() == {"a": True, "b": False}
    clock.advance(60)
    checker.down["a"] = "C-ECHO status 0x0110"
    reach.check_all()
    rows = {r["destination"]: r for r in destination_report(config, engine)}
    assert rows["a"]["reachable"] is False and rows["a"]["reason"] == "C-ECHO status 0x0110"
    assert rows["a"]["checked_at"] == 1060.0 and rows["a"]["last_success_at"] == 1000.0
    assert rows["b"]["last_success_at"] is None and rows["b"]["reason"] == "association refused"
    assert reach.up() == {"a": False, "b": False}
    reach.config = NodeConfig(destinations=(dimse("a"),))  # b removed from the config: its row goes
    reach.check_all()
    assert reach.up() == {"a": False}


def test_real_checks_a_closed_port_and_a_pynetdicom_scp(engine):
    with pytest.raises(SendError):
        check_destination(dimse("closed", port=free_port()), "PACSNODE", 2.0)
    ae = AE(ae_title="ECHOER")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    try:
        check_destination(dimse("up", port=port, ae="ECHOER"), "PACSNODE", 5.0)
        with pytest.raises(SendError):  # wrong called AE title: the association is rejected
            check_destination(dimse("wrong-ae", port=port, ae="OTHER"), "PACSNODE", 5.0)
    finally:
        server.shutdown()
    web = Destination(name="w", kind=DestinationKind.DICOMWEB, url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(SendError, match="unreachable"):
        check_destination(web, "PACSNODE", 2.0)


def test_the_loop_checks_at_start_and_again_on_reload(engine):
    checker = Checker()
    heartbeats = Heartbeats()
    loop = ReachabilityLoop(Reachability(NodeConfig(destinations=(dimse("a"),)), engine, check=checker), heartbeats)
    loop.start()
    try:
        wait_until(lambda: checker.calls == ["a"], 10, "the first check at start")
        loop.apply_config(NodeConfig(destinations=(dimse("a"), dimse("b"))))
        wait_until(lambda: sorted(checker.calls) == ["a", "a", "b"], 10, "a new round after the reload")
        assert "reachability" in heartbeats.snapshot() and heartbeats.problems() == []
    finally:
        loop.stop()
    assert "reachability" not in heartbeats.snapshot()


def test_the_report_counts_backlog_dead_and_delivered_per_destination(engine, tmp_path):
    config = NodeConfig(destinations=(dimse("a"), dimse("b")))
    dispatcher = Dispatcher(config, engine, {})
    for v in (1, 2, 3):
        dispatcher.enqueue("1.2.3", v, [tmp_path / "x.dcm"], ["1.2.3.4"])
    with engine.begin() as conn:
        conn.execute(deliveries.update().where(deliveries.c.version == 2).values(state=DeliveryState.DEAD.value))
        conn.execute(deliveries.update().where(deliveries.c.version == 3, deliveries.c.destination == "a")
                     .values(state=DeliveryState.DELIVERED.value))
    rows = {r["destination"]: r for r in destination_report(config, engine)}
    assert (rows["a"]["backlog"], rows["a"]["dead"], rows["a"]["delivered"]) == (1, 1, 1)
    assert (rows["b"]["backlog"], rows["b"]["dead"], rows["b"]["delivered"]) == (2, 1, 0)
    assert rows["a"]["reachable"] is None and rows["a"]["commitment"] is False


class _WebAnswer(BaseHTTPRequestHandler):
    """QIDO-RS as a misconfigured front end answers it: ``/studies`` redirects to a login page (200 HTML)."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        mode = self.server.mode  # type: ignore[attr-defined]
        if self.path.startswith("/login"):
            self._send(200, "text/html; charset=utf-8", b"<html><form>Sign in</form></html>")
        elif mode == "redirect":
            self._send(302, "text/html", b"", "Location", "/login?next=%2Fdicom-web")
        elif mode == "html":
            self._send(200, "text/html", b"<html>proxy says hi</html>")
        else:
            self._send(200, "application/dicom+json; charset=utf-8", b"[]")

    def _send(self, status: int, ctype: str, body: bytes, *header: str) -> None:
        self.send_response(status)
        if header:
            self.send_header(*header)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_dicomweb_check_follows_no_redirect_and_takes_no_html_page_for_a_pacs():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _WebAnswer)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    web = Destination(name="w", kind=DestinationKind.DICOMWEB, url=f"{base}/dicom-web")
    try:
        httpd.mode = "redirect"  # type: ignore[attr-defined]
        with pytest.raises(SendError, match=f"HTTP 302, a redirect to {base}/login \\(not followed\\)"):
            check_destination(web, "PACSNODE", 5.0)
        httpd.mode = "html"  # type: ignore[attr-defined]
        with pytest.raises(SendError, match="HTML page"):
            check_destination(web, "PACSNODE", 5.0)
        httpd.mode = "qido"  # type: ignore[attr-defined]
        check_destination(web, "PACSNODE", 5.0)
    finally:
        httpd.shutdown()
