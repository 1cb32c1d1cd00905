"""Review of the worker at crash and timing points: interleavings made certain by delays injected into the node's
own functions, with the fixed model runner of test_worker."""

from __future__ import annotations

import time

from structlog.testing import capture_logs

from node.config import QueueSection
from node.queue import JobQueue
from node.results import SkipReason
from node.states import JobState
from node.worker import Worker
from tests.unit.test_worker import FixedRunner, node, queue_job, receive  # noqa: F401 - node is a fixture


def test_a_heartbeat_after_the_refusal_committed_does_not_turn_the_job_into_a_lost_lease(node, tmp_path,  # noqa: F811
                                                                                          monkeypatch):
    """A refusal found inside the heartbeat's block (here the scope check after the models) is committed there:
    a heartbeat that lands after that commit finds the job no longer held (it is skipped, by this worker) and
    marked the lease lost, so the finished job was logged ``job_lease_lost`` and reported as RUNNING."""
    config, engine, ingestor, _, dispatcher, _ = node
    config = config.model_copy(update={
        "gate": config.gate.model_copy(update={"scope_check": True}),
        "queue": QueueSection(lease_seconds=2.0, heartbeat_seconds=0.05, max_attempts=2, retry_delay_seconds=0),
    })
    queue = JobQueue(engine, config.queue)
    series = receive(ingestor, tmp_path, "scope", slices=10, seed=9)
    job_id = queue_job(queue, series.series_uid)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.99))
    commit = Worker._commit

    def commit_then_pause(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        time.sleep(0.3)  # the heartbeat's next turn comes before the block ends

    monkeypatch.setattr(Worker, "_commit", commit_then_pause)
    worker.warm_up()
    with capture_logs() as logs:
        state = worker.process(queue.claim(worker.worker_id))
    row = queue.get(job_id)
    assert row.state == JobState.SKIPPED and row.skip_reason == SkipReason.OUT_OF_SCOPE.value
    assert state is JobState.SKIPPED
    assert "job_lease_lost" not in [e["event"] for e in logs]
