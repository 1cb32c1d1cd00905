"""Completion: decide, in the database, when a series is whole, route it, and queue its pipeline's job.

`decide(...)` is the pure rule, with the sender's profile (``[completion]`` mode, or the ``[[completion.senders]]``
entry for its calling AE). A series is complete when
  * its expected count is known (ImagesInAcquisition) and reached — not exceeded: a series holding more instances
    than that (several acquisitions in one series) is judged by the rules below, once, not again at every sweep; a
    re-opened series reaches it only with instances received since it re-opened (`_count_reached`);
  * or it is one multi-frame instance (all frames arrive together);
  * or, for a sender whose mode is ``release``, its slice positions form an evenly spaced stack, every association
    that sent it is closed, the last one was released normally after sending ≥ 2 of its instances, and the
    profile's ``release_grace_seconds`` have passed (one association per image never completes this way);
  * or nothing arrived for the profile's ``stable_seconds`` (the quiet timer; the default for unknown senders, so a
    series sent in several associations a few seconds apart gives one result version) — unless a known expected
    count is not reached: that holds completion back for ``expected_count_timeout_seconds``.
`CompletionSweeper.sweep()` applies it to every receiving/re-opened series and, in one transaction per series,
routes it (`node.routing`): a series a route sends to a pipeline is marked complete, gets its next result version
and a job with its priority; any other series is marked ignored and gets nothing. State lives only in the
database, so a restarted node re-times series from their last_received_at. An apscheduler job runs the sweep
every ``sweep_seconds``; `nudge()` runs one at once (the DIMSE server calls it when an association is released).
No failure stops the schedule: a series that makes the rule or routing raise is logged and judged again next sweep
while the others go on; the sweep beats the heartbeat registry (`node.supervise`) as loop ``completion``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from models.clinical import header_value
from node.config import CompletionMode, CompletionSection, NodeConfig, PipelineName, Priority, PriorityRule
from node.index import all_members, instance_set_digest
from node.logs import get_logger
from node.metrics import Metrics
from node.queue import JobQueue, jobs
from node.routing import Decision, read_header, route
from node.schema import associations, instances, series
from node.spools import Spools
from node.stack import analyse_stack
from node.states import NODE_MANUFACTURER, AssociationState, JobState, SeriesState
from node.supervise import Heartbeats, failure

LOOP = "completion"  # the sweep's name in the heartbeat registry
FAILURE_LOG_SECONDS = 60.0  # while sweeps keep failing, one completion_sweep_failed line this often
_ROUTE_TRIES = 3  # instances nearest the middle tried for the routing header when files cannot be read
_ROUTE_GIVE_UP_SECONDS = 3600.0  # ... and for this long after the series' last instance, before it is unreadable


class CompletionReason(StrEnum):
    EXPECTED_COUNT = "expected_count"
    MULTIFRAME = "multiframe"
    CONTIGUOUS_RELEASED = "contiguous_released"
    QUIET_TIMER = "quiet_timer"
    EXPECTED_COUNT_TIMEOUT = "expected_count_timeout"  # the expected count never came: the gate will refuse


@dataclass(frozen=True)
class SendingAssociations:
    """What the associations that sent a series say: all closed?, the last one's state, time and share."""

    all_closed: bool
    last_state: AssociationState | None
    last_closed_at: float | None
    last_sent: int  # instances of this series sent by the last association


