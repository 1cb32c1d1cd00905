"""Review of result versions when the completion sweep races `pacsnode retry --jobs`, on SQLite and a real
PostgreSQL. A dead job whose "processing failed" report went out is replayed as a new version of its series
(node.versions.reissue); the completion sweep, judging the same series (a late instance re-opened it), computes the
next version from the series row it read before. Whichever commits second must not take the version number the
first one took: before the fix that was a duplicate (series, version) job, an IntegrityError that failed the whole
sweep (every other series waited for the next one, and `completion_sweep_failed` was logged) or the operator's
retry command. The interleavings are made certain by hooks that run the other side at the racing point, never by
sleeping. Either way the series must end with one live verdict: the report withdrawn by the newest version."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from node.schema import jobs
from node.states import JobState
from node.worker import Worker
from tests.ctgen import write_ct_series
from tests.unit.test_review_versions_race import _accept, _not_withdrawn, node  # noqa: F401 - node: the fixture
from tests.unit.test_worker import FixedRunner


def _dead_job_with_a_report(node: Any, tmp_path: Any) -> tuple[Any, int]:  # noqa: F811 - the fixture's value
    """A series whose version 1 job died and sent its "processing failed" report; a late instance then re-opened
    the series. Returns the series and the dead job's id."""
    config, engine, ingestor, queue, dispatcher, sweeper = node
    series = write_ct_series(tmp_path / "s", size=32, slices=11, seed=23)
    _accept(ingestor, series.paths[:10])
    assert [v for _, v, _ in sweeper.sweep()] == [1]
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(fail=True)).run_pending()
    with engine.connect() as conn:
        [dead] = conn.execute(sa.select(jobs.c.id, jobs.c.state)).all()
    assert dead.state == JobState.DEAD
    _accept(ingestor, series.paths[10:])  # re-opens the series
    return series, int(dead.id)


def _versions(engine: sa.Engine, series_uid: str) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(r.version): str(r.state) for r in conn.execute(
            sa.select(jobs.c.version, jobs.c.state).where(jobs.c.series_uid == series_uid))}


def _finish(node: Any, series: Any) -> None:  # noqa: F811 - the fixture's value
    """Run every queued job; the series must then have one live verdict (older objects all withdrawn)."""
    config, engine, ingestor, queue, dispatcher, sweeper = node
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)).run_pending()
    assert _not_withdrawn(engine, series.series_uid) == set()


def test_a_retry_committed_while_the_sweep_completes_the_series_does_not_fail_the_sweep(node, tmp_path, monkeypatch):  # noqa: F811
    """``pacsnode retry --jobs`` replays the dead job as version 2 after the sweep read the series (version 1) and
    before it writes version 2 itself."""
    config, engine, ingestor, queue, dispatcher, sweeper = node
    series, dead = _dead_job_with_a_report(node, tmp_path)
    priority = sweeper._priority  # noqa: SLF001 - the hook point: after the sweep's read, before its write
    replayed: list[int] = []

    def retry_then_priority(row: Any, rows: Any) -> Any:
        if not replayed:
            replayed.append(queue.retry([dead]))
        return priority(row, rows)

    monkeypatch.setattr(sweeper, "_priority", retry_then_priority)
    first = sweeper.sweep()  # the old code: IntegrityError (a second job for version 2)
    assert replayed == [1] and first == []
    assert [v for _, v, _ in sweeper.sweep()] == [3]  # judged again with the version the retry took
    assert _versions(engine, series.series_uid) == {1: JobState.SKIPPED, 2: JobState.QUEUED, 3: JobState.QUEUED}
    _finish(node, series)


def test_a_sweep_committed_while_a_retry_replays_the_dead_job_does_not_fail_the_retry(node, tmp_path):  # noqa: F811
    """The sweep completes the re-opened series as version 2 after ``retry --jobs`` read the series' version and
    before it writes its own: the series has moved on, so the dead job is not replayed (as when the sweep came
    first)."""
    config, engine, ingestor, queue, dispatcher, sweeper = node
    series, dead = _dead_job_with_a_report(node, tmp_path)
    swept: list[Any] = []

    def sweep_before_the_first_series_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not swept and statement.lstrip().upper().startswith("UPDATE SERIES"):
            swept.append(sweeper.sweep())

    listen: Callable[..., None] = sa.event.listen
    listen(engine, "before_cursor_execute", sweep_before_the_first_series_write)
    try:
        replayed = queue.retry([dead])  # the old code: IntegrityError (a second job for version 2)
    finally:
        sa.event.remove(engine, "before_cursor_execute", sweep_before_the_first_series_write)
    assert [[v for _, v, _ in done] for done in swept] == [[2]]
    assert replayed == 0
    assert (queue.get(dead).state, queue.get(dead).skip_reason) == (JobState.SKIPPED, "superseded")
    assert _versions(engine, series.series_uid) == {1: JobState.SKIPPED, 2: JobState.QUEUED}
    _finish(node, series)
