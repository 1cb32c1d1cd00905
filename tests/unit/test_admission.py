"""Admission control: the decision (floor, hard reserve, queue ceiling, series in progress, resume band), its
caching, events and metrics, and both front doors' answers through the real Ingestor (STOW-RS in-process;
DIMSE with storescu in tests/integration/test_admission_tmpfs.py). Disk usage, queue depth and clocks are seams."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from structlog.testing import capture_logs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node.admission import RESUME_BAND, Admission, evaluate, index_activity, pressure, thresholds
from node.config import AdmissionSection, NodeConfig, Priority
from node.db import create_engine_for, init_schema
from node.dicomweb import create_app
from node.errors import AdmissionRefusedError, ConfigError, StoreStatus
from node.http import HealthProbe
from node.index import Index
from node.ingest import Ingestor, Origin
from node.metrics import Metrics
from node.queue import JobQueue
from node.spool import Spool
from node.states import AdmissionReason
from tests.conftest import REPO
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.fakeclock import FakeClock
from tests.unit.test_dicomweb import FAILED_SEQ, FAILURE_REASON, STOW_TYPE, multipart

MB = 1_000_000
FLOOR, RESERVE = 100 * MB, 20 * MB
SETTINGS = AdmissionSection(min_free_bytes=FLOOR, min_free_percent=0, reserve_free_bytes=RESERVE,
                            reserve_free_percent=0, max_queue_depth=3, check_interval_seconds=0.5,
                            active_series_seconds=300, retry_after_seconds=42)


class FakeDisk:
    """A file system whose free space the test sets; ``written`` bytes also come off it, as on a real disk."""

    def __init__(self, free: int, total: int = 1000 * MB) -> None:
        self.free, self.total, self.reads = free, total, 0
        self.error: OSError | None = None

    def __call__(self, path: Path) -> tuple[int, int]:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.free, self.total


class Depth:
    def __init__(self, n: int = 0) -> None:
        self.n, self.reads = n, 0

    def __call__(self) -> int:
        self.reads += 1
        return self.n


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def make(disk: FakeDisk, depth: Depth | None = None, *, clock: FakeClock, wall: FakeClock,
         active: dict[str, float] | None = None, settings: AdmissionSection = SETTINGS) -> Admission:
    activity = (active or {}).get
    return Admission(settings, Path("/data"), queue_depth=depth or Depth(), series_activity=activity,
                     disk_usage=disk, clock=clock, wall_clock=wall)


def refusal(admission: Admission, series_uid: str) -> AdmissionRefusedError | None:
    try:
        admission.check(series_uid)
    except AdmissionRefusedError as exc:
        return exc
    return None


# -- the pure decision ----------------------------------------------------------------------------------------------
def test_thresholds_take_the_larger_of_bytes_and_percent():
    s = AdmissionSection()  # defaults: max(2 GiB, 5 %) and max(512 MiB, 1 %)
    assert thresholds(s, 10 << 30) == (2 << 30, 512 << 20)  # small disk: the byte figures
    assert thresholds(s, 1 << 40) == (round((1 << 40) * 0.05), round((1 << 40) * 0.01))  # 1 TiB: the percentages
    # A file system without the spool (results, incoming, the database on a volume of their own): the bytes are
    # capped at 20 % / 5 % of its size, so a 1 GiB volume can meet them; from 10 GiB up they apply in full.
    assert thresholds(s, 1 << 30, spool=False) == ((1 << 30) // 5, (1 << 30) // 20)
    assert thresholds(s, 10 << 30, spool=False) == thresholds(s, 10 << 30) == (2 << 30, 512 << 20)
    assert thresholds(s, 1 << 40, spool=False) == thresholds(s, 1 << 40)


def test_pressure_floor_reserve_ceiling_and_resume_band():
    total = 1000 * MB
    assert pressure(SETTINGS, 500 * MB, total, 0) == frozenset()
    assert pressure(SETTINGS, FLOOR - 1, total, 0) == {AdmissionReason.DISK_FLOOR}
    assert pressure(SETTINGS, RESERVE - 1, total, 0) == {AdmissionReason.DISK_FLOOR, AdmissionReason.DISK_RESERVE}
    assert pressure(SETTINGS, 500 * MB, total, 3) == {AdmissionReason.QUEUE_CEILING}
    assert pressure(SETTINGS, 500 * MB, total, 2) == frozenset()
    # Once paused, the floor holds until free space is RESUME_BAND above it.
    paused = frozenset({AdmissionReason.DISK_FLOOR})
    assert pressure(SETTINGS, FLOOR + 1, total, 0, paused) == paused
    assert pressure(SETTINGS, int(FLOOR * (1 + RESUME_BAND)), total, 0, paused) == frozenset()
    # Unknown figures pause nothing; no ceiling with 0; nothing at all when disabled.
    assert pressure(SETTINGS, None, None, None) == frozenset()
    assert pressure(SETTINGS.model_copy(update={"max_queue_depth": 0}), 500 * MB, total, 10**6) == frozenset()
    assert pressure(SETTINGS.model_copy(update={"enabled": False}), 0, total, 10**6) == frozenset()


def test_config_refuses_a_reserve_above_the_floor(tmp_path):
    from node.config import load_config

    path = tmp_path / "node.toml"
    path.write_text("[admission]\nmin_free_bytes = 1000\nreserve_free_bytes = 2000\n")
    with pytest.raises(ConfigError, match="admission.*reserve_free_bytes must not exceed min_free_bytes"):
        load_config(path, environ={})
    path.write_text("[admission]\nmin_free_percent = 2\nreserve_free_percent = 3\n")
    with pytest.raises(ConfigError, match="reserve_free_percent"):
        load_config(path, environ={})
    path.write_text("[admission]\nmax_queue_depth = -1\n")
    with pytest.raises(ConfigError, match="admission.max_queue_depth"):
        load_config(path, environ={})


# -- Admission: decisions -------------------------------------------------------------------------------------------
def test_below_the_floor_new_series_are_refused_and_series_in_progress_go_on(clock, wall):
    disk = FakeDisk(FLOOR - 1)
    admission = make(disk, clock=clock, wall=wall, active={"1.2.3": wall.now - 10, "1.2.9": wall.now - 301})
    assert refusal(admission, "1.2.3") is None  # an instance 10 s ago: still being received
    refused = refusal(admission, "1.2.4")  # never seen
    assert refused is not None and refused.status == StoreStatus.OUT_OF_RESOURCES == 0xA700
    assert (refused.reason, refused.retry_after) == ("disk_floor", 42)
    stale = refusal(admission, "1.2.9")  # last instance 301 s ago: not "in progress" any more
    assert stale is not None and stale.reason == "disk_floor"
    assert admission.refuses_all() is None


def test_below_the_reserve_everything_is_refused(clock, wall):
    admission = make(FakeDisk(RESERVE - 1), clock=clock, wall=wall, active={"1.2.3": wall.now})
    refused = refusal(admission, "1.2.3")
    assert refused is not None and refused.reason == "disk_reserve"
    whole = admission.refuses_all()
    assert whole is not None and whole.reason == "disk_reserve" and whole.retry_after == 42
    assert admission.report()["accepting"] == "nothing"


def test_queue_ceiling_refuses_new_series_only(clock, wall):
    depth = Depth(3)
    admission = make(FakeDisk(500 * MB), depth, clock=clock, wall=wall, active={"1.2.3": wall.now})
    assert refusal(admission, "1.2.3") is None
    refused = refusal(admission, "1.2.4")
    assert refused is not None and refused.reason == "queue_ceiling"
    depth.n = 2
    assert refusal(admission, "1.2.4") is not None  # depth is cached for check_interval_seconds
    clock.advance(0.5)
    assert refusal(admission, "1.2.4") is None


def test_resumes_by_itself_with_events_and_a_band(clock, wall):
    disk = FakeDisk(500 * MB)
    admission = make(disk, clock=clock, wall=wall)
    with capture_logs() as logs:
        assert refusal(admission, "1.2.1") is None
        disk.free = FLOOR - 1
        clock.advance(0.5)
        assert refusal(admission, "1.2.2") is not None
        disk.free = FLOOR + 1  # back over the floor but inside the band: still paused
        clock.advance(0.5)
        assert refusal(admission, "1.2.3") is not None
        disk.free = int(FLOOR * (1 + RESUME_BAND)) + 1
        clock.advance(0.5)
        assert refusal(admission, "1.2.4") is None
    events = [e for e in logs if e["event"].startswith("admission_")]
    assert [e["event"] for e in events] == ["admission_paused", "admission_refused", "admission_resumed"]
    paused, _, resumed = events
    assert paused["reason"] == "disk_floor" and paused["free_bytes"] == FLOOR - 1 and paused["floor_bytes"] == FLOOR
    assert paused["reserve_bytes"] == RESERVE and paused["total_bytes"] == 1000 * MB and paused["log_level"] == "warning"
    assert resumed["reason"] == "disk_floor" and resumed["refused_in_pause"] == 2


def test_refusals_are_logged_at_most_every_ten_seconds_with_counts(clock, wall):
    admission = make(FakeDisk(FLOOR - 1), clock=clock, wall=wall)
    with capture_logs() as logs:
        for n in range(500):
            assert refusal(admission, f"1.2.{n}") is not None
        clock.advance(10)
        assert refusal(admission, "1.2.999") is not None
    refused = [e for e in logs if e["event"] == "admission_refused"]
    assert [(e["refused"], e["refused_in_pause"]) for e in refused] == [(1, 1), (500, 501)]
    assert refused[0]["series_uid"] == "1.2.0"


def test_disk_is_read_once_per_interval_and_at_once_when_writes_would_cross_the_floor(clock, wall):
    disk = FakeDisk(FLOOR + 50 * MB)
    admission = make(disk, clock=clock, wall=wall)
    for _ in range(1000):
        admission.check("1.2.3")
    assert disk.reads == 1  # the clock did not move: one statvfs for 1000 checks
    for _ in range(49):  # 49 MB written: the estimate stays above the floor, no new read
        admission.written(MB)
        disk.free -= MB
        admission.check("1.2.3")
    assert disk.reads == 1
    admission.written(2 * MB)
    disk.free -= 2 * MB
    refused = refusal(admission, "1.2.4")  # the estimate crossed: read again now, not half a second later
    assert disk.reads == 2 and refused is not None and refused.reason == "disk_floor"
    clock.advance(0.5)
    refusal(admission, "1.2.4")
    assert disk.reads == 3


def test_unreadable_figures_pause_nothing_and_are_logged_once(clock, wall):
    disk = FakeDisk(0)
    disk.error = OSError(5, "Input/output error")
    depth = Depth()
    depth_error = RuntimeError("database is locked")

    def failing_depth() -> int:
        raise depth_error

    admission = Admission(SETTINGS, Path("/data"), queue_depth=failing_depth, disk_usage=disk, clock=clock,
                          wall_clock=wall)
    with capture_logs() as logs:
        for _ in range(5):
            admission.check("1.2.3")
            clock.advance(1)
    unknown = [e for e in logs if e["event"] == "admission_unknown"]
    assert sorted(e["figure"] for e in unknown) == ["disk", "queue_depth"]
    assert admission.report()["free_bytes"] is None and depth.reads == 0


def test_hot_reload_applies_at_the_next_check(clock, wall):
    admission = make(FakeDisk(150 * MB), clock=clock, wall=wall)
    assert refusal(admission, "1.2.3") is None
    admission.apply_config(SETTINGS.model_copy(update={"min_free_bytes": 200 * MB}))
    assert refusal(admission, "1.2.3") is not None  # no wait for the interval
    admission.apply_config(SETTINGS.model_copy(update={"enabled": False}))
    assert refusal(admission, "1.2.3") is None
    assert admission.paused_by_reason() == {"disk_floor": False, "queue_ceiling": False, "disk_reserve": False}


def test_checks_from_many_threads_agree_and_never_raise_unexpectedly(clock, wall):
    disk = FakeDisk(FLOOR - 1)
    admission = make(disk, clock=clock, wall=wall, active={"1.2.3": wall.now})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(2000):
                admission.check("1.2.3")
                assert refusal(admission, "1.2.4") is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- through the Ingestor: real spool, index and job queue --------------------------------------------------------
class Stack:
    def __init__(self, tmp_path: Path, disk: FakeDisk, clock: FakeClock, settings: AdmissionSection = SETTINGS):
        self.config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.index = Index(self.engine)
        self.queue = JobQueue(self.engine, self.config.queue)
        self.spool = Spool(self.config.node.spool_dir)
        self.admission = Admission(settings, tmp_path, queue_depth=self.queue.depth,
                                   series_activity=index_activity(self.index), disk_usage=disk, clock=clock)
        self.ingestor = Ingestor(self.spool, self.index, self.admission)

    def accept(self, path: Path) -> None:
        self.ingestor.accept(dataset_bytes(path), ExplicitVRLittleEndian, Origin(calling_ae="CT1"))

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM instances")).scalar_one())


def test_queue_ceiling_with_the_real_queue_and_index(tmp_path, clock):
    stack = Stack(tmp_path, FakeDisk(500 * MB), clock)
    busy = write_ct_series(tmp_path / "a", slices=3, size=16, seed=1)
    fresh = write_ct_series(tmp_path / "b", slices=2, size=16, seed=2)
    stack.accept(busy.paths[0])  # series A starts while the queue is empty
    with stack.engine.begin() as conn:
        for n in range(3):
            stack.queue.enqueue(conn, f"9.9.{n}", 1, Priority.ROUTINE)
    clock.advance(0.5)
    stack.accept(busy.paths[1])  # A is being received: it may finish
    with pytest.raises(AdmissionRefusedError) as refused:
        stack.accept(fresh.paths[0])  # B is new: refused, nothing written
    assert refused.value.reason == "queue_ceiling"
    assert stack.rows() == 2 and len(list(stack.spool.root.rglob("*.dcm"))) == 2
    with stack.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET state = 'done' WHERE id = 1"))
    clock.advance(0.5)
    stack.accept(fresh.paths[0])  # the queue drained below its ceiling: accepted again, no restart
    assert stack.rows() == 3
    stack.engine.dispose()


class SpoolDisk(FakeDisk):
    """Free space = a start value less what the real spool holds."""

    def __init__(self, free: int, spool: Path) -> None:
        super().__init__(free)
        self.start, self.spool = free, spool

    def __call__(self, path: Path) -> tuple[int, int]:
        self.free = self.start - sum(p.stat().st_size for p in self.spool.rglob("*.dcm"))
        return super().__call__(path)


def test_stored_bytes_count_against_free_space_between_reads(tmp_path, clock):
    series = write_ct_series(tmp_path / "a", slices=4, size=64, seed=3)
    size = len(dataset_bytes(series.paths[0]))  # 8 KB of pixels; the file adds its meta
    stack = Stack(tmp_path, FakeDisk(0), clock)
    disk = SpoolDisk(FLOOR + size * 3 // 2, stack.spool.root)
    stack.admission._disk_usage = disk  # the seam, set before the first read
    stack.accept(series.paths[0])
    stack.accept(series.paths[1])  # the estimate is still above the floor: no new read
    assert disk.reads == 1
    other = write_ct_series(tmp_path / "b", slices=1, size=16, seed=4)
    with pytest.raises(AdmissionRefusedError) as refused:  # the estimate crossed: the disk is read at once
        stack.accept(other.paths[0])
    assert disk.reads == 2 and disk.free < FLOOR and refused.value.reason == "disk_floor"
    stack.accept(series.paths[2])  # the series in progress goes on
    stack.engine.dispose()


# -- STOW-RS through the same boundary ------------------------------------------------------------------------------
@pytest.fixture
def stow(tmp_path, clock):
    disk = FakeDisk(500 * MB)
    stack = Stack(tmp_path, disk, clock)
    metrics = Metrics()
    metrics.bind_admission(stack.admission.paused_by_reason)
    health = HealthProbe(stack.engine, stack.spool.root, lambda: True, admission=stack.admission.report)
    app = create_app(stack.config, stack.ingestor, stack.index, health=health, metrics=metrics, token=None)
    client = TestClient(app)
    yield stack, disk, client
    client.close()
    stack.engine.dispose()


def metric(client: TestClient, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_stow_per_instance_refusals_then_503_then_200(stow, tmp_path, clock):
    stack, disk, client = stow
    a = write_ct_series(tmp_path / "a", slices=3, size=16, seed=5)
    b = write_ct_series(tmp_path / "b", slices=2, size=16, seed=6)
    post = lambda paths: client.post("/dicomweb/studies", content=multipart([p.read_bytes() for p in paths]),  # noqa: E731
                                     headers={"Content-Type": STOW_TYPE})
    assert post(a.paths[:1]).status_code == 200
    disk.free = FLOOR - 1
    clock.advance(0.5)
    mixed = post([a.paths[1], b.paths[0]])  # A in progress, B new
    assert mixed.status_code == 202 and mixed.headers["Retry-After"] == "42"
    assert [i[FAILURE_REASON]["Value"][0] for i in mixed.json()[FAILED_SEQ]["Value"]] == [0xA700]
    refused = post(b.paths)  # only the new series: every part refused → 503
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "42"
    assert len(refused.json()[FAILED_SEQ]["Value"]) == 2
    assert metric(client, "pacsnode_admission_refused_total", reason="disk_floor", front_door="stow") == 3
    assert metric(client, "pacsnode_admission_paused", reason="disk_floor") == 1
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "spool": "ok", "models": "ok"}
    disk.free = 500 * MB
    clock.advance(0.5)
    assert post(b.paths).status_code == 200  # resumed by itself
    assert metric(client, "pacsnode_admission_paused", reason="disk_floor") == 0
    assert stack.rows() == 4  # A0, A1 (in progress while paused), B0, B1 (after resuming)


def test_stow_below_the_reserve_is_503_before_the_body_is_read(stow, clock):
    stack, disk, client = stow
    disk.free = RESERVE - 1
    clock.advance(0.5)
    # A body that would be a 400 if it were read: the 503 comes first, nothing stored.
    answer = client.post("/dicomweb/studies", content=b"not multipart at all", headers={"Content-Type": STOW_TYPE})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "42"
    assert answer.json()["reason"] == "disk_reserve"
    assert metric(client, "pacsnode_admission_refused_total", reason="disk_reserve", front_door="stow") == 1
    report = HealthProbe(stack.engine, stack.spool.root, lambda: True, admission=stack.admission.report).report()
    assert report["ready"] is True and report["admission"]["accepting"] == "nothing"
    assert report["admission"]["paused"] == ["disk_floor", "disk_reserve"]


# -- pacsnode status ------------------------------------------------------------------------------------------------
def test_status_shows_admission(tmp_path):
    config_path = tmp_path / "node.toml"
    # A floor no disk can meet: status must say new series are refused (computed, not read from a running node).
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
                           "[admission]\nmin_free_percent = 99.99\nreserve_free_percent = 0\nreserve_free_bytes = 0\n")
    (tmp_path / "data").mkdir()  # the node's database, as a node that has run leaves it (status never makes one)
    init_schema(engine := create_engine_for(f"sqlite:///{tmp_path / 'data' / 'node.db'}"))
    engine.dispose()
    run = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(config_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "admission:  PAUSED (disk_floor): accepting series in progress; free " in run.stdout
    as_json = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(config_path)],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    report = json.loads(as_json.stdout)["admission"]
    assert report["paused"] == ["disk_floor"] and report["queue_depth"] == 0 and report["max_queue_depth"] == 500
    direct = evaluate(AdmissionSection(), tmp_path, lambda: 0)
    assert direct.free_bytes is not None and direct.total_bytes is not None and direct.total_bytes >= direct.free_bytes


# -- the status page ------------------------------------------------------------------------------------------------
def test_status_page_shows_admission(tmp_path, clock, wall):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from node.admin import admin_routes
    from tests.unit.test_admin import Site

    site = Site(tmp_path)
    disk = FakeDisk(FLOOR - 1)
    admission = make(disk, clock=clock, wall=wall)
    routes = admin_routes(lambda: site.config, site.engine, token=None, dispatcher=site.dispatcher,
                          queue=site.queue, index=site.index, admission=admission.report)
    with TestClient(Starlette(routes=[Mount("/admin", routes=routes)])) as client:
        paused = client.get("/admin/").text
        disk.free = 500 * MB
        clock.advance(0.5)
        open_again = client.get("/admin/").text
    site.engine.dispose()
    assert "<b>paused</b>disk_floor: accepting series in progress" in paused
    assert "paused\n  (disk_floor)</span>, accepting series in progress;\n  free 100.0 MB, floor 100.0 MB" in paused
    assert "<b>open</b>accepting all" in open_again and "Admission control: accepting all;" in open_again


# -- wiring: the service shares one Admission between both front doors and hot-reloads it --------------------------
def test_the_service_wires_admission_and_reloads_it(tmp_path):
    from node.config import load_config
    from node.service import Service

    path = tmp_path / "node.toml"
    base = f'[node]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\n[worker]\nenabled = false\n'
    path.write_text(base)
    service = Service(load_config(path, environ={}))
    try:
        assert service.ingestor.admission is service.admission
        assert service.admission.report()["accepting"] == "all"
        path.write_text(base + "[admission]\nmin_free_percent = 99.99\nreserve_free_percent = 0\n"
                               "reserve_free_bytes = 0\nretry_after_seconds = 9\n")
        assert service.reload(path)
        report = service.admission.report()
        assert report["paused"] == ["disk_floor"] and report["retry_after_seconds"] == 9
        text = service.metrics.render()[0].decode()
        assert 'pacsnode_admission_paused{reason="disk_floor"} 1.0' in text
    finally:
        service.engine.dispose()
