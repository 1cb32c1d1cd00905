"""The job queue: persistent inference jobs in SQL, claimed with a lease, retried with a cap, dead-lettered.

One job per (series, version). `JobQueue.claim(worker_id)` takes the most urgent due job — STAT before routine,
then oldest — or a running job whose lease expired (its worker died), atomically: the claiming UPDATE is guarded
by the state it read, so two workers never hold one job (works on SQLite and PostgreSQL alike). Holders extend
the lease with `heartbeat`; `finish`/`skip`/`fail` end it. A job failing ``max_attempts`` times goes `dead` with
its error. Only this module writes job state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from node.config import NodeConfig, PipelineName, Priority, QueueSection
from node.db import metadata
from node.states import JobState

_RETRY = object()
PRIORITY_RANK = {Priority.STAT: 0, Priority.ROUTINE: 1}

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker_id", sa.String(64)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("not_before", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("queue_seconds", sa.Float),
    sa.Column("inference_seconds", sa.Float),
    sa.Column("skip_reason", sa.String(64)),
    sa.Column("last_error", sa.Text),
    sa.Column("pipeline", sa.String(32)),  # the routed pipeline (PipelineName); NULL in rows from before routes
    sa.UniqueConstraint("series_uid", "version", name="uq_jobs_series_version"),
)


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
    """Queue operations over one engine; ``clock`` returns epoch seconds (injected in tests)."""

    def __init__(self, engine: Engine, settings: QueueSection, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock

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
                not_before=now,
                created_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    def claim(self, worker_id: str) -> Job | None:
        """Lease the most urgent due job (or one whose lease expired); None when there is nothing to do."""
        for _ in range(8):  # a lost race means someone else took that row: look again
            now = self.clock()
            try:
                job = self._try_claim(worker_id, now)
            except OperationalError:  # SQLite: another writer committed since our read snapshot
                time.sleep(0.01)
                continue
            if job is not _RETRY:
                return job  # type: ignore[return-value]
        return None

    def _try_claim(self, worker_id: str, now: float) -> Job | None | object:
        """One claim attempt: the Job, None when nothing is due, or _RETRY when the race was lost."""
        with self.engine.begin() as conn:
            due = sa.or_(
                sa.and_(jobs.c.state == JobState.QUEUED, jobs.c.not_before <= now),
                sa.and_(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires_at < now),
            )
            row = conn.execute(
                sa.select(jobs).where(due).order_by(jobs.c.priority, jobs.c.created_at, jobs.c.id).limit(1)
            ).first()
            if row is None:
                return None
            if row.state == JobState.RUNNING and row.attempts >= self.settings.max_attempts:
                self._dead(conn, row.id, f"lease expired {row.attempts} times (worker lost); last error: "
                           f"{row.last_error or 'none'}", now)
                return _RETRY
            claimed = conn.execute(
                jobs.update()
                .where(jobs.c.id == row.id, jobs.c.state == row.state, jobs.c.attempts == row.attempts)
                .values(
                    state=JobState.RUNNING,
                    worker_id=worker_id,
                    attempts=row.attempts + 1,
                    lease_expires_at=now + self.settings.lease_seconds,
                    started_at=now,
                    queue_seconds=now - row.created_at if row.queue_seconds is None else row.queue_seconds,
                )
            )
            if claimed.rowcount == 1:
                return Job(row.id, row.series_uid, row.version, row.priority, row.attempts + 1, row.created_at, now,
                           PipelineName(row.pipeline or PipelineName.PNEUMONIA))
            return _RETRY

    def heartbeat(self, job: Job, worker_id: str) -> bool:
        """Extend the lease; False if the job is no longer ours (lease expired and re-claimed)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                self._held(job, worker_id).values(lease_expires_at=self.clock() + self.settings.lease_seconds)
            )
            return result.rowcount == 1

    def finish(self, conn: sa.Connection, job: Job, worker_id: str, *, inference_seconds: float) -> bool:
        """Mark the job done inside the caller's transaction; False if the lease was lost meanwhile."""
        result = conn.execute(
            self._held(job, worker_id).values(
                state=JobState.DONE, finished_at=self.clock(), inference_seconds=inference_seconds,
                lease_expires_at=None,
            )
        )
        return result.rowcount == 1

    def skip(self, conn: sa.Connection, job: Job, worker_id: str, reason: str, detail: str) -> bool:
        """Mark the job skipped by the validity gate, with its reason, inside the caller's transaction."""
        result = conn.execute(
            self._held(job, worker_id).values(
                state=JobState.SKIPPED, finished_at=self.clock(), skip_reason=reason, last_error=detail,
                lease_expires_at=None,
            )
        )
        return result.rowcount == 1

    def fail(self, job: Job, worker_id: str, error: str) -> JobState:
        """Record a failure: back to the queue after ``retry_delay_seconds``, or dead after ``max_attempts``."""
        now = self.clock()
        with self.engine.begin() as conn:
            if job.attempts >= self.settings.max_attempts:
                self._dead(conn, job.id, error, now, holder=worker_id)
                return JobState.DEAD
            conn.execute(
                self._held(job, worker_id).values(
                    state=JobState.QUEUED, worker_id=None, lease_expires_at=None, last_error=error,
                    not_before=now + self.settings.retry_delay_seconds,
                )
            )
            return JobState.QUEUED

    def retry(self, ids: Sequence[int] | None = None) -> int:
        """Put dead jobs (all, or the given ids) back in the queue with a fresh attempt budget."""
        stmt = jobs.update().where(jobs.c.state == JobState.DEAD)
        if ids:
            stmt = stmt.where(jobs.c.id.in_(list(ids)))
        with self.engine.begin() as conn:
            result = conn.execute(
                stmt.values(state=JobState.QUEUED, attempts=0, not_before=self.clock(), worker_id=None)
            )
            return int(result.rowcount or 0)

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
        the PACS was told nothing, so an admin must look (shown as alerts by `pacsnode status`)."""
        stmt = sa.select(jobs.c.id, jobs.c.series_uid, jobs.c.version, jobs.c.pipeline, jobs.c.last_error).where(
            jobs.c.state == JobState.DEAD
        )
        if sa.inspect(self.engine).has_table("results"):  # node.worker's table; absent until a worker ran
            stored = sa.table("results", sa.column("series_uid"), sa.column("version"))
            stmt = stmt.where(
                ~sa.exists().where(stored.c.series_uid == jobs.c.series_uid, stored.c.version == jobs.c.version)
            )
        with self.engine.connect() as conn:
            stmt = (
                stmt
                .order_by(jobs.c.id.desc())
                .limit(limit)
            )
            return list(conn.execute(stmt))

    # -- plumbing -------------------------------------------------------------------------------------------
    def _held(self, job: Job, worker_id: str) -> sa.Update:
        return jobs.update().where(
            jobs.c.id == job.id,
            jobs.c.state == JobState.RUNNING,
            jobs.c.worker_id == worker_id,
            jobs.c.attempts == job.attempts,
        )

    def _dead(self, conn: sa.Connection, job_id: int, error: str, now: float, holder: str | None = None) -> None:
        stmt = jobs.update().where(jobs.c.id == job_id)
        if holder is not None:
            stmt = stmt.where(jobs.c.worker_id == holder)
        conn.execute(stmt.values(state=JobState.DEAD, last_error=error, finished_at=now, lease_expires_at=None))
