"""The job queue: persistent inference jobs in SQL, claimed with a lease, retried with a cap, dead-lettered.

One job per (series, version). `JobQueue.claim(worker_id)` takes the most urgent due job — STAT before routine,
then oldest — or a running job whose lease expired (its worker died), through `node.leases` (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, one guarded UPDATE on SQLite), so two workers never hold one job. Holders extend the
lease with `heartbeat`; `finish`/`skip`/`fail` end it only while it is still theirs. A job failing
``max_attempts`` times — or whose lease ran out that often — goes `dead` with its error. Only this module (through
`node.leases`) writes job state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.config import NodeConfig, PipelineName, Priority, QueueSection
from node.db import transaction
from node.leases import Lease, Leases
from node.schema import jobs, results
from node.states import JobState
from node.versions import SKIP_REASON, lock_series, newer_version, reissue

PRIORITY_RANK = {Priority.STAT: 0, Priority.ROUTINE: 1}
DEFER_SECONDS = 60.0  # a job deferred for the node's own failure (results disk full) waits at least this long
_BY_RANK = {rank: priority for priority, rank in PRIORITY_RANK.items()}
__all__ = ["PRIORITY_RANK", "Job", "JobQueue", "LeaseLost", "jobs", "lease_renewed"]


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    version: int
    priority: int
    attempts: int
    created_at: float
    started_at: float
    pipeline: PipelineName = PipelineName.PNEUMONIA


class JobQueue:
    """Queue operations over one engine; ``clock`` returns epoch seconds (injected in tests). Database failures
    raise `DatabaseError`."""

    def __init__(self, engine: Engine, settings: QueueSection, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.leases = Leases(engine, jobs, waiting=JobState.QUEUED, held=JobState.RUNNING, dead=JobState.DEAD,
                             clock=lambda: self.clock())

    def apply_config(self, config: NodeConfig) -> None:
        """Swap in a reloaded config's ``[queue]`` (lease, attempts, retry delay; next claim on)."""
        self.settings = config.queue

    def enqueue(self, conn: sa.Connection, series_uid: str, version: int, priority: Priority,
                pipeline: PipelineName = PipelineName.PNEUMONIA) -> int:
        """Add a job for ``pipeline`` inside the caller's transaction (so a series' state and its job commit
        together)."""
        now = self.clock()
        result = conn.execute(
            jobs.insert().values(
                series_uid=series_uid,
                version=version,
                pipeline=PipelineName(pipeline).value,
                priority=PRIORITY_RANK[priority],
                state=JobState.QUEUED,
                attempts=0,
                due_at=now,
                created_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    def claim(self, worker_id: str) -> Job | None:
        """Lease the most urgent due job (or one whose lease expired) to ``worker_id``; None when there is nothing
        to do. A job whose lease ran out ``max_attempts`` times is dead-lettered here instead (worker lost)."""
        max_attempts = self.settings.max_attempts
        self.leases.reap(max_attempts, lambda row: f"lease expired {row.attempts} times (worker lost); last error: "
                                                   f"{row.last_error or 'none'}", finished_at=self.clock())
        now = self.clock()
        row = self.leases.claim(
            worker_id, self.settings.lease_seconds, max_attempts=max_attempts,
            order_by=(jobs.c.priority, jobs.c.created_at, jobs.c.id),
            values={"started_at": now, "queue_seconds": sa.func.coalesce(jobs.c.queue_seconds, now - jobs.c.created_at)},
        )
        if row is None:
            return None
        return Job(row.id, row.series_uid, row.version, row.priority, row.attempts, row.created_at, now,
                   PipelineName(row.pipeline or PipelineName.PNEUMONIA))

    def heartbeat(self, job: Job, worker_id: str) -> bool:
        """Extend the lease; False if the job is no longer ours (lease expired and re-claimed)."""
        return self.leases.extend(_lease(job, worker_id), self.settings.lease_seconds)

    def finish(self, conn: sa.Connection, job: Job, worker_id: str, *, inference_seconds: float) -> bool:
        """Mark the job done inside the caller's transaction; False if the lease was lost meanwhile."""
        return self.leases.finish(_lease(job, worker_id), JobState.DONE, conn, finished_at=self.clock(),
                                  inference_seconds=inference_seconds)

    def skip(self, conn: sa.Connection, job: Job, worker_id: str, reason: str, detail: str) -> bool:
        """Mark the job skipped by the validity gate, with its reason, inside the caller's transaction."""
        return self.leases.finish(_lease(job, worker_id), JobState.SKIPPED, conn, finished_at=self.clock(),
                                  skip_reason=reason, last_error=detail)

    def fail(self, job: Job, worker_id: str, error: str) -> JobState:
        """Record a failure: back to the queue after ``retry_delay_seconds``, or dead after ``max_attempts``.
        `JobState.RUNNING` when the lease was lost meanwhile: the job is another worker's now (or was reaped), and
        this one must not report it dead (its "processing failed" report would stand beside the other's result)."""
        lease = _lease(job, worker_id)
        if job.attempts >= self.settings.max_attempts:
            held = self.leases.dead_letter(lease, error, finished_at=self.clock())
            return JobState.DEAD if held else JobState.RUNNING
        held = self.leases.retry_later(lease, self.settings.retry_delay_seconds, error)
        return JobState.QUEUED if held else JobState.RUNNING

    def recover(self, own_prefix: str) -> tuple[int, int]:
        """Jobs held by an earlier process whose holder starts with ``own_prefix`` (and any whose lease expired):
        back to the queue, due now — or dead-lettered ("worker lost") once ``max_attempts`` attempts were spent,
        as `claim` would after their lease (an expired one of another worker's too: it used to go back with its
        budget spent, and run once more); returns (requeued, dead-lettered)."""
        mine = sa.and_(jobs.c.state == JobState.RUNNING,
                       sa.or_(jobs.c.holder.startswith(own_prefix, autoescape=True), jobs.c.lease_until <= self.clock()))
        max_attempts = self.settings.max_attempts
        dead = self.leases.expire(
            sa.and_(mine, jobs.c.attempts >= max_attempts),
            lambda row: f"worker lost {row.attempts} times (its process ended mid-job); last error: "
                        f"{row.last_error or 'none'}", finished_at=self.clock())
        return self.leases.release(own_prefix=own_prefix), len(dead)

    def defer(self, job: Job, worker_id: str, error: str) -> bool:
        """Back to the queue, its attempt not counted, due in ``retry_delay_seconds`` (at least `DEFER_SECONDS`):
        for a failure of the node's own (its results disk full), not of the series; False if the lease was lost."""
        return self.leases.retry_later(_lease(job, worker_id), max(self.settings.retry_delay_seconds, DEFER_SECONDS),
                                       error, attempts=job.attempts - 1)

    def retry(self, ids: Sequence[int] | None = None) -> int:
        """Put dead jobs (all, or the given ids) back in the queue with a fresh attempt budget; returns how many.
        One whose "processing failed" report was recorded runs as a new version of its series, and one whose series
        has a newer version is not replayed but ended as skipped, "superseded" (`node.versions`)."""
        cond = sa.and_(jobs.c.id.in_(list(ids)) if ids else sa.true(), jobs.c.state == JobState.DEAD)
        in_place: list[int] = []
        reissued = 0
        with transaction(self.engine, "jobs: retry") as conn:
            for row in conn.execute(sa.select(jobs).where(cond).order_by(jobs.c.id)).all():
                lock_series(conn, row.series_uid)  # a sweep completing it now commits before the check, or waits
                if (newer := newer_version(conn, row.series_uid, int(row.version))) is not None:
                    conn.execute(jobs.update().where(jobs.c.id == row.id).values(
                        state=JobState.SKIPPED, skip_reason=SKIP_REASON, last_error=f"version {newer} came in"))
                    continue

                def enqueue(c: sa.Connection, version: int, row: Any = row) -> int:
                    return self.enqueue(c, row.series_uid, version, _BY_RANK.get(int(row.priority), Priority.ROUTINE),
                                        PipelineName(row.pipeline))

                if reissue(conn, row, enqueue):
                    reissued += 1
                else:
                    in_place.append(int(row.id))
        return reissued + (self.leases.replay(jobs.c.id.in_(in_place)) if in_place else 0)

    def get(self, job_id: int) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
            return {str(s): int(n) for s, n in rows}

    def depth(self) -> int:
        """Jobs waiting or running (for metrics, status and admission control). Counted over the state index, so
        it costs the same however many finished jobs the table holds (admission reads it twice a second)."""
        stmt = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state.in_([JobState.QUEUED, JobState.RUNNING]))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def last_errors(self, limit: int = 10) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            stmt = (
                sa.select(jobs.c.id, jobs.c.series_uid, jobs.c.version, jobs.c.state, jobs.c.attempts,
                          jobs.c.skip_reason, jobs.c.last_error)
                .where(jobs.c.last_error.is_not(None))
                .order_by(jobs.c.id.desc())
                .limit(limit)
            )
            return list(conn.execute(stmt))

    def unreported(self, limit: int = 10) -> list[sa.Row[Any]]:
        """Dead jobs for which no result object at all was recorded (not even a "processing failed" report):
        the PACS was told nothing, so an admin must look (shown as alerts by `pacsnode status`). A job whose series
        has a newer version is not among them: that version reports for the series (node.versions)."""
        newer = jobs.alias("newer")
        stmt = (
            sa.select(jobs.c.id, jobs.c.series_uid, jobs.c.version, jobs.c.pipeline, jobs.c.last_error)
            .where(jobs.c.state == JobState.DEAD)
            .where(~sa.exists().where(results.c.series_uid == jobs.c.series_uid, results.c.version == jobs.c.version))
            .where(~sa.exists().where(newer.c.series_uid == jobs.c.series_uid, newer.c.version > jobs.c.version))
            .order_by(jobs.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(stmt))


def _lease(job: Job, worker_id: str) -> Lease:
    return Lease(job.id, worker_id, job.attempts)


class LeaseLost(Exception):  # noqa: N818 - a control-flow signal (drop this attempt), not an error
    """The job's lease expired and another worker may hold it: drop this attempt's outcome."""


@contextmanager
def lease_renewed(queue: JobQueue, job: Job, worker_id: str, settings: QueueSection, log: Any) -> Iterator[None]:
    """Renew ``job``'s lease every ``heartbeat_seconds`` while the block runs, for at most ``attempt_limit_seconds``
    (a hung attempt must not keep its job for ever: the lease then runs out and another worker takes it); raises
    `LeaseLost` after the block when the lease was found lost meanwhile."""
    from node.supervise import failure

    stop = threading.Event()
    lost = threading.Event()

    def beat() -> None:
        limit = settings.attempt_limit_seconds
        overrun = time.monotonic() + limit
        while not stop.wait(settings.heartbeat_seconds):
            if time.monotonic() > overrun:
                log.error("job_overran", job_id=job.id, attempt_limit_seconds=limit)
                return
            try:
                held = queue.heartbeat(job, worker_id)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the lease's heartbeat
                log.warning("lease_heartbeat_failed", job_id=job.id, error=failure(exc))
                continue
            if not held:
                lost.set()
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if lost.is_set():
        raise LeaseLost()
