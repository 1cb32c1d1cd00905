"""Retention on a real index, queue, worker and dispatcher (the model runner and PACS sender at their seams): only
settled series lose files, each kind after its own days, dead letters last, and under a disk ceiling the oldest
settled first; the index stays consistent with the spool."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from node.config import DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher, deliveries
from node.index import Index, instances, series
from node.ingest import Ingestor, Origin
from node.queue import JobQueue
from node.retention import Retention
from node.spool import MARKER, Spool
from node.states import DeliveryState
from node.worker import Worker, results
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.fakeclock import FakeClock
from tests.unit.test_worker import FixedRunner, RecordingSender, queue_job

DAY = 86400.0


class Site:
    def __init__(self, tmp_path: Path, retention: dict | None = None) -> None:
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self.config = NodeConfig.model_validate({
            "node": {"data_dir": str(tmp_path / "data")},
            "queue": {"max_attempts": 1, "retry_delay_seconds": 0},
            "gate": {"min_slices": 8, "scope_check": False},
            "retention": {"max_disk_percent": None, **(retention or {})},
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": 104}],
        })
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.index = Index(self.engine, clock=self.clock)
        self.ingestor = Ingestor(Spool(self.config.node.spool_dir), self.index)
        self.queue = JobQueue(self.engine, self.config.queue, clock=self.clock)
        self.sender = RecordingSender()
        self.dispatcher = Dispatcher(self.config, self.engine, {DestinationKind.DIMSE: self.sender},
                                     clock=self.clock)
        self.used = 0
        self.retention = Retention(self.config, self.engine, clock=self.clock, disk_usage=self._disk)

    def _disk(self, _: Path) -> tuple[int, int]:
        """A 1 MB 'disk' whose use is what the data directory really holds plus ``used``."""
        files = sum(p.stat().st_size for p in (self.tmp_path / "data").rglob("*.dcm"))
        return files + self.used, 1_000_000

    def series(self, name: str, seed: int, *, runner: FixedRunner | None = None, deliver: bool = True) -> str:
        made = write_ct_series(self.tmp_path / name, size=32, slices=10, seed=seed)
        for path in made.paths:
            self.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
        with self.engine.begin() as conn:
            conn.execute(series.update().where(series.c.series_uid == made.series_uid).values(state="complete",
                                                                                              version=1))
        queue_job(self.queue, made.series_uid)
        Worker(self.config, self.engine, self.queue, self.dispatcher, lambda: runner or FixedRunner(0.9),
               clock=self.clock).run_pending()
        if deliver:
            self.dispatcher.run_once()
        return made.series_uid

    def spool_files(self, series_uid: str) -> list[Path]:
        return [p for p in self.config.node.spool_dir.rglob("*.dcm") if p.parent.name == series_uid]

    def result_files(self, series_uid: str) -> list[Path]:
        with self.engine.connect() as conn:
            return [Path(r.path) for r in conn.execute(results.select().where(results.c.series_uid == series_uid))
                    if Path(r.path).exists()]

    def consistent(self) -> bool:
        """Every indexed instance has its file, and every spooled file its row (what a restart relies on)."""
        with self.engine.connect() as conn:
            rows = {Path(r.path) for r in conn.execute(sa.select(instances.c.path))}
        files = set(self.config.node.spool_dir.rglob("*.dcm"))
        return rows == files


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.engine.dispose()


RESULTS = 3  # files a pneumonia verdict makes: SR, SEG and the key-images KOS


def test_delivered_series_lose_instances_then_results_each_after_their_days(site):
    uid = site.series("a", seed=1)
    assert len(site.spool_files(uid)) == 10 and len(site.result_files(uid)) == RESULTS
    site.clock.now += 6 * DAY
    assert site.retention.purge().instance_files == 0
    site.clock.now += 1 * DAY
    report = site.retention.purge()
    assert (report.instance_files, report.result_files) == (10, 0)
    assert site.spool_files(uid) == [] and len(site.result_files(uid)) == RESULTS and site.consistent()
    row = site.index.get_series(uid)
    assert (row.state, row.instance_count, row.version) == ("complete", 0, 1) and row.purged_at
    site.clock.now += 23 * DAY
    assert site.retention.purge().result_files == RESULTS
    assert site.result_files(uid) == []
    assert [p.name for p in (site.config.node.data_dir / "results").iterdir()] == [MARKER]  # empty folders removed


def test_a_dry_run_deletes_nothing(site):
    uid = site.series("a", seed=2)
    site.clock.now += 40 * DAY
    report = site.retention.purge(dry_run=True)
    assert (report.instance_files, report.result_files) == (10, RESULTS) and report.bytes_freed > 0
    assert len(site.spool_files(uid)) == 10 and len(site.result_files(uid)) == RESULTS


def test_nothing_undelivered_or_unprocessed_is_deleted(site):
    pending = site.series("pending", seed=3, deliver=False)  # results made, not yet at the PACS
    receiving = write_ct_series(site.tmp_path / "recv", size=32, slices=4, seed=4)
    for path in receiving.paths:  # still arriving: no job yet
        site.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
    site.clock.now += 400 * DAY
    report = site.retention.purge()
    assert report.instance_files == 0 and report.result_files == 0
    assert len(site.spool_files(pending)) == 10 and len(site.spool_files(receiving.series_uid)) == 4


def test_dead_letters_are_kept_for_their_own_days(site):
    failed = site.series("dead", seed=5, runner=FixedRunner(fail=True))  # dead job, a failure SR delivered
    with site.engine.begin() as conn:  # and a dead delivery elsewhere
        conn.execute(deliveries.update().values(state=DeliveryState.DEAD, last_attempt_at=site.clock()))
    site.clock.now += 29 * DAY
    assert site.retention.purge().instance_files == 0
    site.clock.now += 1 * DAY
    assert site.retention.purge().instance_files == 10 and site.spool_files(failed) == [] and site.consistent()


def test_above_the_disk_ceiling_the_oldest_settled_series_go_first(tmp_path):
    site = Site(tmp_path, {"max_disk_percent": 50, "instances_days": 0, "results_days": 0})
    old = site.series("old", seed=6)
    site.clock.now += DAY
    new = site.series("new", seed=7)
    dead = site.series("dead", seed=8, runner=FixedRunner(fail=True))
    used = site._disk(tmp_path)[0]
    # make the disk just over the ceiling: freeing the oldest series is enough
    site.used = 500_000 - used + sum(p.stat().st_size for p in site.spool_files(old) + site.result_files(old)) // 2
    report = site.retention.purge()
    assert report.series == [old] and report.disk_percent_after <= 50 < report.disk_percent_before
    assert site.spool_files(old) == [] and len(site.spool_files(new)) == 10 and len(site.spool_files(dead)) == 10
    site.used = 10_000_000  # far over: every settled series goes, dead letters still wait
    report = site.retention.purge()
    assert report.series == [new] and len(site.spool_files(dead)) == 10 and site.consistent()
    site.engine.dispose()


def test_a_resent_purged_series_becomes_a_new_version(site):
    uid = site.series("a", seed=9)
    site.clock.now += 8 * DAY
    site.retention.purge()
    made = write_ct_series(site.tmp_path / "a2", size=32, slices=10, seed=9)  # the same series, sent again
    for path in made.paths:
        site.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a3"))
    row = site.index.get_series(uid)
    assert (row.state, row.instance_count, row.version) == ("reopened", 10, 1)
    assert pydicom.dcmread(site.spool_files(uid)[0]).SeriesInstanceUID == uid


def test_pacsnode_purge_dry_run_then_real(site, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    uid = site.series("cli", seed=10)
    with site.engine.begin() as conn:  # settled 8 days ago by the wall clock the CLI uses
        conn.execute(deliveries.update().values(delivered_at=site.clock() - 8 * DAY))
        conn.execute(series.update().values(state_changed_at=site.clock() - 8 * DAY))
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')

    def purge(*flags: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "node.cli", "purge", "--config", str(config_path), "--json",
                               *flags], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert purge("--dry-run")["instance_files"] == 10 and len(site.spool_files(uid)) == 10
    assert purge()["instance_files"] == 10 and site.spool_files(uid) == [] and site.consistent()


def test_the_retention_loop_purges_survives_a_failed_purge_and_is_supervised(site, monkeypatch):
    import threading

    from node.retention import RetentionLoop
    from node.supervise import Heartbeats

    uid = site.series("loop", seed=11)
    site.clock.now += 8 * DAY
    calls: list[str] = []
    purged = threading.Event()
    real_purge = site.retention.purge

    def flaky(**kw):
        calls.append("purge")
        if len(calls) == 1:
            raise OSError("disk went away for a moment")
        report = real_purge(**kw)
        purged.set()
        return report

    monkeypatch.setattr(site.retention, "purge", flaky)
    monkeypatch.setattr(RetentionLoop, "TICK_SECONDS", 0.05)
    site.retention.config = site.config.model_copy(update={"retention": site.config.retention.model_copy(
        update={"interval_minutes": 0.001})})  # 60 ms between purges
    heartbeats = Heartbeats()
    loop = RetentionLoop(site.retention, heartbeats)
    loop.start()
    try:
        assert purged.wait(10), calls
        assert site.spool_files(uid) == []
        assert heartbeats.snapshot()["retention"].alive
    finally:
        loop.stop()
    assert "retention" not in heartbeats.snapshot()


def test_an_instance_acknowledged_during_a_purge_is_kept(site, monkeypatch):
    """Retention reads its candidates, then deletes. An instance of such a series acknowledged in between (a late
    slice: the series re-opens) must stay indexed and on disk, and so must the series it joined."""
    uid = site.series("late", seed=31)
    site.clock.advance(8 * DAY)
    extra = write_ct_series(site.tmp_path / "late-extra", size=32, slices=11, seed=31)
    candidates = site.retention._candidates

    def candidates_then_a_late_slice():
        found = list(candidates())
        site.ingestor.accept(dataset_bytes(extra.paths[10]), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
        return found

    monkeypatch.setattr(site.retention, "_candidates", candidates_then_a_late_slice)
    report = site.retention.purge()
    assert uid not in report.series and report.instance_files == 0
    with site.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(instances)
                            .where(instances.c.series_uid == uid)).scalar() == 11
        assert conn.execute(sa.select(series.c.state).where(series.c.series_uid == uid)).scalar() == "reopened"
    assert len(site.spool_files(uid)) == 11


def test_results_of_a_version_begun_during_a_purge_are_kept(site, monkeypatch):
    """Retention lists settled series, then deletes. A series re-sent in between (a changed instance: version 2)
    has its new results written and their delivery pending: the purge used to skip its instances (the series
    changed) but delete every result file of the series, version 2's too, and the dispatcher then dead-lettered
    the delivery ("result file missing"). Now the results are deleted only if the series is still settled."""
    uid = site.series("again", seed=33)
    site.clock.advance(40 * DAY)  # past instances_days and results_days
    first = set(site.result_files(uid))
    assert len(first) == RESULTS
    changed = write_ct_series(site.tmp_path / "again-2", size=32, slices=10, seed=33)
    ds = pydicom.dcmread(changed.paths[4])
    ds.PixelData = ds.pixel_array[::-1].copy().tobytes()  # the same instance with other pixels: a new version
    ds.save_as(changed.paths[4])
    candidates = site.retention._candidates

    def candidates_then_version_2():
        found = list(candidates())
        site.ingestor.accept(dataset_bytes(changed.paths[4]), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
        with site.engine.begin() as conn:
            conn.execute(series.update().where(series.c.series_uid == uid).values(state="complete", version=2))
        queue_job(site.queue, uid, version=2)
        Worker(site.config, site.engine, site.queue, site.dispatcher, lambda: FixedRunner(0.9),
               clock=site.clock).run_pending()  # version 2's results written, their delivery pending
        return found

    monkeypatch.setattr(site.retention, "_candidates", candidates_then_version_2)
    report = site.retention.purge()
    assert report.result_files == 0 and report.instance_files == 0
    second = set(site.result_files(uid)) - first
    assert second and all(p.exists() for p in second | first)
    assert site.dispatcher.run_once() == 1  # version 2 goes out with its files
    with site.engine.connect() as conn:
        states = [r.state for r in conn.execute(sa.select(deliveries.c.state).where(deliveries.c.series_uid == uid))]
    assert states.count(DeliveryState.DELIVERED) == 2 and DeliveryState.DEAD not in states


def _commitment(site: Site, series_uid: str, state: str, version: int | None = None) -> int:
    """A commitments row in ``state`` for the series' delivery (of ``version``, else its only one); its id."""
    import json

    from node.schema import commitments

    with site.engine.begin() as conn:
        q = sa.select(deliveries).where(deliveries.c.series_uid == series_uid)
        d = conn.execute(q if version is None else q.where(deliveries.c.version == version)).one()
        conn.execute(commitments.insert().values(
            delivery_id=d.id, destination=d.destination, kind="dimse", study_uid="1.2", refs="[]",
            state=state, attempts=1, stored_at=site.clock.now, deadline=site.clock.now + 300,
            next_attempt_at=site.clock.now, failed=json.dumps([["1.2.3", "storage failure"]])))
    return int(d.id)


