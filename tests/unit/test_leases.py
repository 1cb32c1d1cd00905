"""node/leases.py on SQLite and PostgreSQL: competing claimers (threads, processes) never share a row and drain the
queue together; a lease is finished only while held; crash cleanup takes back only this node's rows or expired
ones; PostgreSQL's claim skips rows another transaction holds locked instead of waiting."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from node.config import Priority, QueueSection
from node.db import create_engine_for, init_schema
from node.leases import Lease, Leases, backoff, holder_id, own_prefix
from node.queue import JobQueue
from node.schema import jobs, results
from node.states import JobState
from tests.fakeclock import FakeClock


def fill(engine: sa.Engine, n: int, clock: Callable[[], float] = time.time) -> list[int]:
    queue = JobQueue(engine, QueueSection(), clock=clock)
    with engine.begin() as conn:
        return [queue.enqueue(conn, f"1.2.{i}", 1, Priority.ROUTINE) for i in range(n)]


def drain(url: str, holder: str, start: Any, out: Any) -> None:
    """One competing worker (a thread or a process): its own engine, claim and finish until nothing is due."""
    engine = create_engine_for(url)
    queue = JobQueue(engine, QueueSection(lease_seconds=120))
    claimed = []
    start.wait()
    while (job := queue.claim(holder)) is not None:
        claimed.append(job.id)
        with engine.begin() as conn:
            assert queue.finish(conn, job, holder, inference_seconds=0.0)
    engine.dispose()
    out.put(claimed)


def competing(url: str, make: Callable[..., Any], n: int, start: Any, out: Any) -> list[int]:
    workers = [make(target=drain, args=(url, f"w{i}", start, out)) for i in range(n)]
    for w in workers:
        w.start()
    claimed = [job_id for _ in workers for job_id in out.get(timeout=120)]
    for w in workers:
        w.join(60)
    return claimed


def test_threads_with_their_own_connections_never_claim_a_job_twice(db_url, engine):
    ids = fill(engine, 150)
    import queue as stdlib_queue

    claimed = competing(db_url, threading.Thread, 6, threading.Barrier(6), stdlib_queue.Queue())
    assert Counter(claimed).most_common(1)[0][1] == 1 and sorted(claimed) == ids
    assert JobQueue(engine, QueueSection()).counts() == {JobState.DONE.value: 150}


def test_processes_never_claim_a_job_twice_and_drain_the_queue(db_url, engine):
    ids = fill(engine, 120)
    ctx = multiprocessing.get_context("fork")
    claimed = competing(db_url, ctx.Process, 4, ctx.Barrier(4), ctx.Queue())
    assert Counter(claimed).most_common(1)[0][1] == 1 and sorted(claimed) == ids
    assert JobQueue(engine, QueueSection()).counts() == {JobState.DONE.value: 120}


def test_a_lease_is_finished_only_by_its_holder_and_attempt(engine):
    clock = FakeClock(1000.0)
    leases = Leases(engine, jobs, waiting="queued", held="running", dead="dead", clock=clock)
    [job_id] = fill(engine, 1, clock)
    order = (jobs.c.id,)
    first = leases.claim("a", 10, order_by=order)
    assert first is not None and (first.holder, first.attempts, first.lease_until) == ("a", 1, 1010.0)
    assert leases.claim("b", 10, order_by=order) is None  # held
    clock.advance(11)
    second = leases.claim("a", 10, order_by=order)  # the same holder again, after its lease ran out
    assert second is not None and second.attempts == 2
    stale, fresh = Lease(job_id, "a", 1), Lease(job_id, "a", 2)
    assert not leases.extend(stale, 10) and not leases.finish(stale, "done")
    assert not leases.finish(Lease(job_id, "b", 2), "done")
    assert leases.retry_later(fresh, 5.0, "x" * 5000)
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs)).one()
    assert (row.state, row.holder, row.lease_until, row.due_at, len(row.last_error)) == (
        "queued", None, None, clock() + 5.0, 2000)
    assert leases.claim("b", 10, order_by=order) is None  # not due yet
    clock.advance(5)
    third = leases.claim("b", 10, order_by=order)
    assert third is not None and leases.dead_letter(Lease(job_id, "b", 3), "gave up")
    assert leases.replay(jobs.c.id == job_id) == 1
    assert leases.claim("c", 10, order_by=order).attempts == 1  # a fresh attempt budget


def test_crash_cleanup_takes_back_only_own_or_expired_rows(engine):
    clock = FakeClock(1000.0)
    leases = Leases(engine, jobs, waiting="queued", held="running", dead="dead", clock=clock)
    fill(engine, 3, clock)
    mine, theirs = holder_id("worker", "node-a"), holder_id("worker", "node-b")
    assert mine.startswith(own_prefix("worker", "node-a")) and len(mine) <= 64
    leases.claim(theirs, 5, order_by=(jobs.c.id,))  # expires at 1005
    leases.claim(mine, 60, order_by=(jobs.c.id,))
    leases.claim(theirs, 60, order_by=(jobs.c.id,))  # another node's live lease
    clock.advance(10)
    assert leases.release(own_prefix=own_prefix("worker", "node-a")) == 2
    with engine.connect() as conn:
        held = conn.execute(sa.select(jobs.c.id, jobs.c.holder).where(jobs.c.state == "running")).all()
    assert [h for _, h in held] == [theirs]
    assert leases.release(own_prefix=own_prefix("worker", "node-c")) == 0
    assert leases.release(everything=True) == 1


def test_a_job_whose_lease_keeps_running_out_is_reaped_to_dead(engine):
    clock = FakeClock(1000.0)
    queue = JobQueue(engine, QueueSection(lease_seconds=10, heartbeat_seconds=2, max_attempts=2), clock=clock)
    fill(engine, 1, clock)
    for _ in range(2):
        assert queue.claim("w") is not None
        clock.advance(11)
    assert queue.claim("w") is None
    row = queue.get(1)
    assert row.state == JobState.DEAD and row.holder is None and "lease expired 2 times" in row.last_error


def test_backoff_is_capped_exponential_with_full_jitter():
    assert [backoff(n, 1.0, 8.0, lambda: 1.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff(3, 1.0, 8.0, lambda: 0.25) == 1.0
    assert backoff(10_000, 1.0, 8.0, lambda: 1.0) == 8.0


def test_a_table_without_the_lease_columns_is_refused(engine):
    with pytest.raises(ValueError, match="lacks the lease columns"):
        Leases(engine, results, waiting="a", held="b", dead="c")


def test_postgresql_claims_skip_a_row_locked_by_another_transaction(postgres_server):
    engine = create_engine_for(str(postgres_server.create_database()))
    init_schema(engine)
    first, second = fill(engine, 2)
    queue = JobQueue(engine, QueueSection())
    with engine.connect() as locker, locker.begin():
        locker.execute(sa.select(jobs.c.id).where(jobs.c.id == first).with_for_update())
        t0 = time.monotonic()
        job = queue.claim("w")
        assert job is not None and job.id == second and time.monotonic() - t0 < 2.0
        assert queue.claim("w") is None  # the locked one is skipped, not waited for
    assert queue.claim("w").id == first  # free once the other transaction ended
    engine.dispose()
