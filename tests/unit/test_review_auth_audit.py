"""An authentication failure's audit record against an audit file that stalls (a hung network volume; here a FIFO
nobody reads), through the real uvicorn server: the 401's record was written on uvicorn's one event loop, so one
unauthenticated request — anyone on the network can send one — hung /healthz, /readyz and every other request
until the write returned. Only that request may wait for its record now (node.auth). The same for QIDO-RS's
record: tests/unit/test_review_audit.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import httpx

from node.audit import AuditTrail
from node.auth import Authenticator
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.metrics import Metrics
from node.spool import Spool
from tests.conftest import free_port, wait_until
from tests.unit.test_review_audit import _blocked_in_a_pipe_write, _drained, stalled_fifo

TOKEN = "review-auth-audit-token"


def _served(tmp_path: Path, **audit: object) -> tuple[HttpServer, AuditTrail, Metrics, Any]:
    """The HTTP app with a token on a real uvicorn server, its audit trail configured by ``audit``; started."""
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port(),
                 "dicomweb_token": TOKEN, "metrics_require_token": True},
        "audit": audit,
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    spool, index, metrics = Spool(config.node.spool_dir), Index(engine), Metrics()
    trail = AuditTrail(config.audit, config.node.data_dir, ae_title="PACSNODE")
    auth = Authenticator(TOKEN, metrics=metrics, audit=trail)
    health = HealthProbe(engine, spool.root, lambda: True)
    app = create_app(config, Ingestor(spool, index), index, health=health, metrics=metrics, token=TOKEN,
                     authenticator=auth, audit=trail)
    server = HttpServer(config, app, health=health, metrics=metrics)
    server.start()
    return server, trail, metrics, engine


def test_an_unauthenticated_request_against_a_stalled_audit_file_does_not_stop_the_server(tmp_path: Path) -> None:
    fifo, drain = stalled_fifo(tmp_path)
    server, audit, _, engine = _served(tmp_path, path=str(fifo), rotate_daily=False)
    base = f"http://127.0.0.1:{server.port}"
    answers: list[int] = []
    refused = threading.Thread(target=lambda: answers.append(httpx.get(f"{base}/dicomweb/studies", timeout=60)
                                                             .status_code), daemon=True)
    try:
        refused.start()
        wait_until(_blocked_in_a_pipe_write, 10, "the 401's audit record blocked on the audit pipe")
        assert httpx.get(f"{base}/healthz", timeout=5).text == "ok"
        with_token = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert with_token.status_code == 200
    finally:
        wait_until(lambda: (_drained(drain), not refused.is_alive())[1], 30, "the refused request answered")
        server.stop()
        audit.close()
        engine.dispose()
        os.close(drain)
    assert answers == [401]  # answered once its record was written


def test_an_unauthenticated_flood_does_not_grow_the_audit_trail_without_bound(tmp_path: Path, monkeypatch) -> None:
    """Each 401 was logged and audited (~1.2 KB a record, kept for good by default): a client refused a thousand
    times a second grew the trail ~100 GB a day on the data disk until the disk admission paused intake. Now an
    address's first RECORD_BURST failures on a surface per window are recorded, the rest counted, and their
    number recorded with the address's next failure after the window."""
    from node import auth as auth_module
    from node.audit import read_records

    monkeypatch.setattr(auth_module, "RECORD_WINDOW_SECONDS", 600.0)  # the whole flood in one window
    server, audit, metrics, engine = _served(tmp_path)
    url = f"http://127.0.0.1:{server.port}/dicomweb/studies"
    try:
        with httpx.Client(timeout=10) as client:
            answers = [client.get(url).status_code for _ in range(300)]
            monkeypatch.setattr(auth_module, "RECORD_WINDOW_SECONDS", 0.0)  # the window has passed
            answers.append(client.get(url).status_code)
            assert client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        server.stop()
        audit.close()
        engine.dispose()
    assert answers == [401] * 301
    failed = [r["EventIdentification"]["EventOutcomeDescription"] for r in read_records(audit.path)
              if r["event"] in ("auth_failed", "failures_unrecorded")]
    burst = ["dicomweb: bearer token missing"] * auth_module.RECORD_BURST
    assert failed == [*burst, "290 more dicomweb requests refused 401, not recorded one by one",
                      "dicomweb: bearer token missing"], failed  # 12 records for 301 failures, every one accounted
    rendered = metrics.render()[0].decode()
    assert 'pacsnode_auth_failures_total{reason="missing",surface="dicomweb"} 301.0' in rendered