@pytest.mark.parametrize("commit_state", ["failed", "timed_out", "requested", "committed"])
def test_a_delivery_the_pacs_did_not_confirm_keeps_its_files_like_a_dead_letter(tmp_path, commit_state):
    """Found by review: a delivery the PACS reported it does not hold (storage commitment failed) or never
    confirmed counted as settled, so its results and instances went after their days — under disk pressure first
    of all, being the oldest — and nothing was left to send again or rebuild from. Now failed/timed-out commitments
    keep a series dead_letter_days, it goes for disk pressure only after every other settled series (a PACS that
    never confirms must not stop purging, and so intake, for good: found reviewing the first version), `retry`
    sends it again, and an awaited commitment keeps the series unsettled."""
    site = Site(tmp_path, {"max_disk_percent": 50})
    uid = site.series("a", seed=9)
    delivery = _commitment(site, uid, commit_state)
    site.clock.now += DAY
    other = site.series("b", seed=10)  # settled a day later: by age, the second to go
    site.clock.now += 8 * DAY  # past instances_days (7), before dead_letter_days (30)
    site.used = 500_000 - site._disk(tmp_path)[0] + 1000  # just over the ceiling: one series is enough
    site.retention.purge()
    kept = commit_state != "committed"
    assert (len(site.spool_files(uid)), len(site.result_files(uid))) == ((10, RESULTS) if kept else (0, RESULTS))
    assert site.spool_files(other) == []  # instances_days passed for both; results_days for neither
    site.used = 10_000_000  # far over: the unconfirmed series goes too, last
    site.retention.purge()
    assert (len(site.spool_files(uid)) == 10) == (commit_state == "requested") and site.consistent()
    replayed = site.dispatcher.retry([delivery])
    assert replayed == (1 if commit_state in ("failed", "timed_out") else 0)
    site.engine.dispose()


