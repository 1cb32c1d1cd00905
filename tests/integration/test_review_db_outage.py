"""The shared database goes away while a scanner sends: PostgreSQL restarted for maintenance (or failed over) with
`pg_ctl stop -m fast`, which cuts every connection the node holds. DCMTK storescu is the modality, Orthanc the PACS.

What a hospital needs: while the database is down no instance is acknowledged that the node could not index (a
failure status, so the scanner keeps it and sends again), the node keeps running, and once the database is back it
takes the re-send, completes the series and delivers its results without anyone restarting it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from peers import dcmtk
from peers.postgres import PostgresServer
from tests.conftest import free_port, launch_node, require_weights, throwaway_postgres, wait_until
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration


@pytest.fixture
def restartable_postgres():
    """A PostgreSQL cluster of this test's own, since the test stops it (the session's is shared)."""
    yield from throwaway_postgres("pacsnode-pg-outage-")


def _indexed(url: str, series_uid: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("select sop_uid from instances where series_uid = :s"),
                                    {"s": series_uid}).scalars())
    finally:
        engine.dispose()


COMPLETION = """
[completion]
stable_seconds = 4
sweep_seconds = 0.5
[gate]
scope_check = false
"""


def _outage_mid_series(node, pg: PostgresServer, url: str, series) -> None:  # noqa: ANN001 - peers' own types
    """Six slices, then the database goes away while four more are sent, then comes back and the scanner sends the
    whole series again: nothing the node said Success to may be missing, and every instance ends up indexed."""
    dcmtk.storescu(node.port, *series.paths[:6], calling_ae="CT-OUTAGE", check=True, timeout=120)
    pg.pause()
    during = dcmtk.store_responses_of(node.port, series.paths[6:10], calling_ae="CT-OUTAGE", called_ae="PACSNODE",
                                      timeout=120)
    assert node.running, node.log_text()[-3000:]
    acknowledged = [p for p, answer in during.items() if answer.startswith("Success")]
    pg.resume()
    by_path = dict(zip(map(str, series.paths), series.sop_uids, strict=True))
    assert {by_path[p] for p in acknowledged} <= _indexed(url, series.series_uid), (during, node.log_text()[-3000:])
    dcmtk.storescu(node.port, *series.paths, calling_ae="CT-OUTAGE", check=True, timeout=120)
    wait_until(lambda: _indexed(url, series.series_uid) == set(series.sop_uids), 60,
               "every instance indexed after the database came back", lambda: node.log_text()[-3000:])


def _jobs(url: str, series_uid: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("select count(*) from jobs where series_uid = :s"),
                                    {"s": series_uid}).scalar_one())
    finally:
        engine.dispose()


def test_a_database_restart_mid_series_loses_nothing_and_needs_no_node_restart(restartable_postgres, tmp_path) -> None:
    """The receive side and completion (no worker, no PACS: the default suite's share; the whole pipeline to Orthanc
    is the slow test below)."""
    pg = restartable_postgres
    url = pg.create_database()
    node = launch_node(tmp_path / "node", extra_toml=COMPLETION + "[worker]\nenabled = false\n", database_url=url)
    try:
        series = write_ct_series(tmp_path / "ct", slices=16, size=64, seed=11)
        _outage_mid_series(node, pg, url, series)
        # completion works again (once, or twice if a slow restart let the first six complete before the re-send)
        wait_until(lambda: _jobs(url, series.series_uid) >= 1, 60, "the series completed and queued",
                   lambda: node.log_text()[-3000:])
        assert node.running
    finally:
        node.stop()


@pytest.mark.slow  # ~45 s with the worker's models and Orthanc
def test_after_a_database_restart_the_results_still_reach_the_pacs(restartable_postgres, orthanc_factory,
                                                                    tmp_path) -> None:
    require_weights()
    pg = restartable_postgres
    url = pg.create_database()
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"node": ("PACSNODE", "127.0.0.1", node_port)})
    toml = COMPLETION + f"""[dispatch]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2
{orthanc.destination_toml()}"""
    node = launch_node(tmp_path / "node", port=node_port, extra_toml=toml, database_url=url)
    try:
        series = write_ct_series(tmp_path / "ct", slices=16, size=64, seed=11)
        _outage_mid_series(node, pg, url, series)
        wait_until(lambda: {"SR", "SEG", "KO"} <= {
            s["MainDicomTags"]["Modality"] for s in orthanc.find("Series", {"StudyInstanceUID": series.study_uid})
        }, 180, "SR, SEG and KO at Orthanc after the outage", lambda: node.log_text()[-4000:])
        assert node.running
    finally:
        node.stop()
