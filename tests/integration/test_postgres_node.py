"""The node on PostgreSQL, end to end: `pacsnode serve` with ``[database] url`` pointing at a real PostgreSQL server
(peers/postgres.py), DCMTK storescu as the modality, Orthanc as the PACS. The series must end as one SR, one SEG and one
key-images KO at Orthanc, with every acknowledged instance, the job and the delivery in PostgreSQL's tables, and
`pacsnode status` reading them from there; a restart of the node on the same database finds nothing to redo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from peers import dcmtk
from tests.conftest import (
    REPO,
    free_port,
    launch_node,
    require_weights,
    wait_until,
)
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration


def test_a_series_goes_through_a_node_on_postgresql(postgres_server, orthanc_factory, tmp_path) -> None:
    require_weights()
    url = postgres_server.create_database()
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    toml = f"""
[database]
url = "{url}"
[completion]
stable_seconds = 5
sweep_seconds = 0.5
[gate]
scope_check = false
[dispatch]
initial_backoff_seconds = 0.5
{orthanc.destination_toml()}"""
    node = launch_node(tmp_path / "node", port=node_port, extra_toml=toml)
    engine = sa.create_engine(url)
    try:
        series = write_ct_series(tmp_path / "ct", slices=20, size=64, seed=5)
        dcmtk.storescu(node.port, *series.paths, calling_ae="CT-PG", check=True, timeout=120)

        wait_until(lambda: {"SR", "SEG", "KO"} <= {
            s["MainDicomTags"]["Modality"] for s in orthanc.find("Series", {"StudyInstanceUID": series.study_uid})
        }, 180, "SR, SEG and KO at Orthanc from the node on PostgreSQL", lambda: node.log_text()[-3000:])

        def delivered() -> list[str] | None:  # Orthanc holds the objects a moment before the dispatcher records it
            with engine.connect() as conn:
                states = conn.execute(sa.text("select state from deliveries where series_uid = :s"),
                                      {"s": series.series_uid}).scalars().all()
            return states if states and all(s == "delivered" for s in states) else None

        wait_until(delivered, 30, "the delivery recorded as delivered", lambda: node.log_text()[-3000:])
        with engine.connect() as conn:
            stored = set(conn.execute(sa.text("select sop_uid from instances where series_uid = :s"),
                                      {"s": series.series_uid}).scalars())
            job = conn.execute(sa.text("select state from jobs where series_uid = :s"), {"s": series.series_uid}).one()
            deliveries = conn.execute(sa.text("select state from deliveries where series_uid = :s"),
                                      {"s": series.series_uid}).scalars().all()
        assert stored == set(series.sop_uids)
        assert job.state == "done" and deliveries == ["delivered"]
        status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(node.config_path)],
                                cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(status.stdout)
        assert report["series"].get("complete") == 1 and report["jobs"].get("done") == 1, report
    finally:
        node.stop()
    # a restart on the same database resumes from it and finds nothing left to do
    node = launch_node(tmp_path / "node", port=node_port, extra_toml=toml)
    try:
        with engine.connect() as conn:
            again = conn.execute(sa.text("select count(*) from jobs")).scalar()
        assert again == 1
        assert len(orthanc.find("Instance", {"StudyInstanceUID": series.study_uid, "Modality": "SR"})) == 1
    finally:
        node.stop()
        engine.dispose()