def decide(
    series_row: Any,
    instance_rows: Sequence[Any],
    sending: SendingAssociations,
    now: float,
    settings: CompletionSection,
    spacing_tolerance_mm: float,
) -> CompletionReason | None:
    """The completion rule (see the module docstring); None means keep waiting."""
    mode, stable_seconds, grace_seconds = settings.profile(series_row.calling_ae)
    quiet = now - series_row.last_received_at
    expected = series_row.expected_count
    if expected and series_row.instance_count > expected:
        expected = None  # more arrived than announced: it counted one acquisition of several, not this series
    if expected and series_row.instance_count < expected:
        # A sender that says how many instances the series has is believed until it has been silent for long.
        return CompletionReason.EXPECTED_COUNT_TIMEOUT if quiet >= settings.expected_count_timeout_seconds else None
    if settings.early:
        if expected and _count_reached(series_row, instance_rows, expected):
            return CompletionReason.EXPECTED_COUNT
        if len(instance_rows) == 1 and (instance_rows[0].number_of_frames or 1) > 1:
            return CompletionReason.MULTIFRAME
        if (
            mode is CompletionMode.RELEASE
            and sending.all_closed
            and sending.last_state == AssociationState.RELEASED
            and sending.last_sent >= 2
            and sending.last_closed_at is not None
            and now - max(sending.last_closed_at, series_row.last_received_at) >= grace_seconds
            and analyse_stack(instance_rows).even(spacing_tolerance_mm)
        ):
            return CompletionReason.CONTIGUOUS_RELEASED
    if quiet >= stable_seconds:
        return CompletionReason.QUIET_TIMER
    return None


def _count_reached(series_row: Any, instance_rows: Sequence[Any], expected: int) -> bool:
    """Whether the expected count says the series is whole. A re-opened series' count stood at it already: an
    instance sent again with other bytes (a PACS forwarding the series in its own transfer syntax, or re-sending it
    after a patient reconciliation) replaces the stored one and leaves the count where it was, so each sweep during a
    re-send made a new version. There only the instances received since it re-opened count: the re-send is whole
    once they reach it; a change to a few instances is judged by the other rules (release, quiet timer)."""
    if series_row.instance_count < expected:
        return False
    if series_row.state != SeriesState.REOPENED:
        return True
    since = series_row.state_changed_at
    return sum(1 for r in instance_rows if r.received_at >= since) >= expected


