"""Every file system the node writes to is measured (node.disks): with the spool on a volume of its own (the
shipped docker-compose.scale.yml, NFS, CephFS), admission control, retention's max_disk_percent, the disk metric,
`/readyz` and `pacsnode status` judge the fullest file system and name it — not the data directory's alone.

A separate volume is played without mounting anything: ``os.stat`` reports another ``st_dev`` for the folder and
everything below it, and the free space seams (or ``os.statvfs``) give it its own figures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node.admission import Admission, evaluate
from node.config import AdmissionSection, NodeConfig
from node.disks import folders, group, measure, node_folders, purge_folders, sqlite_folder, used_by_path
from node.errors import AdmissionRefusedError, StoreStatus
from node.ingest import Ingestor, Origin
from node.retention import fullest_disk
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.fakeclock import FakeClock

MB = 1_000_000
FLOOR, RESERVE = 100 * MB, 20 * MB
SETTINGS = AdmissionSection(min_free_bytes=FLOOR, min_free_percent=0, reserve_free_bytes=RESERVE,
                            reserve_free_percent=0, max_queue_depth=0, check_interval_seconds=0.5)


def separate_volume(monkeypatch: pytest.MonkeyPatch, mount: Path) -> int:
    """Make ``mount`` and everything below it a file system of its own as ``os.stat`` sees it; returns its st_dev."""
    real = os.stat
    dev = real(mount.parent).st_dev + 1000

    def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        st = real(path, *args, **kwargs)
        if isinstance(path, int):
            return st
        p = Path(os.fsdecode(path))
        if p == mount or mount in p.parents:
            fields = list(st)
            fields[2] = dev  # st_dev
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "stat", stat)
    return dev


class Disks:
    """(free, total) per measured folder: ``volumes`` for some, ``default`` for any other."""

    def __init__(self, volumes: dict[Path, tuple[int, int]], default: tuple[int, int]) -> None:
        self.volumes, self.default, self.reads = volumes, default, []

    def __call__(self, path: Path) -> tuple[int, int]:
        self.reads.append(Path(path))
        return self.volumes.get(Path(path), self.default)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "data" / "spool").mkdir(parents=True)
    return tmp_path / "data"


# -- node.disks ---------------------------------------------------------------------------------------------------
def test_the_folders_a_node_writes_to_and_the_sqlite_folder(tmp_path):
    assert folders(tmp_path) == {"spool": tmp_path / "spool", "data": tmp_path, "results": tmp_path / "results",
                                 "incoming": tmp_path / "incoming", "database": tmp_path}
    assert folders(tmp_path, "postgresql://u@db/node").keys() == {"spool", "data", "results", "incoming"}
    assert sqlite_folder("sqlite:////var/lib/pacs/node.db") == Path("/var/lib/pacs")
    assert sqlite_folder("sqlite://") is None and sqlite_folder("sqlite:///:memory:") is None
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path)},
                                        "database": {"url": "sqlite:////srv/db/node.db"}})
    assert node_folders(config)["database"] == Path("/srv/db")
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path)}, "spools": {"b": "/mnt/b"}})
    assert list(purge_folders(config).items()) == [("spool", tmp_path / "spool"), ("spool b", Path("/mnt/b")),
                                                   ("data", tmp_path), ("results", tmp_path / "results")]


def test_folders_sharing_a_file_system_are_measured_once(data, monkeypatch):
    spool = data / "spool"
    dev = separate_volume(monkeypatch, spool)
    groups = group(folders(data))
    assert [g.path for g in groups] == [spool, data]
    assert [r for r, _ in groups[1].folders] == ["data", "results", "incoming", "database"]
    assert groups[1].at == data  # results/ and incoming/ do not exist yet: measured where they will be made
    assert os.stat(spool).st_dev == dev != os.stat(data).st_dev
    disks = Disks({spool: (5, 10)}, (50, 100))
    volumes = measure(folders(data), disks)
    assert disks.reads == [spool, data] and [(v.free, v.total) for v in volumes] == [(5, 10), (50, 100)]
    assert used_by_path(folders(data), disks) == {str(spool): (5, 10), str(data): (50, 100)}

    def failing(path: Path) -> tuple[int, int]:
        if path == spool:
            raise OSError(5, "Input/output error")
        return 50, 100

    broken, fine = measure(folders(data), failing)  # one unreadable file system leaves the others measured
    assert broken.free is None and "Input/output error" in (broken.error or "") and fine.free == 50
    with pytest.raises(OSError):
        measure(folders(data), failing, strict=True)


# -- admission control --------------------------------------------------------------------------------------------
def test_a_full_spool_volume_pauses_admission_though_data_dir_has_room(data, monkeypatch, tmp_path):
    """Defect: admission read data_dir's file system only, said "accepting: all" while the spool volume was full,
    and every C-STORE — of series in progress too — then failed part way with SpoolFullError (0xA700)."""
    spool = data / "spool"
    separate_volume(monkeypatch, spool)
    disks = Disks({spool: (RESERVE - 1, 1000 * MB)}, (800 * MB, 1000 * MB))
    admission = Admission(SETTINGS, data, queue_depth=lambda: 0, disk_usage=disks, clock=FakeClock(1000.0))
    report = admission.report()
    assert report["accepting"] == "nothing" and report["paused"] == ["disk_floor", "disk_reserve"]
    assert report["path"] == str(spool) and report["free_bytes"] == RESERVE - 1  # which file system is short
    assert [(fs["path"], fs["free_bytes"]) for fs in report["file_systems"]] == [(str(spool), RESERVE - 1),
                                                                                  (str(data), 800 * MB)]
    assert admission.refuses_all() is not None  # STOW-RS: 503 before the body is read
    # Through the one boundary both front doors share: refused before anything is written, 0xA700.
    from node.db import create_engine_for, init_schema
    from node.index import Index
    from node.spool import Spool

    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    ingestor = Ingestor(Spool(spool), Index(engine), admission)
    made = write_ct_series(tmp_path / "ct", slices=1, size=16, seed=1)
    with pytest.raises(AdmissionRefusedError) as refused:
        ingestor.accept(dataset_bytes(made.paths[0]), ExplicitVRLittleEndian, Origin(calling_ae="CT1"))
    assert refused.value.status == StoreStatus.OUT_OF_RESOURCES and list(spool.rglob("*.dcm")) == []
    engine.dispose()


def test_the_fullest_file_system_decides_and_writes_count_against_the_spool(data, monkeypatch):
    spool = data / "spool"
    separate_volume(monkeypatch, spool)
    clock = FakeClock(1000.0)
    disks = Disks({spool: (FLOOR + 10 * MB, 1000 * MB)}, (FLOOR - 1, 1000 * MB))  # data_dir's disk is the short one
    admission = Admission(SETTINGS, data, queue_depth=lambda: 0, disk_usage=disks, clock=clock)
    assert admission.report()["paused"] == ["disk_floor"] and admission.report()["path"] == str(data)
    disks.default = (800 * MB, 1000 * MB)
    clock.advance(0.5)
    assert admission.report()["accepting"] == "all" and len(disks.reads) == 4  # two file systems, two reads
    admission.written(9 * MB)  # instances land on the spool: its estimate, not data_dir's, runs down
    admission.check("1.2.3")
    assert len(disks.reads) == 4
    admission.written(2 * MB)
    disks.volumes[spool] = (FLOOR - MB, 1000 * MB)
    with pytest.raises(AdmissionRefusedError):  # crossed the spool's floor: read again at once
        admission.check("1.2.4")
    assert len(disks.reads) == 6 and admission.report()["path"] == str(spool)


def test_status_evaluates_every_file_system(data, monkeypatch):
    spool = data / "spool"
    separate_volume(monkeypatch, spool)
    disks = Disks({spool: (FLOOR - 1, 1000 * MB)}, (800 * MB, 1000 * MB))
    state = evaluate(SETTINGS, data, lambda: 0, disks)
    assert state.paused and state.path == spool and state.free_bytes == FLOOR - 1


def test_a_small_volume_without_the_spool_is_judged_on_its_own_size(data):
    """Defect: the 2 GiB floor and 512 MiB reserve applied to every file system, so an empty 1 GiB volume at
    data_dir/results or the database's folder paused intake for good while the spool had 900 GiB free. There the
    bytes are now capped at a share of the volume (20 % / 5 %); the spool's volume keeps them in full."""
    gib, mib = 1 << 30, 1 << 20
    spool, results, db = data / "spool", data / "results", data / "db"
    paths = {"spool": spool, "data": data, "results": results, "incoming": data / "incoming", "database": db}
    devices = {results: 2, db: 3}  # data_dir and incoming on the spool's volume

    def locate(path: Path) -> tuple[int, Path]:
        return devices.get(path, 1), path

    disks = Disks({spool: (900 * gib, 1000 * gib), results: (1000 * mib, gib), db: (900 * mib, gib)}, (0, 0))
    admission = Admission(AdmissionSection(), data, queue_depth=lambda: 0, paths=paths, disk_usage=disks,
                          locate=locate, clock=FakeClock(1000.0))
    report = admission.refresh().as_dict()
    assert report["accepting"] == "all" and len(report["file_systems"]) == 3
    disks.volumes[results] = (150 * mib, gib)  # results volume below its floor: 20 % of 1 GiB
    report = admission.refresh().as_dict()
    assert report["paused"] == ["disk_floor"] and report["path"] == str(results)
    assert (report["floor_bytes"], report["reserve_bytes"]) == (gib // 5, gib // 20)
    disks.volumes[results] = (40 * mib, gib)  # ... and below its reserve: 5 %
    assert admission.refresh().as_dict()["accepting"] == "nothing"
    disks.volumes[results] = (1000 * mib, gib)
    disks.volumes[spool] = (1000 * mib, gib)  # the spool's own volume keeps the bytes in full: 2 GiB
    report = admission.refresh().as_dict()
    assert report["paused"] == ["disk_floor"] and report["path"] == str(spool)
    assert (report["floor_bytes"], report["reserve_bytes"]) == (2 * gib, 512 * mib)


# -- retention ----------------------------------------------------------------------------------------------------
def test_retention_frees_the_spool_volume_when_it_is_the_full_one(tmp_path, monkeypatch):
    """Defect: retention measured data_dir's file system (10 % used here) and purged nothing while the spool volume
    was over max_disk_percent."""
    from tests.unit.test_retention import Site

    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    separate_volume(monkeypatch, spool)  # before the node's spool is made: its root is a mount point from the start
    site = Site(tmp_path, {"max_disk_percent": 50, "instances_days": 0, "results_days": 0})
    old = site.series("old", seed=6)
    site.clock.now += 86400
    new = site.series("new", seed=7)
    def held() -> int:
        return sum(p.stat().st_size for p in spool.rglob("*.dcm"))

    # the spool volume just over 50 % (freeing the oldest series is enough), data_dir's disk at 10 %
    base = 500_000 - held() + sum(p.stat().st_size for p in site.spool_files(old)) // 2

    def usage(path: Path) -> tuple[int, int]:
        return (base + held() if path == spool else 100_000), 1_000_000

    site.retention.disk_usage = usage
    report = site.retention.purge()
    assert report.series == [old] and report.disk_path == str(spool)
    assert report.disk_percent_after <= 50 < report.disk_percent_before
    assert site.spool_files(old) == [] and len(site.spool_files(new)) == 10 and site.consistent()
    assert fullest_disk(site.config, usage)[2] == spool
    site.engine.dispose()


# -- the service: metric, /readyz, retention's dry run ------------------------------------------------------------
def test_the_service_reports_each_file_system_and_the_short_one(tmp_path, monkeypatch):
    from node.config import load_config
    from node.service import Service

    data = tmp_path / "data"
    spool = data / "spool"
    spool.mkdir(parents=True)
    separate_volume(monkeypatch, spool)
    real_statvfs = os.statvfs

    def statvfs(path):  # type: ignore[no-untyped-def]
        if Path(os.fsdecode(path)) == spool:  # a 16 MiB volume with 40 KiB left
            return os.statvfs_result((4096, 4096, 4096, 10, 10, 100, 10, 10, 0, 255))
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{data}"\nhost = "127.0.0.1"\n[worker]\nenabled = false\n'
                    "[retention]\nmax_disk_percent = 90\n")
    service = Service(load_config(path, environ={}))
    try:
        report = service.admission.report()
        assert report["accepting"] == "nothing" and report["path"] == str(spool)
        samples = {(s.name, s.labels.get("path")): s.value for family in
                   text_string_to_metric_families(service.metrics.render()[0].decode()) for s in family.samples}
        assert samples["pacsnode_disk_total_bytes", str(spool)] == 4096 * 4096
        assert samples["pacsnode_disk_used_bytes", str(spool)] == 4096 * 4086
        assert ("pacsnode_disk_used_bytes", str(data)) in samples
        with TestClient(service.http._app, base_url="http://127.0.0.1") as client:
            ready = client.get("/readyz").json()
        assert ready["admission"]["path"] == str(spool) and ready["checks"]["spool"] == "ok"
        dry = service.retention.purge(dry_run=True)
        assert dry.disk_path == str(spool) and dry.disk_percent_before > 99
    finally:
        service.engine.dispose()
