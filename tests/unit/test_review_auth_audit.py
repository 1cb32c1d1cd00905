"""An authentication failure's audit record against an audit file that stalls (a hung network volume; here a FIFO
nobody reads), through the real uvicorn server: the 401's record was written on uvicorn's one event loop, so one
unauthenticated request — anyone on the network can send one — hung /healthz, /readyz and every other request
until the write returned. Only that request may wait for its record now (node.auth). The same for QIDO-RS's
record: tests/unit/test_review_audit.py."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

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
from tests.unit.test_review_audit import _blocked_in_a_pipe_write, _drained

TOKEN = "review-auth-audit-token"


def test_an_unauthenticated_request_against_a_stalled_audit_file_does_not_stop_the_server(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    drain = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # our end: fill the pipe now, empty it at the end
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(drain, b"\n" * 65536)
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": free_port(),
                 "dicomweb_token": TOKEN, "metrics_require_token": True},
        "audit": {"path": str(fifo), "rotate_daily": False},
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    spool, index, metrics = Spool(config.node.spool_dir), Index(engine), Metrics()
    audit = AuditTrail(config.audit, config.node.data_dir, ae_title="PACSNODE")
    auth = Authenticator(TOKEN, metrics=metrics, audit=audit)
    health = HealthProbe(engine, spool.root, lambda: True)
    app = create_app(config, Ingestor(spool, index), index, health=health, metrics=metrics, token=TOKEN,
                     authenticator=auth, audit=audit)
    server = HttpServer(config, app, health=health, metrics=metrics)
    server.start()
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
