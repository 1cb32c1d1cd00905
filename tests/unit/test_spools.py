"""Spool ids: a listener records files relative to its spool under its spool id; a worker on "another host" (another
data dir, the listener's spool reached through a [spools] mount point) resolves and processes them; an unmapped spool
fails the job with a clear error; rows from before spool ids (absolute path, no spool id) stay readable."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from node.config import DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.errors import ConfigError
from node.index import Index
from node.ingest import Ingestor
from node.queue import JobQueue
from node.schema import instances
from node.spool import Spool
from node.spools import Spools, UnknownSpoolError
from node.states import JobState
from node.worker import Worker
from tests.unit.test_worker import FixedRunner, RecordingSender, queue_job, receive

DEST = [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]


def _config(data_dir: Path, spool_id: str | None = None, spools: dict[str, str] | None = None) -> NodeConfig:
    return NodeConfig.model_validate({
        "node": {"data_dir": str(data_dir), "spool_id": spool_id}, "spools": spools or {},
        "queue": {"max_attempts": 1, "retry_delay_seconds": 0},
        "gate": {"min_slices": 8, "scope_check": False}, "destinations": DEST,
    })


@pytest.fixture
def shared(tmp_path):
    """One database; a listener on "host A" writing spool "spool-a" under its own data dir."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    listener = _config(tmp_path / "host-a", "spool-a")
    ingestor = Ingestor(Spool(listener.node.spool_dir, spool_id="spool-a"), Index(engine))
    yield engine, listener, ingestor
    engine.dispose()


def _worker(config: NodeConfig, engine) -> tuple[Worker, JobQueue]:
    queue = JobQueue(engine, config.queue)
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: RecordingSender()})
    return Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)), queue


def test_rows_carry_the_spool_id_and_a_path_relative_to_its_root(shared, tmp_path):
    engine, listener, ingestor = shared
    series = receive(ingestor, tmp_path, "s", slices=10, seed=1)
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(instances.c.spool_id, instances.c.path)))
    assert {r.spool_id for r in rows} == {"spool-a"}
    assert all(not Path(r.path).is_absolute() and r.path.startswith(f"{series.study_uid}/") for r in rows)
    assert all((listener.node.spool_dir / r.path).is_file() for r in rows)


def test_a_worker_on_another_host_reads_the_listeners_spool_through_its_mount_point(shared, tmp_path):
    engine, listener, ingestor = shared
    series = receive(ingestor, tmp_path, "s", slices=10, seed=2)
    mount = tmp_path / "mnt-a"
    mount.symlink_to(listener.node.spool_dir)  # the worker host's mount of host A's spool
    worker, queue = _worker(_config(tmp_path / "host-b", "spool-b", {"spool-a": str(mount)}), engine)
    job_id = queue_job(queue, series.series_uid)
    assert worker.run_pending() == 1
    assert queue.get(job_id).state == JobState.DONE


def test_an_unmapped_spool_fails_the_job_with_a_clear_error(shared, tmp_path):
    engine, _listener, ingestor = shared
    series = receive(ingestor, tmp_path, "s", slices=10, seed=3)
    worker, queue = _worker(_config(tmp_path / "host-b", "spool-b"), engine)
    job_id = queue_job(queue, series.series_uid)
    assert worker.run_pending() == 1  # the worker goes on
    job = queue.get(job_id)
    assert job.state == JobState.DEAD
    assert "UnknownSpoolError" in job.last_error and "'spool-a'" in job.last_error and "[spools]" in job.last_error


def test_rows_from_before_spool_ids_keep_their_absolute_path(tmp_path):
    spools = Spools(_config(tmp_path / "d", "local"))
    assert spools.resolve(None, "/var/old/spool/1/2/3.dcm") == Path("/var/old/spool/1/2/3.dcm")
    assert spools.resolve("local", "1/2/3.dcm") == tmp_path / "d" / "spool" / "1/2/3.dcm"
    with pytest.raises(UnknownSpoolError):
        spools.resolve("elsewhere", "1/2/3.dcm")


def test_a_spool_without_an_id_writes_absolute_paths_as_before(tmp_path):
    spool = Spool(tmp_path / "s")
    assert spool.key(tmp_path / "s" / "1" / "2" / "3.dcm") == str(tmp_path / "s" / "1" / "2" / "3.dcm")


@pytest.mark.parametrize("spools, message", [
    ({"local": "/mnt/x"}, "own spool"),
    ({"other": "relative/dir"}, "absolute path"),
    ({"bad id!": "/mnt/x"}, "pattern"),
])
def test_spool_mount_points_are_checked(tmp_path, spools, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        _config(tmp_path, "local", spools)


def test_without_a_spool_id_a_node_records_absolute_paths_as_before(tmp_path):
    """The default (one machine): the node's own Spool has no id, rows keep absolute paths and a NULL spool id."""
    config = _config(tmp_path / "d")
    assert config.node.spool_id is None and Spools(config).roots == {}
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    receive(Ingestor(Spool(config.node.spool_dir, spool_id=config.node.spool_id), Index(engine)), tmp_path, "s",
            slices=4, seed=4)
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(instances.c.spool_id, instances.c.path)))
    engine.dispose()
    assert rows and all(r.spool_id is None and Path(r.path).is_absolute() and Path(r.path).is_file() for r in rows)
