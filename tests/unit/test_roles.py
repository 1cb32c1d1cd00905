"""Process roles (node.roles, node.service with ``role=``): which stages a role starts, who a process is on the
database, that a listener never imports TensorFlow, and that a worker in its own process finds a new job quickly."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from node.config import NodeConfig, Priority
from node.queue import jobs
from node.roles import STAGES, Identity, Stage, role_config, runs, worker_poll_seconds
from node.service import Service
from node.states import Role
from peers.process import free_port, wait_until
from tests.unit.test_worker import FixedRunner

REPO = Path(__file__).resolve().parents[2]


def config_for(tmp_path: Path, **node: object) -> NodeConfig:
    return NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "http_port": free_port(), **node},
        "queue": {"max_attempts": 1},
    })


def test_every_stage_runs_in_exactly_one_role_and_all_runs_them_all():
    roles = [Role.LISTENER, Role.WORKER, Role.DISPATCHER]
    for stage in STAGES[Role.ALL]:
        assert sum(runs(role, stage) for role in roles) == 1, stage
    assert runs(Role.LISTENER, Stage.FRONT_DOORS) and not runs(Role.LISTENER, Stage.WORKER)


def test_identity_names_instance_role_and_index(tmp_path):
    config = config_for(tmp_path, instance_id="ct-west")
    assert Identity.of(config, Role.LISTENER, 1).node_id == "ct-west:listener-1"
    assert Identity.of(config).instance_prefix == "ct-west:"
    assert Identity.of(config_for(tmp_path)).instance_id  # the host name by default
    with pytest.raises(ValueError, match="index"):
        Identity.of(config, Role.WORKER, -1)


def test_a_lone_dispatcher_and_worker_poll_at_the_wake_interval(tmp_path):
    config = config_for(tmp_path, wake_poll_seconds=0.05)
    assert role_config(config, Role.DISPATCHER).dispatch.poll_seconds == 0.05
    assert role_config(config, Role.ALL) is config  # in one process events wake them
    assert worker_poll_seconds(config, Role.WORKER) == 0.05
    assert worker_poll_seconds(config, Role.ALL) == 1.0


def test_a_role_starts_only_its_stages(tmp_path):
    service = Service(config_for(tmp_path), runner_factory=FixedRunner, role=Role.DISPATCHER)
    service.start()
    try:
        loops = set(service.heartbeats.snapshot())
        assert {"commitment", "reachability", "retention"} <= loops
        assert not loops & {"dimse", "http", "worker", "completion"}
        assert service.pid_file.name == "pacsnode-dispatcher-0.pid"
    finally:
        service.stop(5)


LISTENER_SCRIPT = """
import json, sys
from node.config import NodeConfig
from node.scu import Peer, echo
from node.service import Service
from node.states import Role
from peers.process import free_port
config = NodeConfig.model_validate({"node": {"data_dir": sys.argv[1], "port": free_port(), "http_port": free_port()}})
assert config.worker.enabled  # the worker is on: only the role keeps TensorFlow out
service = Service(config, role=Role.LISTENER)
service.start()
host, port = service.dimse.address
status = echo(Peer(host, port, called_ae=config.node.ae_title, calling_ae="ECHO"))
service.stop(5)
print(json.dumps({"echo": status, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in
                                                   ("tensorflow", "keras", "tf_keras"))}))
"""


def test_a_listener_process_never_imports_tensorflow(tmp_path):
    done = subprocess.run([sys.executable, "-c", LISTENER_SCRIPT, str(tmp_path / "data")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"echo": 0, "loaded": []}


def _finished(engine: sa.Engine, job_id: int) -> Any:
    """The job's row once it has finished (read through ``engine``), else None."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
    return row if row.finished_at is not None else None


def test_a_worker_in_its_own_process_claims_a_new_job_within_the_wake_interval(tmp_path):
    """The job is written through another engine, as a listener process would; no event reaches the worker."""
    config = config_for(tmp_path, wake_poll_seconds=0.1)
    worker = Service(config, runner_factory=FixedRunner, role=Role.WORKER)
    worker.start()
    other = sa.create_engine(config.database_url)
    waits = []
    try:
        assert worker.worker.ready.wait(30)
        for n in range(6):
            with other.begin() as conn:
                job_id = worker.queue.enqueue(conn, f"1.2.3.{n}", 1, Priority.ROUTINE)
            row = wait_until(lambda job_id=job_id: _finished(other, job_id), 10, f"job {job_id} to be claimed and finished",
                             interval=0.02)
            assert row.queue_seconds is not None, f"job {job_id} never claimed"
            waits.append(row.queue_seconds)
    finally:
        other.dispose()
        worker.stop(5)
    # Polled every 0.1 s: a claim waits 0.05 s on average (a 1 s poll would wait 0.5 s).
    assert statistics.median(waits) < 0.2 and max(waits) < 0.4, waits


def test_a_listeners_completion_wakes_the_worker_process_long_before_its_poll(tmp_path):
    """node.wakeup: the worker polls every 10 s here; the listener's completion callback wakes it at once."""
    config = config_for(tmp_path, wake_poll_seconds=10)
    worker = Service(config, runner_factory=FixedRunner, role=Role.WORKER)
    listener = Service(config, runner_factory=FixedRunner, role=Role.LISTENER)  # not started: only its callback
    worker.start()
    other = sa.create_engine(config.database_url)
    try:
        assert worker.worker.ready.wait(30)
        wait_until(lambda: list((tmp_path / "data" / "run").glob("worker-*.sock")), 10, "the worker's wake socket")
        with other.begin() as conn:
            job_id = worker.queue.enqueue(conn, "1.2.3.9", 1, Priority.ROUTINE)
        listener._work_queued("1.2.3.9", 1)
        row = wait_until(lambda: _finished(other, job_id), 8, "the job claimed before the worker's next poll",
                         interval=0.02)
        assert row.queue_seconds < 2, row.queue_seconds
    finally:
        other.dispose()
        worker.stop(5)
        listener.wakeups.close()
        listener.engine.dispose()


def test_a_worker_processes_results_wake_the_dispatcher_process(tmp_path):
    config = config_for(tmp_path, wake_poll_seconds=10)
    dispatcher = Service(config, runner_factory=FixedRunner, role=Role.DISPATCHER)
    worker = Service(config, runner_factory=FixedRunner, role=Role.WORKER)  # not started: only its dispatcher handle
    woken = []
    threads = dispatcher.dispatcher._threads
    original = threads.wake
    threads.wake = lambda: (woken.append(1), original())  # the dispatcher's own wake, counted
    dispatcher.start()
    try:
        wait_until(lambda: list((tmp_path / "data" / "run").glob("dispatcher-*.sock")), 10, "the dispatcher's socket")
        assert worker.dispatcher.remote_wake is not None and dispatcher.dispatcher.remote_wake is None
        worker.dispatcher.wake()  # what the worker calls after committing a job's results and deliveries
        wait_until(lambda: woken, 5, "the dispatcher process woken")
    finally:
        dispatcher.stop(5)
        worker.wakeups.close()
        worker.engine.dispose()
