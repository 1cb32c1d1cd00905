"""`pacsnode status` and `pacsnode retry` against a real database written by the stages themselves."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa

from node.config import Priority, load_config
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher, deliveries
from node.index import Index, InstanceRecord
from node.queue import JobQueue
from node.states import DeliveryState
from tests.conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_status_and_retry(tmp_path):
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        '[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    config = load_config(config_path, environ={})
    engine = create_engine_for(config.database_url)
    init_schema(engine)
    Index(engine).record_instance(InstanceRecord(
        sop_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", path="/x", size=1, sha256="0" * 64, modality="CT",
    ))
    queue = JobQueue(engine, config.queue)
    with engine.begin() as conn:
        queue.enqueue(conn, "1.2.3", 1, Priority.ROUTINE)
    job = queue.claim("w")
    for _ in range(config.queue.max_attempts):
        queue.fail(job, "w", "model exploded")
        with engine.begin() as conn:
            conn.execute(sa.text("update jobs set due_at = 0"))
        job = queue.claim("w") or job
    dispatcher = Dispatcher(config, engine, {})
    (delivery_id,) = dispatcher.enqueue("1.2.3", 1, [tmp_path / "sr.dcm"], ["1.2.9"])
    with engine.begin() as conn:
        conn.execute(deliveries.update().values(state=DeliveryState.DEAD, last_error="PACS refused: 0xA900"))

    status = run("status", "--config", str(config_path), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["series"] == {"receiving": 1}
    assert report["jobs"] == {"dead": 1}
    assert report["deliveries"] == {"pacs": {"dead": 1}}
    assert "model exploded" in report["job_errors"][0]["last_error"]
    # the dead job left no object for the PACS (no result, no failure report): an alert an admin sees
    assert [(a["series_uid"], a["version"]) for a in report["alerts"]] == [("1.2.3", 1)]
    assert report["routes"] == {}
    assert "0xA900" in report["delivery_errors"][0]["last_error"]
    text = run("status", "--config", str(config_path))
    assert "deliveries to pacs: dead 1" in text.stdout
    assert "ALERT job" in text.stdout
    from node.worker import results  # a recorded result (e.g. the failure report) clears the alert

    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(results.insert().values(
            series_uid="1.2.3", version=1, job_id=1, kind="skipped-sr", study_uid="1.2", result_series_uid="1.2.4",
            sop_uid="1.2.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", path="/x", created_at=0.0,
        ))
    assert json.loads(run("status", "--config", str(config_path), "--json").stdout)["alerts"] == []

    empty = run("retry", "--config", str(config_path), "--delivery")  # `--delivery $IDS` with $IDS empty
    assert empty.returncode == 2 and "--delivery" in empty.stderr  # an error, not "every dead delivery"
    assert dispatcher.get(delivery_id).state == DeliveryState.DEAD
    retried = run("retry", "--config", str(config_path), "--jobs")
    assert retried.returncode == 0, retried.stderr
    assert "1 deliveries queued again" in retried.stdout and "1 dead jobs queued again" in retried.stdout
    assert dispatcher.get(delivery_id).state == DeliveryState.PENDING
    # its failure report was recorded: replayed as the series' next version, the dead one ended (node.versions)
    assert queue.counts() == {"queued": 1, "skipped": 1}
    engine.dispose()