class CompletionSweeper:
    """Applies `decide` to open series and queues jobs; ``on_complete`` is called after each commit."""

    def __init__(
        self,
        config: NodeConfig,
        engine: Engine,
        queue: JobQueue,
        *,
        clock: Callable[[], float] = time.time,
        on_complete: Callable[[str, int], None] | None = None,
        metrics: Metrics | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.queue = queue
        self.clock = clock
        self.on_complete = on_complete
        self.metrics = metrics or Metrics()
        self.log = get_logger(component="completion")
        self._failed_sweeps = 0  # in a row
        self._failure_logged_at = 0.0
        self._scheduler: BackgroundScheduler | None = None
        self.heartbeats = heartbeats or Heartbeats()
        self._failures: dict[str, int] = {}  # series_uid -> sweeps in a row that failed on it

    def apply_config(self, config: NodeConfig) -> None:
        self.config = config

    # -- scheduling ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Sweep every ``sweep_seconds`` in apscheduler's thread, supervised as loop ``completion``."""
        self.heartbeats.register(LOOP, self.config.completion.sweep_seconds, alive=self._running,
                                 restart=self._restart)
        self._launch()

    def _launch(self) -> None:
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._sweep_logged, "interval", seconds=self.config.completion.sweep_seconds, id="sweep",
            max_instances=1, coalesce=True, next_run_time=None,
        )
        self._scheduler.start()
        self.nudge()

    def _running(self) -> bool:
        scheduler = self._scheduler
        return scheduler is not None and scheduler.running

    def _restart(self) -> None:
        """The supervisor's restart: a fresh scheduler in place of one that stopped."""
        if self._scheduler is not None and self._scheduler.running:
            return
        self._launch()

    def nudge(self) -> None:
        """Run a sweep now (in the scheduler's thread); harmless if one is running."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.modify_job("sweep", next_run_time=_utcnow())

    def stop(self) -> None:
        self.heartbeats.unregister(LOOP)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _sweep_logged(self) -> None:
        """One scheduled sweep; it never raises (the next one runs on time whatever this one met)."""
        self.heartbeats.beat(LOOP, busy_for=self.config.supervise.item_seconds)
        try:
            self.sweep()
        except Exception as exc:  # noqa: BLE001 - a failed sweep is logged; the schedule goes on
            self._failed_sweeps += 1
            now = time.monotonic()
            if self._failed_sweeps == 1 or now - self._failure_logged_at >= FAILURE_LOG_SECONDS:
                # every sweep_seconds (1 s) through a database outage: the first, then one line a minute
                self._failure_logged_at = now
                self.log.error("completion_sweep_failed", error=failure(exc), failed_in_a_row=self._failed_sweeps)
        else:
            if self._failed_sweeps:
                self.log.info("completion_sweep_recovered", failed_in_a_row=self._failed_sweeps)
            self._failed_sweeps = 0
        self.heartbeats.beat(LOOP)

    # -- the sweep -----------------------------------------------------------------------------------------
    def sweep(self) -> list[tuple[str, int, CompletionReason]]:
        """Complete every series the rule says is whole; returns (series_uid, version, reason) for each."""
        now = self.clock()
        done = []
        with self.engine.connect() as conn:
            open_series = list(
                conn.execute(sa.select(series).where(series.c.state.in_([SeriesState.RECEIVING, SeriesState.REOPENED])))
            )
        for row in open_series:
            try:
                with self.engine.connect() as conn:
                    if not self._worth_a_look(conn, row, now):
                        continue
                    rows = list(conn.execute(sa.select(instances).where(instances.c.series_uid == row.series_uid)))
                    sending = self._sending_associations(conn, row, rows)
                reason = decide(row, rows, sending, now, self.config.completion, self.config.gate.spacing_tolerance_mm)
                if reason is None:
                    continue
                version = self._complete(row, Spools(self.config).rows(rows), reason)  # paths as this host reads them
            except SQLAlchemyError:
                raise  # the database itself failed: this sweep ends, the next one tries again
            except Exception as exc:  # noqa: BLE001 - one series that breaks the rule or routing must not hold up the rest
                self._series_failed(row.series_uid, exc)
                continue
            self._failures.pop(row.series_uid, None)
            if version is not None:
                done.append((row.series_uid, version, reason))
        return done

    def _series_failed(self, series_uid: str, exc: Exception) -> None:
        """Log a series the sweep could not judge (it is judged again next sweep): at its 1st, 2nd, 4th, 8th ...
        failure in a row, so a series that keeps failing does not flood the log."""
        n = self._failures.get(series_uid, 0) + 1
        self._failures[series_uid] = n
        if n & (n - 1) == 0:
            self.log.error("series_sweep_failed", series_uid=series_uid, error=failure(exc), failures_in_a_row=n)

    def _worth_a_look(self, conn: sa.Connection, row: Any, now: float) -> bool:
        """Cheap pre-check so a series still streaming in costs one row read per sweep, not all its instances:
        only the timer, a known expected count, or a closed last association can complete it."""
        settings = self.config.completion
        mode, stable_seconds, _ = settings.profile(row.calling_ae)
        if now - row.last_received_at >= min(stable_seconds, settings.expected_count_timeout_seconds):
            return True
        if not settings.early:
            return False
        if row.expected_count or row.instance_count == 1:
            return True
        if mode is not CompletionMode.RELEASE:
            return False
        state = conn.execute(
            sa.select(associations.c.state).where(associations.c.id == row.last_association_id)
        ).scalar()
        return state is not None and state != AssociationState.OPEN

    def _sending_associations(self, conn: sa.Connection, row: Any, rows: Sequence[Any]) -> SendingAssociations:
        ids = {r.association_id for r in rows if r.association_id}
        if not ids:
            return SendingAssociations(all_closed=False, last_state=None, last_closed_at=None, last_sent=0)
        assocs = {a.id: a for a in conn.execute(sa.select(associations).where(associations.c.id.in_(ids)))}
        last = assocs.get(row.last_association_id)
        return SendingAssociations(
            all_closed=all(a.state != AssociationState.OPEN for a in assocs.values()) and len(assocs) == len(ids),
            last_state=AssociationState(last.state) if last is not None else None,
            last_closed_at=last.closed_at if last is not None else None,
            last_sent=sum(1 for r in rows if r.association_id == row.last_association_id),
        )

    def _complete(self, row: Any, rows: Sequence[Any], reason: CompletionReason) -> int | None:
        """Route, then mark complete + queue the job (or mark ignored) in one transaction, guarded against an
        instance arriving meanwhile. Returns the new result version, or None (ignored, unchanged since it was
        purged, or judged again later)."""
        purged = row.purged_digest is not None or row.purged_members is not None
        if purged and row.version >= 1 and self._resent_unchanged(row, rows, reason):
            return None
        decision = self._route(row, rows)
        if decision.pipeline is None and row.version >= 1 and rows:
            decision = self._kept(row, decision)
        guard = self._guard(row)
        if decision.pipeline is None:
            with self.engine.begin() as conn:
                updated = conn.execute(
                    series.update().where(*guard)
                    .values(state=SeriesState.IGNORED, route=decision.label, state_changed_at=self.clock())
                )
            if updated.rowcount == 1:
                self.metrics.series_routed(decision.label, decision.metric_pipeline)
                self.log.info("series_ignored", series_uid=row.series_uid, route=decision.label,
                              reason=str(reason), instances=row.instance_count)
            return None
        priority = self._priority(row, rows)
        version = int(row.version) + 1
        with self.engine.begin() as conn:
            updated = conn.execute(
                series.update().where(*guard)
                .values(state=SeriesState.COMPLETE, version=version, route=decision.label,
                        state_changed_at=self.clock(), purged_digest=None, purged_members=None)
            )
            if updated.rowcount != 1:
                return None  # something arrived: judge it again next sweep
            job_id = self.queue.enqueue(conn, row.series_uid, version, priority, decision.pipeline)
        self.metrics.series_routed(decision.label, decision.metric_pipeline)
        self.log.info(
            "series_complete", series_uid=row.series_uid, study_uid=row.study_uid, version=version,
            reason=str(reason), instances=row.instance_count, priority=str(priority), job_id=job_id,
            route=decision.label, pipeline=decision.metric_pipeline,
            waited_seconds=round(self.clock() - row.last_received_at, 3),
        )
        if self.on_complete is not None:
            self.on_complete(row.series_uid, version)
        return version

    def _resent_unchanged(self, row: Any, rows: Sequence[Any], reason: CompletionReason) -> bool:
        """A purged series sent again as it was purged, whole or in part (a PACS re-sending a prior, a workstation
        forwarding a few slices of it), whose last job ended with a verdict or a refusal: complete again as it was —
        no new version, whose rejection note would withdraw the results the hospital has had since, re-made by
        today's model from what came back (a part of the series: "too few slices"). A dead last job is run again (a
        new version, as a re-send always did); so is a series re-sent with any instance added or changed. The
        purged instances stay known (`purged_members`) for the next re-send."""
        unchanged = instance_set_digest(rows) == row.purged_digest or all_members(rows, row.purged_members)
        if not unchanged:
            return False
        with self.engine.begin() as conn:
            last = _last_job(conn, row.series_uid)
            if last is None or last.state not in (JobState.DONE, JobState.SKIPPED):
                return False
            updated = conn.execute(series.update().where(*self._guard(row)).values(
                state=SeriesState.COMPLETE, state_changed_at=self.clock(), purged_at=None, purged_digest=None))
        if updated.rowcount == 1:
            self.log.info("series_resent_unchanged", series_uid=row.series_uid, version=int(row.version),
                          reason=str(reason), instances=row.instance_count)
        return True

    def _route(self, row: Any, rows: Sequence[Any]) -> Decision:
        """The routing decision from the header of the series' middle instance (by instance number): a scanner that
        puts its localizer at instance 1 of the axial series must not have the whole series ignored as a
        localizer (the gate then judges the stack as a whole). A file that cannot be read (`OSError`) is no verdict
        on the series: the next ones nearest the middle are tried, and if `_ROUTE_TRIES` fail the error is raised
        (the series is judged again next sweep; `_series_failed` logs it) — for `_ROUTE_GIVE_UP_SECONDS` after its
        last instance; then it is "unreadable" (ignored, `series_unreadable` logged), not judged for ever."""
        ordered = sorted(rows, key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_uid))
        middle = len(ordered) // 2
        nearest = sorted(range(len(ordered)), key=lambda i: (abs(i - middle), i))[:_ROUTE_TRIES]
        header, error = None, None
        for i in nearest:
            try:
                header = read_header(ordered[i].path, calling_ae=row.calling_ae, slices=row.instance_count)
                break
            except OSError as exc:
                error = exc
        else:
            if error is not None:
                if self.clock() - row.last_received_at < _ROUTE_GIVE_UP_SECONDS:
                    raise error
                self.log.error("series_unreadable", series_uid=row.series_uid, error=failure(error))
        return route(header, self.config.routes, NODE_MANUFACTURER)

    def _kept(self, row: Any, decision: Decision) -> Decision:
        """A series that changed after its results went out (a late or re-sent instance) and now routes nowhere
        (more slices than a route allows, another middle instance): ignoring it left those results live and an
        earlier job queued. It stays with its pipeline instead, as a new version: a result, or the gate's "not
        processed" report, that supersedes and withdraws the old ones — while some route still leads to it."""
        with self.engine.connect() as conn:
            last = _last_job(conn, row.series_uid)
        if last is None or last.pipeline is None or str(last.pipeline) not in {str(r.pipeline) for r in self.config.routes}:
            return decision  # no route leads to that pipeline any more: the operator turned it off
        self.log.info("series_route_kept", series_uid=row.series_uid, route=decision.label, pipeline=str(last.pipeline))
        return Decision(str(row.route or decision.label), PipelineName(last.pipeline))

    @staticmethod
    def _guard(row: Any) -> tuple[sa.ColumnElement[bool], ...]:
        """The series row is still as judged: no instance arrived meanwhile, and no replayed dead job took the next
        version (node.versions.reissue, ``pacsnode retry --jobs``): the version it computed would be a second job's."""
        return (series.c.series_uid == row.series_uid, series.c.state == row.state,
                series.c.last_received_at == row.last_received_at, series.c.instance_count == row.instance_count,
                series.c.version == row.version)

    def _priority(self, row: Any, rows: Sequence[Any]) -> Priority:
        for rule in self.config.queue.priority_rules:
            if _matches(rule, row, rows):
                return rule.priority
        return Priority.ROUTINE


def _last_job(conn: sa.Connection, series_uid: str) -> Any:
    """The state and pipeline of the series' newest job (None without one)."""
    return conn.execute(sa.select(jobs.c.state, jobs.c.pipeline).where(jobs.c.series_uid == series_uid)
                        .order_by(jobs.c.version.desc()).limit(1)).first()


def _matches(rule: PriorityRule, row: Any, rows: Sequence[Any]) -> bool:
    if rule.calling_ae is not None and rule.calling_ae != row.calling_ae:
        return False
    if rule.keyword is not None:
        for r in rows[:_ROUTE_TRIES]:  # the first instance that can be read (a file that cannot is skipped)
            try:
                ds = dcmread(r.path, stop_before_pixels=True, specific_tags=[rule.keyword])
            except OSError:
                continue
            except (InvalidDicomError, ValueError):
                return False
            value = header_value(ds, rule.keyword)  # a malformed value matches nothing (models.clinical.header_value)
            return value is not None and str(value).strip().upper() == str(rule.equals).strip().upper()
        return False  # none could be read: routine priority (routing, which read one, decides the rest)
    return True


def _utcnow() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)
