"""Job queue: priorities, lease expiry and re-claim, heartbeats, retry cap and dead-lettering."""

from __future__ import annotations

import threading

import pytest

from node.config import Priority, QueueSection
from node.db import create_engine_for, init_schema
from node.queue import JobQueue
from node.states import JobState
from tests.fakeclock import FakeClock


@pytest.fixture
def queue(db_url):
    engine = create_engine_for(db_url)
    init_schema(engine)
    q = JobQueue(engine, QueueSection(lease_seconds=60, max_attempts=3, retry_delay_seconds=10), clock=FakeClock())
    yield q
    engine.dispose()


def add(queue, uid: str, priority=Priority.ROUTINE, version: int = 1) -> int:
    with queue.engine.begin() as conn:
        return queue.enqueue(conn, uid, version, priority)


def test_stat_before_routine_then_oldest_first(queue):
    add(queue, "1.1")
    queue.clock.now += 1
    add(queue, "1.2")
    queue.clock.now += 1
    add(queue, "1.3", Priority.STAT)
    order = [queue.claim("w").series_uid for _ in range(3)]
    assert order == ["1.3", "1.1", "1.2"]
    assert queue.claim("w") is None


def test_one_job_per_series_version(queue):
    add(queue, "1.1", version=1)
    with pytest.raises(Exception):  # noqa: B017 - the unique constraint (IntegrityError)
        add(queue, "1.1", version=1)
    add(queue, "1.1", version=2)


def test_expired_lease_is_claimed_again_and_the_old_holder_loses_it(queue):
    add(queue, "1.1")
    first = queue.claim("w1")
    assert queue.claim("w2") is None  # leased
    queue.clock.now += 30
    assert queue.heartbeat(first, "w1")  # extends to now + 60
    queue.clock.now += 59
    assert queue.claim("w2") is None
    queue.clock.now += 2  # lease expired: w1 died
    second = queue.claim("w2")
    assert second is not None and second.id == first.id and second.attempts == 2
    assert not queue.heartbeat(first, "w1")
    with queue.engine.begin() as conn:
        assert not queue.finish(conn, first, "w1", inference_seconds=1.0)
        assert queue.finish(conn, second, "w2", inference_seconds=1.0)
    assert queue.get(first.id).state == JobState.DONE


def test_failures_retry_after_delay_then_dead_letter_with_error(queue):
    job_id = add(queue, "1.1")
    for attempt in (1, 2):
        job = queue.claim("w")
        assert job.attempts == attempt
        assert queue.fail(job, "w", f"boom {attempt}") is JobState.QUEUED
        assert queue.claim("w") is None  # not before retry_delay_seconds
        queue.clock.now += 10
    job = queue.claim("w")
    assert queue.fail(job, "w", "boom 3") is JobState.DEAD
    row = queue.get(job_id)
    assert row.state == JobState.DEAD and row.last_error == "boom 3"
    assert queue.claim("w") is None
    assert queue.counts() == {"dead": 1}
    assert queue.retry() == 1
    assert queue.claim("w").attempts == 1


def test_a_job_whose_worker_keeps_dying_is_dead_lettered(queue):
    job_id = add(queue, "1.1")
    for _ in range(3):
        assert queue.claim("w") is not None
        queue.clock.now += 61
    assert queue.claim("w") is None
    row = queue.get(job_id)
    assert row.state == JobState.DEAD and "lease expired 3 times" in row.last_error


def test_queue_and_inference_times_recorded_separately(queue):
    job_id = add(queue, "1.1")
    queue.clock.now += 4.5
    job = queue.claim("w")
    with queue.engine.begin() as conn:
        queue.finish(conn, job, "w", inference_seconds=2.25)
    row = queue.get(job_id)
    assert row.queue_seconds == pytest.approx(4.5) and row.inference_seconds == pytest.approx(2.25)


def test_concurrent_claims_never_share_a_job(queue):
    for i in range(30):
        add(queue, f"1.{i}")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 30


def test_a_worker_that_lost_its_lease_never_reports_the_job_dead(queue):
    """Worker A's last attempt outlives its lease (a database blip stopped its heartbeats) and the job is another
    worker's now: A's failure is not recorded, and A is told so (not DEAD: it would publish a "processing
    failed" report for a version another worker may still finish)."""
    job_id = add(queue, "1.1")
    for _ in range(2):
        queue.fail(queue.claim("w0"), "w0", "boom")
        queue.clock.now += 10
    last = queue.claim("a")
    assert last.attempts == 3
    queue.clock.now += 61  # A's lease ran out
    assert queue.recover("b:worker:") == (0, 1)  # B starts: the expired job with its budget spent is dead ...
    assert queue.get(job_id).state == JobState.DEAD and "worker lost" in queue.get(job_id).last_error
    assert queue.claim("b") is None  # ... not requeued for a 4th attempt
    assert queue.fail(last, "a", "boom 3") is JobState.RUNNING  # A no longer holds it: nothing written
    assert "worker lost" in queue.get(job_id).last_error


def test_a_lost_lease_is_not_failed_over_the_new_holder(queue):
    job_id = add(queue, "1.1")
    first = queue.claim("a")
    queue.clock.now += 61
    second = queue.claim("b")
    assert queue.fail(first, "a", "late failure") is JobState.RUNNING
    row = queue.get(job_id)
    assert row.state == JobState.RUNNING and row.holder == "b" and second.attempts == 2
