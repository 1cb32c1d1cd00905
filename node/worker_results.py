"""Recording a job's results: the worker's last step (`node.worker`), from the built objects to queued deliveries.

`ResultsRecorder.record` writes each object durably under ``data_dir/results`` (node.spool), then in one
transaction records them in ``results``, ends the job and queues one delivery per destination (node.dispatch) —
unless a newer version of the series has a job by then (node.versions): then nothing is recorded or sent, the job
ends as skipped ("superseded"), its files are removed and `JobSuperseded` is raised.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom import Dataset
from pydicom.filewriter import dcmwrite
from sqlalchemy.engine import Engine

from node.dispatch import Dispatcher
from node.queue import Job, JobQueue, LeaseLost
from node.schema import results
from node.spool import Spool
from node.versions import SKIP_REASON, JobSuperseded, lock_series, newer_version

__all__ = ["ResultsRecorder"]


class ResultsRecorder:
    """Records the results of jobs held by ``worker_id`` (the worker's lease holder name)."""

    def __init__(self, engine: Engine, queue: JobQueue, dispatcher: Dispatcher, store: Spool,
                 clock: Callable[[], float], worker_id: str) -> None:
        self.engine = engine
        self.queue = queue
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock
        self.worker_id = worker_id

    def record(self, job: Job, objects: Sequence[tuple[str, Dataset]], end_job: Callable[[sa.Connection], bool], *,
               leased: bool = True) -> None:
        """Write the objects durably, then in one transaction: record them, end the job (``end_job``, False when
        the lease was lost: `LeaseLost`), queue deliveries. When a newer version of the series has a job by then,
        nothing is recorded or sent: the job is ended as skipped ("superseded"; a dead job, ``leased`` False, stays
        dead), the files are removed, and `JobSuperseded` raised."""
        written = [self._write(job, kind, ds) for kind, ds in objects]
        with self.engine.begin() as conn:
            lock_series(conn, job.series_uid)  # a newer version's job is queued before this check or after COMMIT
            if (newer := newer_version(conn, job.series_uid, job.version)) is not None:
                self.end_superseded(conn, job, newer, leased=leased)
            else:
                conn.execute(
                    results.delete().where(
                        results.c.series_uid == job.series_uid,
                        results.c.version == job.version,
                        results.c.kind.in_([w["kind"] for w in written]),
                    )
                )
                conn.execute(results.insert(), written)
                if not end_job(conn):
                    raise LeaseLost()
                self.dispatcher.enqueue(
                    job.series_uid, job.version, [Path(w["path"]) for w in written], [w["sop_uid"] for w in written],
                    conn=conn,
                )
        if newer is not None:
            for w in written:
                Path(w["path"]).unlink(missing_ok=True)
            raise JobSuperseded(newer)
        self.dispatcher.wake()

    def end_superseded(self, conn: sa.Connection, job: Job, newer: int, *, leased: bool = True) -> None:
        """End ``job`` in ``conn`` as skipped because version ``newer`` of its series exists (a dead job stays
        dead); the caller raises `JobSuperseded` once the transaction is committed."""
        if leased and not self.queue.skip(conn, job, self.worker_id, SKIP_REASON, f"version {newer} came in"):
            raise LeaseLost()

    def _write(self, job: Job, kind: str, ds: Dataset) -> dict[str, Any]:
        """One object written durably into the results store; its ``results`` row."""
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        spooled = self.store.write(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), [buffer.getvalue()]
        )
        return dict(series_uid=job.series_uid, version=job.version, job_id=job.id, kind=kind,
                    study_uid=str(ds.StudyInstanceUID), result_series_uid=str(ds.SeriesInstanceUID),
                    sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), path=str(spooled.path),
                    created_at=self.clock())