def test_only_the_latest_versions_commitment_holds_a_series(site):
    """A superseded version's failed commitment does not keep the series once the newer one is confirmed."""
    uid = site.series("a", seed=9)
    _commitment(site, uid, "failed")
    with site.engine.begin() as conn:  # version 2, delivered and confirmed
        d = conn.execute(sa.select(deliveries).where(deliveries.c.series_uid == uid)).one()
        conn.execute(deliveries.insert().values(
            {**{k: v for k, v in d._mapping.items() if k != "id"}, "version": 2}))
    _commitment(site, uid, "committed", version=2)
    site.clock.now += 8 * DAY
    assert site.retention.purge().instance_files == 10


def test_series_purged_before_cost_no_query_per_series(site):
    """A purge (and every /admin dry run) walked every settled series ever received with two queries each, and
    two more for the result files of each one past results_days: its cost grew with the node's whole history.
    Now a purge reads each table once, and a series whose files are gone costs nothing more."""
    for n in range(4):
        site.series(f"h{n}", seed=50 + n)
    site.clock.now += 40 * DAY
    first = site.retention.purge()
    assert (first.instance_files, first.result_files) == (40, 4 * RESULTS)
    statements: list[str] = []

    def count(conn, cursor, statement, *rest):
        statements.append(statement)

    sa.event.listen(site.engine, "before_cursor_execute", count)
    try:
        again = site.retention.purge()
    finally:
        sa.event.remove(site.engine, "before_cursor_execute", count)
    assert (again.instance_files, again.result_files) == (0, 0)
    assert len(statements) <= 5, statements  # series, jobs, deliveries; results and deliveries' files


