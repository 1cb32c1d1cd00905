"""Retention: delete what has served its purpose, never what a job or a delivery may still need.

`Retention.purge(dry_run=...)` returns a `PurgeReport` after deleting, per series:
  * **received instances** (spool files and their index rows) of a series that is *settled* — ignored, or complete
    with no job waiting or running and every delivery of it delivered — ``[retention] instances_days`` after it
    settled (its last delivery, or the time it was ignored);
  * **result files** (SR, SEG, KOS under ``data_dir/results``) of a settled series ``results_days`` after it;
  * **dead letters** — a series whose job or a delivery is dead, or whose latest delivery the PACS did not confirm
    by storage commitment (failed, timed out) — are kept ``dead_letter_days`` (so an admin can `pacsnode retry`
    them), then their instances and result files go the same way; a commitment still awaited keeps the series
    unsettled;
  * and, while a file system it frees is fuller than ``max_disk_percent`` — the spool's (a volume of its own in
    docker-compose.scale.yml, NFS, CephFS), a ``[spools]`` mount point's, or that of ``data_dir`` and its results
    (`fullest_disk`) —, the instances and results of settled series regardless of age, the oldest settled first,
    then those of unconfirmed ones (dead letters are never deleted early).
A purged series keeps its row (route, version, ``purged_at``, the digest of what was purged), and result rows keep
their UIDs: the same series sent again unchanged (a PACS re-sending a prior) completes as it was, with no new job
(node.completion), while a changed one becomes a new version whose results withdraw the old ones by UID. Empty
spool folders are removed. ``0`` days keeps a kind forever. A real purge (the scheduled loop, ``pacsnode purge``)
writes one audit record per study whose received instances it deleted (110105 DICOM Study Deleted, with the study's
SOP class counts and its patient; 110103 action D where instances of the study remain); a dry run writes none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.audit import AuditTrail
from node.auditdb import audit_purged
from node.auditevents import StudySummary, patient_id_of
from node.config import NodeConfig
from node.disks import group, purge_folders
from node.index import instance_members, instance_set_digest
from node.logs import get_logger
from node.loops import LoopThread
from node.schema import commitments, deliveries, instances, jobs, results, series
from node.spools import Spools
from node.states import CommitState, DeliveryState, JobState, SeriesState

_DAY = 86400.0
# A file in a purged series' folder that has no row and was last written this long ago is left over (a purge
# killed between its rows and its files, a write whose commit failed) and is swept; a younger one may be a re-send
# renamed into place whose row is about to commit (`Retention._sweep`).
ORPHAN_GRACE_SECONDS = 3600.0


@dataclass
class PurgeReport:
    """What a purge deleted (or, dry run, would delete)."""

    dry_run: bool
    series: list[str] = field(default_factory=list)  # series whose instances were purged
    studies: dict[str, StudySummary] = field(default_factory=dict, repr=False)  # what went, per study (the audit)
    study_series: dict[str, list[str]] = field(default_factory=dict, repr=False)  # study UID -> its purged series
    purged_results: list[Path] = field(default_factory=list, repr=False)
    instance_files: int = 0
    result_files: int = 0
    bytes_freed: int = 0
    disk_percent_before: float = 0.0
    disk_percent_after: float = 0.0
    disk_path: str = ""  # the file system the percentages are of: the fullest at the start (`fullest_disk`)
    spools_unmounted: set[str] = field(default_factory=set)  # roots without their marker: their series kept

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "series": len(self.series), "instance_files": self.instance_files,
            "result_files": self.result_files, "bytes_freed": self.bytes_freed,
            "disk_percent_before": round(self.disk_percent_before, 1),
            "disk_percent_after": round(self.disk_percent_after, 1), "disk_path": self.disk_path,
        } | ({"spools_unmounted": sorted(self.spools_unmounted)} if self.spools_unmounted else {})


# A delivery whose storage commitment is still awaited is not settled; one the PACS did not confirm (it reported
# failures, or never answered) is kept like a dead letter — dead_letter_days — and under disk pressure goes only
# after every other settled series: its files are all there is to send again (`pacsnode retry`), or to rebuild
# from. Only the latest version's commitments count.
_UNSETTLED = frozenset({CommitState.PENDING.value, CommitState.REQUESTED.value})
_UNPROVEN = frozenset({CommitState.FAILED.value, CommitState.TIMED_OUT.value})


@dataclass(frozen=True)
class _Candidate:
    series_uid: str
    settled_at: float  # when it stopped needing its files (last delivery, ignore, or dead letter)
    dead: bool
    state_changed_at: float  # the series' as judged settled: it must still be so when its instances go
    instances_left: bool = True  # False once purged (instance_count 0): nothing to look up for its instances
    unconfirmed: bool = False  # its latest version's storage commitment failed or timed out
    study_uid: str = ""
    purged_at: float | None = None  # when retention last deleted its instances


def disk_usage(path: Path) -> tuple[int, int]:
    """(used, total) bytes of the file system holding ``path`` (used as an unprivileged writer sees it)."""
    usage = shutil.disk_usage(path)
    return usage.total - usage.free, usage.total


def _percent(used: int, total: int) -> float:
    return 100.0 * max(used, 0) / total if total else 0.0


def fullest_disk(config: NodeConfig, usage: Callable[[Path], tuple[int, int]] = disk_usage) -> tuple[int, int, Path]:
    """(used, total, path) of the fullest file system retention frees (`node.disks.purge_folders`: the spool
    roots, ``data_dir/results``, ``data_dir``; each once), the one ``max_disk_percent`` is judged on. Raises OSError."""
    fullest: tuple[int, int, Path] | None = None
    for g in group(purge_folders(config)):
        if g.error is not None:
            raise g.error
        used, total = usage(g.at)
        if fullest is None or _percent(used, total) > _percent(fullest[0], fullest[1]):
            fullest = (used, total, g.path)
    assert fullest is not None  # purge_folders is never empty
    return fullest


class Retention:
    """Purges over one engine and the data directory; ``clock`` returns epoch seconds (injected in tests)."""

    def __init__(self, config: NodeConfig, engine: Engine, *, clock: Callable[[], float] = time.time,
                 disk_usage: Callable[[Path], tuple[int, int]] = disk_usage, audit: AuditTrail | None = None) -> None:
        self.config = config
        self.engine = engine
        self.audit = audit  # the node's trail; None: one opened for each purge that deletes (`pacsnode purge`)
        self.clock = clock
        self.disk_usage = disk_usage
        self.log = get_logger(component="retention")
        self._with_results: set[str] = set()  # read at the start of each purge

    def apply_config(self, config: NodeConfig) -> None:
        self.config = config

    def purge(self, *, dry_run: bool = False, scheduled: bool = False) -> PurgeReport:
        """Delete what the retention settings allow (nothing with ``dry_run``: report what would go). Each study
        whose received instances went is audited (110105 DICOM Study Deleted, `node.auditdb.audit_purged`), even
        when the purge fails part way; ``scheduled``: `RetentionLoop` runs it (the node, not a user, requested it)."""
        report = PurgeReport(dry_run=dry_run)
        try:
            return self._purge(report, dry_run)
        finally:
            if not dry_run and report.studies:
                self._audit_purged(report, scheduled)

    def _audit_purged(self, report: PurgeReport, scheduled: bool) -> None:
        audit = self.audit or AuditTrail(self.config.audit, self.config.node.data_dir,
                                         ae_title=self.config.node.ae_title)
        try:
            audit_purged(audit, self.engine, list(report.studies.values()), report.study_series, scheduled=scheduled)
        finally:
            if audit is not self.audit:
                audit.close()

    def _purge(self, report: PurgeReport, dry_run: bool) -> PurgeReport:
        settings = self.config.retention
        used, total, path = fullest_disk(self.config, self.disk_usage)
        report.disk_percent_before, report.disk_path = _percent(used, total), str(path)
        now = self.clock()
        candidates = sorted(self._candidates(), key=lambda c: c.settled_at)  # oldest settled first
        self._with_results = self._series_with_results()
        for c in candidates:
            held = c.dead or c.unconfirmed
            keep = settings.dead_letter_days if held else settings.instances_days
            if keep and now - c.settled_at >= keep * _DAY:
                self._purge_instances(c, report, dry_run)
            keep = settings.dead_letter_days if held else settings.results_days
            if keep and now - c.settled_at >= keep * _DAY:
                self._purge_results(c, report, dry_run)
        if settings.max_disk_percent is not None:  # dead letters wait for an admin, whatever the disk; series the
            # PACS did not confirm go only once every other settled one has (a PACS that never confirms must not
            # stop purging, and so intake, for good)
            over = self._free_up(settings.max_disk_percent, [c for c in candidates if not (c.dead or c.unconfirmed)],
                                 report, dry_run, (used, total))
            if over:
                self._free_up(settings.max_disk_percent, [c for c in candidates if c.unconfirmed and not c.dead],
                              report, dry_run, (used, total))
        used_after, total_after, _ = fullest_disk(self.config, self.disk_usage)
        if dry_run:
            used_after -= report.bytes_freed
        report.disk_percent_after = _percent(used_after, total_after)
        if dry_run:
            self.log.debug("retention_dry_run", **report.as_dict())  # the status page asks often
        else:
            self.log.info("retention_purged", **report.as_dict())
        return report

    def _free_up(self, ceiling: float, candidates: Sequence[_Candidate], report: PurgeReport, dry_run: bool,
                 start: tuple[int, int]) -> bool:
        """Purge ``candidates`` in order while the fullest file system is over ``ceiling`` percent; returns whether
        it still is. ``start``: (used, total) measured before this purge (a dry run deletes nothing)."""
        for c in candidates:
            if dry_run:
                used_now, total_now = start[0] - report.bytes_freed, start[1]  # what the deletions so far would free
            else:
                used_now, total_now, _ = fullest_disk(self.config, self.disk_usage)
            if _percent(used_now, total_now) <= ceiling:
                return False
            if c.unconfirmed:
                self.log.warning("retention_purging_unconfirmed", series_uid=c.series_uid)
            self._purge_instances(c, report, dry_run)
            self._purge_results(c, report, dry_run)
        return True

    # -- what may go -------------------------------------------------------------------------------------------
    def _candidates(self) -> Iterable[_Candidate]:
        """Settled series with files left: ignored ones, complete ones whose jobs ended and deliveries are all
        delivered, and dead letters (a dead job or delivery, nothing still pending). Three queries whatever the
        history (one per table; it was two per series ever received, each purge and each /admin dry run)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(series.c.series_uid, series.c.state, series.c.state_changed_at, series.c.instance_count,
                          series.c.study_uid, series.c.purged_at)
                .where(series.c.state.in_([SeriesState.COMPLETE, SeriesState.IGNORED]))
            ).all()
            job_states: dict[str, set[str]] = {}
            for uid, state in conn.execute(sa.select(jobs.c.series_uid, jobs.c.state).distinct()):
                job_states.setdefault(uid, set()).add(str(state))
            sends: dict[str, list[Any]] = {}
            for d in conn.execute(
                sa.select(deliveries.c.series_uid, deliveries.c.version, deliveries.c.state, deliveries.c.delivered_at,
                          deliveries.c.last_attempt_at, commitments.c.state.label("commit_state"))
                .outerjoin(commitments, commitments.c.delivery_id == deliveries.c.id)
            ):
                sends.setdefault(d.series_uid, []).append(d)
        for row in rows:
            states, its_sends = job_states.get(row.series_uid, set()), sends.get(row.series_uid, [])
            if states & {JobState.QUEUED.value, JobState.RUNNING.value}:
                continue
            latest = max((d.version for d in its_sends), default=0)  # a superseded version's commitment is moot
            commits = {d.commit_state for d in its_sends if d.version == latest}
            if commits & _UNSETTLED or any(d.state in (DeliveryState.PENDING, DeliveryState.SENDING)
                                           for d in its_sends):
                continue
            dead = JobState.DEAD.value in states or any(d.state == DeliveryState.DEAD for d in its_sends)
            times = [row.state_changed_at] + [d.delivered_at or d.last_attempt_at or 0.0 for d in its_sends]
            yield _Candidate(row.series_uid, max(t for t in times if t is not None), dead, row.state_changed_at,
                             instances_left=bool(row.instance_count), unconfirmed=bool(commits & _UNPROVEN),
                             study_uid=row.study_uid, purged_at=row.purged_at)

    # -- deleting ----------------------------------------------------------------------------------------------
    def _purge_instances(self, c: _Candidate, report: PurgeReport, dry_run: bool) -> None:
        series_uid = c.series_uid
        if not c.instances_left:
            if c.purged_at is not None and not dry_run:
                self._sweep(c, report)
            return
        with self.engine.connect() as conn:
            seen = conn.execute(sa.select(series.c.instance_count, series.c.purged_members)
                                .where(series.c.series_uid == series_uid)).first()
            rows = conn.execute(
                sa.select(instances.c.sop_uid, instances.c.path, instances.c.spool_id, instances.c.sha256,
                          instances.c.study_uid, instances.c.sop_class_uid)
                .where(instances.c.series_uid == series_uid)
            ).all()
        spools = Spools(self.config)
        rows = spools.rows(rows)  # paths on this host; an unmapped spool fails this purge, rows kept
        if not rows or seen is None or series_uid in report.series:
            return
        if gone := spools.unmounted(rows):  # its files unseen: deleting the rows would orphan them
            report.spools_unmounted.update(map(str, gone))
            return
        if dry_run:
            self._count(series_uid, rows, report)
            return
        # Rows first: a crash between the two leaves orphan files (swept by the next purge of the folder,
        # `_sweep`), never rows pointing at deleted files. Only if the series is still as it was judged settled: an
        # instance acknowledged since (new or changed: the series re-opened, its count or state time moved)
        # keeps it all.
        # A file is unlinked only if it is still the one read here (same inode): an instance re-sent after the
        # rows went is written under a new inode, and stays.
        inodes = {r.path: _inode(r.path) for r in rows}
        with self.engine.begin() as conn:
            settled = conn.execute(
                series.update().where(series.c.series_uid == series_uid,
                                      series.c.state.in_([SeriesState.COMPLETE, SeriesState.IGNORED]),
                                      series.c.state_changed_at == c.state_changed_at,
                                      series.c.instance_count == seen.instance_count)
                .values(instance_count=0, purged_at=self.clock(), purged_digest=instance_set_digest(rows),
                        purged_members=instance_members(rows, seen.purged_members))
            ).rowcount == 1
            if settled:
                conn.execute(instances.delete().where(instances.c.series_uid == series_uid,
                                                      instances.c.sop_uid.in_([r.sop_uid for r in rows])))
        if not settled:
            self.log.info("retention_series_changed", series_uid=series_uid)
            return
        self._count(series_uid, rows, report)
        _summarize(series_uid, rows, report)  # before the files go: it reads a patient ID from one of them
        folders = set()
        for r in rows:
            seen_inode = inodes[r.path]
            if seen_inode is not None and _inode(r.path) == seen_inode:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(r.path)
            folders.add(Path(r.path).parent)
        for root in self._spool_roots():
            _remove_empty([f for f in folders if root in f.parents], root)

    def _spool_roots(self) -> set[Path]:
        """Every spool root this process reaches: its own (also without a spool id) and ``[spools]``'."""
        return {self.config.node.spool_dir, *Spools(self.config).roots.values()}

    def _sweep(self, c: _Candidate, report: PurgeReport) -> None:
        """Delete what is left in the folder of a series whose instances were purged: files without a row last
        written `ORPHAN_GRACE_SECONDS` ago or more (those a purge killed after its rows went left behind, a write
        whose commit failed, a temporary file of a write killed midway). A file renamed into place since (a
        re-send) is younger, or has its row; one replaced after it was looked at (another inode) stays."""
        folders = [f for root in self._spool_roots() if (f := root / c.study_uid / c.series_uid).is_dir()]
        stale_before = self.clock() - ORPHAN_GRACE_SECONDS
        found: dict[Path, int] = {}
        for folder in folders:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name.endswith((".dcm", ".tmp")) and e.is_file(follow_symlinks=False) \
                            and e.stat(follow_symlinks=False).st_mtime < stale_before:
                        found[Path(e.path)] = e.inode()
        if found:  # the rows read after the files: a row committed since names its file
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(instances.c.path, instances.c.spool_id)
                                    .where(instances.c.series_uid == c.series_uid)).all()
            indexed = {Path(r.path) for r in Spools(self.config).rows(rows)}
            for path, inode in found.items():
                if path not in indexed and _inode(str(path)) == inode:
                    report.bytes_freed += _size(path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    report.instance_files += 1
        for root in self._spool_roots():
            _remove_empty([f for f in folders if root in f.parents], root)

    @staticmethod
    def _count(series_uid: str, rows: Sequence[Any], report: PurgeReport) -> None:
        report.series.append(series_uid)
        report.instance_files += len(rows)
        report.bytes_freed += sum(_size(r.path) for r in rows)

    def _series_with_results(self) -> set[str]:
        """The series that still have a result file on disk (one query, streamed: memory for those series only,
        not for the whole history), so a series whose files are gone costs no query at all. Every object the worker
        writes has its results row (a delivery's files are among them); `_purge_results` reads a series' own again
        before deleting."""
        alive: set[str] = set()
        with self.engine.connect() as conn:
            for uid, path in conn.execute(sa.select(results.c.series_uid, results.c.path)):
                if uid not in alive and os.path.exists(path):
                    alive.add(uid)
        return alive

    def _purge_results(self, c: _Candidate, report: PurgeReport, dry_run: bool) -> None:
        series_uid = c.series_uid
        if series_uid not in self._with_results:
            return  # purged before (or never any): a file written since belongs to a version that is not settled
        with self.engine.connect() as conn:
            paths = [Path(r.path) for r in conn.execute(
                sa.select(results.c.path).where(results.c.series_uid == series_uid))]
            for d in conn.execute(sa.select(deliveries.c.files).where(deliveries.c.series_uid == series_uid)):
                paths += [Path(p) for p in json.loads(d.files)]
            # Read after the paths: a version begun since the candidates were listed (the series re-sent) moved the
            # state time or holds a job or delivery, and its files are then among these paths or not yet written.
            # Each version writes files of its own, so one begun after this check is never among them.
            if not _still_settled(conn, c):
                self.log.info("retention_series_changed", series_uid=series_uid)
                return
        present = sorted({p for p in paths if p.exists()} - set(report.purged_results))
        report.purged_results.extend(present)
        report.result_files += len(present)
        report.bytes_freed += sum(_size(p) for p in present)
        if dry_run:
            return
        for path in present:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_empty({p.parent for p in present}, self.config.node.data_dir / "results")


def _summarize(series_uid: str, rows: Sequence[Any], report: PurgeReport) -> None:
    """Add the instances of ``series_uid`` being purged to ``report.studies`` (counts by SOP class, the patient ID
    of one file per study) for the audit record."""
    read: set[str] = set()  # one file's header per study and series, even where it has no PatientID
    for r in rows:
        study = report.studies.setdefault(r.study_uid, StudySummary(r.study_uid))
        study.counts[r.sop_class_uid] = study.counts.get(r.sop_class_uid, 0) + 1
        if not study.patient_ids and r.study_uid not in read:
            read.add(r.study_uid)
            if patient := patient_id_of(r.path):
                study.patient_ids.add(patient)
        purged = report.study_series.setdefault(r.study_uid, [])
        if series_uid not in purged:
            purged.append(series_uid)


def _still_settled(conn: sa.Connection, c: _Candidate) -> bool:
    """Whether ``c``'s series is still as it was judged settled: same state and state time, no job queued or
    running, no delivery pending or being sent."""
    row = conn.execute(sa.select(series.c.state, series.c.state_changed_at)
                       .where(series.c.series_uid == c.series_uid)).first()
    if row is None or row.state not in (SeriesState.COMPLETE, SeriesState.IGNORED) \
            or row.state_changed_at != c.state_changed_at:
        return False
    busy_job = conn.execute(sa.select(jobs.c.id).where(
        jobs.c.series_uid == c.series_uid, jobs.c.state.in_([JobState.QUEUED, JobState.RUNNING])).limit(1)).first()
    busy_delivery = conn.execute(sa.select(deliveries.c.id).where(
        deliveries.c.series_uid == c.series_uid,
        deliveries.c.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])).limit(1)).first()
    return busy_job is None and busy_delivery is None


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _remove_empty(folders: Iterable[Path], root: Path) -> None:
    """Remove ``folders`` and their parents up to (not including) ``root`` while they are empty."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        current = folder
        while current != root and root in current.parents:
            try:
                current.rmdir()
            except OSError:
                break
            current = current.parent


class RetentionLoop:
    """Runs `Retention.purge` every ``[retention] interval_minutes`` in its own thread, supervised like the other
    loops: it beats ``heartbeats`` while it waits, declares the purge's allowance while it works, and survives any
    error of one purge (logged; the next interval tries again)."""

    LOOP = "retention"
    TICK_SECONDS = 5.0

    def __init__(self, retention: Retention, heartbeats: Any) -> None:
        self.retention = retention
        self.heartbeats = heartbeats
        self._loop_thread = LoopThread(heartbeats, self.LOOP, "retention", self._run)

    def start(self) -> None:
        self._loop_thread.start(self.TICK_SECONDS, restart=self.start)

    def stop(self, timeout: float = 30.0) -> None:
        self._loop_thread.stop(timeout)

    def _run(self) -> None:
        loop = self._loop_thread
        next_at = time.monotonic()  # a purge right after start: a node that was down may be over its ceiling
        while not loop.stopping.is_set():
            loop.beat()
            if time.monotonic() >= next_at:
                loop.beat(busy_for=3600.0)  # a purge of a large backlog may take long
                try:
                    self.retention.purge(scheduled=True)
                except Exception as exc:  # noqa: BLE001 - one failed purge must not end the loop
                    self.retention.log.error("retention_failed", error=type(exc).__name__)
                next_at = time.monotonic() + self.retention.config.retention.interval_minutes * 60.0
                loop.beat()
            loop.sleep(self.TICK_SECONDS)
