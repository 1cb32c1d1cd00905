"""Versions of one series' results: what a new version supersedes, and whether a job is itself superseded.

A series that changes after its results were made (late or re-sent instances) is processed again as version
N + 1. The new SR names the newest earlier version's SR/SEG as superseded (`superseded_entries`), and an IOCM
rejection note withdraws them (`withdrawal`). The other way round, a job for version N must publish nothing once
a job for a newer version of the series exists (`newer_version`): its objects would stay live beside the newer
version's, since only older versions are ever withdrawn. That happens when an admin replays dead jobs
(`pacsnode retry --jobs`) after the series moved on, or when two workers run versions N and N + 1 at once. The
worker checks before it starts and again in the transaction that records the results (`JobSuperseded`), under the
series row's lock (`lock_series`), which the transaction queueing a newer version's job takes too.

Replaying a dead job (`reissue`, through `JobQueue.retry`): when its "processing failed" report was recorded (and so
sent, or about to be), running it again under the same version would leave that report live beside the new
verdict. The series gets a new version instead, whose result names the report as superseded and withdraws it like
any earlier version's objects; the dead job ends as skipped ("superseded"). A dead job that reported nothing is
replayed under its own version, and one whose series has moved on is not replayed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom import Dataset, dcmread
from pydicom.tag import Tag

from node.results import AlgorithmIdentity, Superseded, build_rejection_kos
from node.schema import jobs, results, series
from node.states import JobState

SKIP_REASON = "superseded"  # jobs.skip_reason of a job ended because a newer version exists

_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
)


class JobSuperseded(Exception):  # noqa: N818 - a control-flow signal like LeaseLost, not an error
    """A newer version of the job's series exists: the job was ended as skipped ("superseded"), nothing sent."""

    def __init__(self, newer: int) -> None:
        super().__init__(f"version {newer} of the series superseded this job")
        self.newer = newer


def lock_series(conn: sa.Connection, series_uid: str) -> None:
    """Hold the series row's write lock until ``conn``'s transaction ends; take it before `newer_version` in the
    transaction that records a version's results, or that replays a dead job (`JobQueue.retry`: a sweep
    completing the series meanwhile would take the version `reissue` computes). A new version's job is queued by a transaction that first
    updates the same row (node.completion, `reissue`), so the two are serialised: either the recording sees the
    newer job (and publishes nothing), or the newer job is queued only once the recorded results are committed
    (and its worker, which reads them after claiming it, supersedes and withdraws them). Without it, on
    PostgreSQL's READ COMMITTED (and SQLite, whose transaction begins at its first write), the newer job could be
    queued and run between the check and the COMMIT: two live verdicts for one series. A no-op UPDATE locks the
    row on both backends (SQLite: the database's write lock)."""
    conn.execute(series.update().where(series.c.series_uid == series_uid).values(version=series.c.version))


def newer_version(conn: sa.Connection, series_uid: str, version: int) -> int | None:
    """The newest version of the series with a job after ``version``, else None."""
    newest = conn.execute(
        sa.select(sa.func.max(jobs.c.version)).where(jobs.c.series_uid == series_uid, jobs.c.version > version)
    ).scalar()
    return None if newest is None else int(newest)


def reissue(conn: sa.Connection, job: Any, enqueue: Callable[[sa.Connection, int], int]) -> bool:
    """Replay the dead job row ``job`` under a new version of its series when it has recorded results; False when it
    must be replayed in place (nothing recorded). ``enqueue(conn, version)`` queues the new version's job."""
    recorded = conn.execute(sa.select(sa.func.count()).select_from(results).where(
        results.c.series_uid == job.series_uid, results.c.version == job.version)).scalar()
    if not recorded:
        return False
    current = conn.execute(sa.select(series.c.version).where(series.c.series_uid == job.series_uid)).scalar()
    version = max(int(current or 0), int(job.version)) + 1
    conn.execute(series.update().where(series.c.series_uid == job.series_uid).values(version=version))
    enqueue(conn, version)
    conn.execute(jobs.update().where(jobs.c.id == job.id).values(
        state=JobState.SKIPPED, skip_reason=SKIP_REASON, last_error=f"replayed as version {version}"))
    return True


def previous_results(conn: sa.Connection, series_uid: str, version: int) -> list[Any]:
    """The result rows (KOS excluded) of the newest earlier version of the series; empty for a first version."""
    prev = conn.execute(
        sa.select(sa.func.max(results.c.version)).where(results.c.series_uid == series_uid, results.c.version < version)
    ).scalar()
    if prev is None:
        return []
    return list(conn.execute(
        sa.select(results).where(results.c.series_uid == series_uid, results.c.version == prev, results.c.kind != "kos")
    ))


def superseded_entries(rows: Sequence[Any]) -> list[Superseded]:
    """The earlier version's SR/SEG as the new SR names them."""
    return [Superseded(r.study_uid, r.result_series_uid, r.sop_uid, r.sop_class_uid) for r in rows]


def withdrawal(rows: Sequence[Any], algorithm: AlgorithmIdentity, series_uid: str, version: int,
               source_header: Callable[[], Dataset]) -> list[tuple[str, Dataset]]:
    """An IOCM rejection note (KOS) withdrawing ``rows``' objects, sent with the new ones. Objects whose files
    retention already deleted are referenced by the UIDs their result rows keep, with the patient and study
    from ``source_header()`` (a header of the source series)."""
    if not rows:
        return []
    kept = [r for r in rows if Path(r.path).exists()]
    previous: list[Dataset] = [dcmread(r.path) for r in kept]
    if len(kept) < len(rows):
        header = source_header()
        previous += [_stub(r, header) for r in rows if r not in kept]
    return [("kos", build_rejection_kos(previous, algorithm, source_series_uid=series_uid, series_version=version))]


def _stub(row: Any, header: Dataset) -> Dataset:
    """A stand-in for a result object whose file is gone: its UIDs from the results row, the patient and study
    from the source series (the same study), enough for a rejection note to reference it. The elements are copied
    as read, with the source's Specific Character Set, so the note's builder decodes and repairs them as it does
    any source's (without the set, highdicom wrote every non-ASCII name as '?')."""
    ds = Dataset()
    for keyword in _STUDY_KEYWORDS:
        if keyword in header:
            tag = Tag(keyword)
            ds[tag] = header.get_item(tag)
    ds.StudyInstanceUID = row.study_uid
    ds.SeriesInstanceUID = row.result_series_uid
    ds.SOPInstanceUID = row.sop_uid
    ds.SOPClassUID = row.sop_class_uid
    return ds


__all__ = [
    "SKIP_REASON", "JobSuperseded", "lock_series", "newer_version", "previous_results", "reissue", "superseded_entries",
    "withdrawal",
]