@pytest.mark.parametrize("resent", ["unchanged", "in-part", "changed", "after-a-dead-job"])
def test_a_purged_series_sent_again_unchanged_completes_as_it_was(site, resent):
    """A PACS re-sending a prior months later: the same instances, byte for byte. It became a new version whose
    rejection note withdrew the result the hospital had had since (re-made by today's model), where the same
    re-send a day earlier was a no-op. Now it completes as it was, no job; so does a re-send of part of it (3 of 10
    slices: found by review, it became a version the gate refused as too few slices, whose rejection note
    withdrew the valid result), also after a second purge; a changed one is a new version, and so is one whose
    last job died (a re-send is how a site retries it)."""
    from node.completion import CompletionSweeper
    from node.queue import jobs

    uid = site.series("a", seed=9, runner=FixedRunner(fail=True) if resent == "after-a-dead-job" else None)
    site.clock.now += 40 * DAY
    site.retention.purge()
    assert site.index.get_series(uid).instance_count == 0
    made = write_ct_series(site.tmp_path / "a2", size=32, slices=10, seed=9)  # the same series, sent again
    for i, path in enumerate(made.paths[:3] if resent == "in-part" else made.paths):
        data = dataset_bytes(path)
        if resent == "changed" and i == 3:
            ds = pydicom.dcmread(path)
            ds.PixelData = ds.pixel_array[::-1].copy().tobytes()
            ds.save_as(path, enforce_file_format=True)
            data = dataset_bytes(path)
        site.ingestor.accept(data, "1.2.840.10008.1.2.1", Origin("CT1", "a3"))
    site.clock.now += 120
    done = CompletionSweeper(site.config, site.engine, site.queue, clock=site.clock).sweep()
    row = site.index.get_series(uid)
    with site.engine.connect() as conn:
        versions = [r.version for r in conn.execute(sa.select(jobs.c.version).where(jobs.c.series_uid == uid))]
    if resent == "unchanged":
        assert done == [] and (row.state, row.version, row.instance_count) == ("complete", 1, 10)
        assert versions == [1] and row.purged_at is None
    elif resent == "in-part":
        assert done == [] and (row.state, row.version, row.instance_count) == ("complete", 1, 3)
        assert versions == [1]
        site.clock.now += 40 * DAY
        site.retention.purge()  # the three go again; the node still knows all ten
        for path in made.paths[3:]:
            site.ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a4"))
        site.clock.now += 120
        assert CompletionSweeper(site.config, site.engine, site.queue, clock=site.clock).sweep() == []
        assert site.index.get_series(uid).version == 1
    else:
        assert [(u, v) for u, v, _ in done] == [(uid, 2)] and sorted(versions) == [1, 2]


def test_a_spool_volume_not_mounted_keeps_its_series_rows_for_a_later_purge(site):
    """Defect: with the spool's volume not mounted when retention ran, its settled series had their rows deleted
    while their files, unseen, stayed: once the volume was back nothing named them and no purge ever freed them (a
    leak of the whole unmounted window's data). Now a series whose spool root has no marker is kept, the report
    names the root, and the next purge with the volume back deletes rows and files together."""
    import os

    uid = site.series("a", seed=31)
    root = site.config.node.spool_dir
    site.clock.now += 8 * DAY
    os.rename(root, site.tmp_path / "volume")
    root.mkdir()
    report = site.retention.purge()
    assert report.instance_files == 0 and report.as_dict()["spools_unmounted"] == [str(root)]
    assert site.index.get_series(uid).instance_count == 10
    root.rmdir()
    os.rename(site.tmp_path / "volume", root)
    assert site.retention.purge().instance_files == 10
    assert site.spool_files(uid) == [] and site.consistent()
