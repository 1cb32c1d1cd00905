"""Review of result versions under concurrency, on SQLite and a real PostgreSQL: version N's recording transaction
(node.worker_results) is held open between its "is there a newer version?" check (node.versions.newer_version) and
its COMMIT while the completion sweep queues version N + 1 of the series (a late instance re-opened it) and a second
worker runs that version. Whatever the order, the PACS must end with one live verdict for the series: either
version N publishes nothing, or version N + 1 names N's SR as superseded and its rejection note withdraws N's
objects. The interleavings are made certain by waiting on conditions (the other thread done, at its own check, or
waiting for a database lock), never by sleeping."""

from __future__ import annotations

import threading
import time

import pydicom
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from node import worker_results
from node.completion import CompletionSweeper
from node.config import DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.index import Index
from node.ingest import Ingestor, Origin
from node.queue import JobQueue
from node.schema import results
from node.spool import Spool
from node.states import JobState
from node.worker import Worker
from peers.process import wait_until
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.unit.test_worker import FixedRunner, RecordingSender

LATER = 3600.0  # the sweep's clock runs this far ahead: every series is quiet


@pytest.fixture
def node(db_url, tmp_path):
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "queue": {"max_attempts": 2, "retry_delay_seconds": 0},
        "gate": {"min_slices": 8, "scope_check": False},  # the fixed runner's masks are no real lungs
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })
    engine = create_engine_for(db_url)
    init_schema(engine)
    # The sweep gets its own engine; on SQLite it meets a held write lock at once instead of after busy_timeout
    # (30 s: the sweep would then fail the same way, and the next sweep would try again).
    sweep_engine = create_engine_for(db_url)
    if sweep_engine.dialect.name == "sqlite":
        sa.event.listen(sweep_engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=0"))
    queue = JobQueue(engine, config.queue)
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: RecordingSender()})
    sweeper = CompletionSweeper(config, sweep_engine, JobQueue(sweep_engine, config.queue),
                                clock=lambda: time.time() + LATER)
    yield config, engine, Ingestor(Spool(config.node.spool_dir), Index(engine)), queue, dispatcher, sweeper
    sweep_engine.dispose()
    engine.dispose()


def _accept(ingestor, paths):
    for path in paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))


def _waiting_for_a_lock(engine) -> bool:
    """Another PostgreSQL session of this database waits for a lock (SQLite: the sweep fails at once instead)."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )).scalar())


def _not_withdrawn(engine, series_uid: str) -> set[str]:
    """The SOP Instance UIDs recorded for an older version of the series that no later version's rejection note
    withdraws: each one is a verdict left live at the PACS beside the newest."""
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(results).where(results.c.series_uid == series_uid)))
    newest = max(r.version for r in rows)
    withdrawn = set()
    for r in rows:
        if r.kind == "kos":
            kos = pydicom.dcmread(r.path)
            withdrawn |= {sop.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                          for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    return {r.sop_uid for r in rows if r.version < newest and r.kind != "kos"} - withdrawn


@pytest.mark.parametrize("order", ["newer_done_first", "newer_reads_first"])
def test_a_version_queued_while_the_previous_one_records_leaves_one_live_verdict(node, tmp_path, monkeypatch, order):
    """``newer_done_first``: version 2 is queued, run and recorded while version 1's transaction is open.
    ``newer_reads_first``: version 2 reads the previous results then, and records after version 1's COMMIT. On the
    old code either left version 1's SR/SEG live beside version 2's: 1 saw no job for 2 at its check, 2 saw no
    results of 1 when it built its objects, so no rejection note withdrew them."""
    config, engine, ingestor, queue, dispatcher, sweeper = node
    series = write_ct_series(tmp_path / "s", size=32, slices=11, seed=21)
    _accept(ingestor, series.paths[:10])
    assert [v for _, v, _ in sweeper.sweep()] == [1]
    first = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    second = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.2))
    first.warm_up()
    second.warm_up()
    job = queue.claim(first.worker_id)
    assert job is not None and job.version == 1
    _accept(ingestor, series.paths[10:])  # a late instance re-opens the series while version 1 runs

    first_committed = threading.Event()
    second_at_check = threading.Event()
    started = threading.Event()
    outcome: dict[str, object] = {}

    def version_2() -> None:  # the completion sweep, then the second worker
        try:
            outcome["swept"] = [v for _, v, _ in sweeper.sweep()]
        except OperationalError:  # SQLite: version 1's transaction holds the write lock
            outcome["swept"] = "locked"
            return
        if (claimed := queue.claim(second.worker_id)) is not None:
            outcome["second"] = second.process(claimed)

    newer_version = worker_results.newer_version
    thread = threading.Thread(target=version_2, name="version-2")

    def checked(conn, series_uid, version):
        newer = newer_version(conn, series_uid, version)
        if version == 1 and not started.is_set():  # version 1, between its check and its COMMIT
            started.set()
            thread.start()
            wait_until(lambda: not thread.is_alive() or second_at_check.is_set() or _waiting_for_a_lock(engine),
                       20.0, "version 2 done, at its check, or waiting for a lock", interval=0.02)
        elif version == 2 and order == "newer_reads_first":
            second_at_check.set()  # built on what it read; records once version 1 committed
            assert first_committed.wait(20.0)
        return newer

    monkeypatch.setattr(worker_results, "newer_version", checked)
    first_state = first.process(job)
    first_committed.set()
    thread.join(30.0)
    assert not thread.is_alive()
    if outcome["swept"] == "locked":  # the next sweep queues version 2
        assert [v for _, v, _ in sweeper.sweep()] == [2]
    second.run_pending()

    with engine.connect() as conn:
        versions = {r.version for r in conn.execute(sa.select(results.c.version)
                                                      .where(results.c.series_uid == series.series_uid))}
    assert 2 in versions
    assert first_state in (JobState.DONE, JobState.SKIPPED)
    assert _not_withdrawn(engine, series.series_uid) == set()
