"""Spool: atomic durable writes at UID-only paths; bad UIDs and disk errors map to DIMSE statuses; writes are refused
(0xA701) while the root is not the file system object it started on (its volume unmounted), and resume when it is."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
from structlog.testing import capture_logs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node.errors import InvalidUIDError, ReceiveError, SpoolFullError, StoreFailedError, StoreStatus
from node.spool import ROOT_CHECK_SECONDS, Spool
from tests.fakeclock import FakeClock


def test_write_is_complete_and_leaves_no_temp_files(tmp_path):
    spool = Spool(tmp_path / "spool")
    spooled = spool.write("1.2", "1.2.3", "1.2.3.4", [b"abc", b"def"])
    assert spooled.path == tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert spooled.path.read_bytes() == b"abcdef"
    assert spooled.size == 6
    assert [p.name for p in spooled.path.parent.iterdir()] == ["1.2.3.4.dcm"]
    again = spool.write("1.2", "1.2.3", "1.2.3.4", [b"new"])
    assert again.path.read_bytes() == b"new" and again.sha256 != spooled.sha256


def test_traversal_never_reaches_the_filesystem(tmp_path):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError):
        spool.write("1.2", "../../..", "1.2.3", [b"x"])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def _failing_write(code):
    def fake_write(fd, data):
        raise OSError(code, os.strerror(code))

    return fake_write


@pytest.mark.parametrize(
    ("code", "error", "status"),
    [
        (errno.ENOSPC, SpoolFullError, StoreStatus.OUT_OF_RESOURCES),
        (errno.EDQUOT, SpoolFullError, StoreStatus.OUT_OF_RESOURCES),
        (errno.EIO, StoreFailedError, StoreStatus.OUT_OF_RESOURCES_STORE),
    ],
)
def test_disk_errors_map_to_out_of_resources_and_clean_up(tmp_path, monkeypatch, code, error, status):
    """Fault injection at the OS boundary: the spool's own logic is what runs."""
    spool = Spool(tmp_path / "spool")
    monkeypatch.setattr(os, "write", _failing_write(code))
    with pytest.raises(error) as err:
        spool.write("1.2", "1.2.3", "1.2.3.4", [b"abc"])
    assert err.value.status == status
    monkeypatch.undo()
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_the_hash_covers_the_dataset_not_the_header(tmp_path):
    spool = Spool(tmp_path / "spool")
    one = spool.write("1.2", "1.2.3", "1.2.3.4", [b"data", b"set"], header=b"meta naming CT1")
    assert one.path.read_bytes() == b"meta naming CT1dataset" and one.size == 22
    two = spool.write("1.2", "1.2.3", "1.2.3.4", [b"dataset"], header=b"meta naming ORTHANC")
    assert two.sha256 == one.sha256  # the same instance from another sender
    assert spool.write("1.2", "1.2.3", "1.2.3.4", [b"dataset!"], header=b"meta naming CT1").sha256 != one.sha256


# -- the spool root is the file system it started on (a volume unmounted under the node) -----------------------------
def test_writes_are_refused_while_the_root_is_not_the_one_started_on_and_resume_when_it_is_back(tmp_path):
    """Defect: with the spool volume gone (umount -l, a lost NFS mount) writes re-created the folders in the bare
    mount point on the disk below and were acknowledged; once the volume was back those files were hidden. Played
    here without mounting: the root is moved away and an empty folder (another inode) left in its place."""
    root, volume = tmp_path / "data" / "spool", tmp_path / "volume"
    spool = Spool(root)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"first"])
    os.rename(root, volume)  # the volume goes away...
    root.mkdir()  # ...leaving its bare mount point
    with capture_logs() as logs:
        for sop in ("1.2.3.2", "1.2.3.3"):
            with pytest.raises(StoreFailedError) as err:
                spool.write("1.2", "1.2.3", sop, [b"lost"])
            assert err.value.status == StoreStatus.OUT_OF_RESOURCES_STORE  # 0xA701, the sender may retry
            assert "is no longer the file system it started on" in str(err.value)
        assert spool.root_problem() is not None
    assert list(root.iterdir()) == []  # nothing written where it would be hidden
    assert [e["event"] for e in logs] == ["spool_root_lost"]  # once, not per write
    root.rmdir()
    os.rename(volume, root)  # the volume is back: writes go on by themselves
    with capture_logs() as logs:
        spool.write("1.2", "1.2.3", "1.2.3.2", [b"back"])
    assert [e["event"] for e in logs] == ["spool_root_back"]
    assert sorted(p.name for p in (root / "1.2" / "1.2.3").iterdir()) == ["1.2.3.1.dcm", "1.2.3.2.dcm"]


def test_a_c_store_into_a_lost_spool_root_fails_with_a701_and_indexes_nothing(tmp_path):
    from node.db import create_engine_for, init_schema
    from node.index import Index
    from node.ingest import Ingestor, Origin
    from tests.ctgen import write_ct_series
    from tests.dicomfiles import dataset_bytes

    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    root = tmp_path / "data" / "spool"
    ingestor = Ingestor(Spool(root), Index(engine))
    made = write_ct_series(tmp_path / "ct", size=16, slices=2, seed=5)
    ingestor.accept(dataset_bytes(made.paths[0]), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    os.rename(root, tmp_path / "volume")
    root.mkdir()
    with pytest.raises(ReceiveError) as err:
        ingestor.accept(dataset_bytes(made.paths[1]), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    assert err.value.status == StoreStatus.OUT_OF_RESOURCES_STORE
    assert len(Index(engine).list_instances(made.series_uid)) == 1 and list(root.rglob("*.dcm")) == []
    engine.dispose()


class FakeStat:
    """``os.stat`` of the spool root and its parent as set by the test: (st_dev, st_ino) per path; counts calls."""

    def __init__(self, ids: dict[Path, tuple[int, int]]) -> None:
        self.ids, self.calls = ids, 0

    def __call__(self, path: Path) -> os.stat_result:
        self.calls += 1
        dev, ino = self.ids[Path(path)]
        return os.stat_result((0o40755, ino, dev, 2, 0, 0, 0, 0, 0, 0))


def test_a_mount_point_root_may_come_back_under_a_new_device_and_checks_are_cached(tmp_path):
    root = tmp_path / "spool"
    stat = FakeStat({root: (50, 1), root.parent: (10, 7)})  # a volume mounted on the root
    clock = FakeClock(100.0)
    spool = Spool(root, stat=stat, clock=clock)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"a"])  # a new series folder: checked
    checked = stat.calls
    for n in range(2, 50):  # into a folder already made: at most once per ROOT_CHECK_SECONDS
        spool.write("1.2", "1.2.3", f"1.2.3.{n}", [b"a"])
    assert stat.calls == checked
    stat.ids[root] = (10, 4242)  # unmounted: the bare mount point on the parent's file system
    clock.advance(ROOT_CHECK_SECONDS)
    with pytest.raises(StoreFailedError):
        spool.write("1.2", "1.2.3", "1.2.3.99", [b"a"])
    with pytest.raises(StoreFailedError):  # a new series folder is checked at once, whatever the clock
        spool.write("1.2", "1.2.4", "1.2.4.1", [b"a"])
    stat.ids[root] = (51, 1)  # mounted again: a new device number, the same root inode on a mount point
    assert spool.root_problem() is None
    spool.write("1.2", "1.2.4", "1.2.4.1", [b"a"])
    stat.ids[root] = (52, 2)  # another file system mounted there
    assert "no longer the file system" in (spool.root_problem() or "")


def test_readyz_is_not_ready_while_the_spool_root_is_lost(tmp_path):
    from node.config import load_config
    from node.service import Service

    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\n[worker]\nenabled = false\n')
    service = Service(load_config(path, environ={}))
    root = service.config.node.spool_dir
    try:
        with TestClient(service.http._app, base_url="http://127.0.0.1") as client:
            assert client.get("/readyz").json()["checks"]["spool"] == "ok"
            os.rename(root, tmp_path / "volume")
            root.mkdir()
            answer = client.get("/readyz")
            assert answer.status_code == 503
            assert "is no longer the file system it started on" in answer.json()["checks"]["spool"]
            root.rmdir()
            os.rename(tmp_path / "volume", root)
            assert client.get("/readyz").status_code == 200
    finally:
        service.engine.dispose()
