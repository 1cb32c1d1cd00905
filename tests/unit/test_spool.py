"""Spool: atomic durable writes at UID-only paths; bad UIDs and disk errors map to DIMSE statuses; writes are refused
(0xA701) while the root is not the spool it started on (its volume unmounted, another volume mounted there), and
resume when it is — told by the root's marker, not device or inode numbers. Volumes are played with real folders
(moved away, copied back, emptied), so nothing needs root or a mount."""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import pytest
from structlog.testing import capture_logs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

from node.errors import InvalidUIDError, ReceiveError, SpoolFullError, StoreFailedError, StoreStatus
from node.spool import MARKER, ROOT_CHECK_SECONDS, Spool, read_marker
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


# -- the spool root is the spool it started on (a volume unmounted under the node, or another one mounted) -----------
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
            assert "is no longer the spool it started on" in str(err.value)
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


def dcm_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.dcm"))


def test_a_volume_back_under_new_device_and_inode_numbers_is_the_same_spool(tmp_path):
    """Defect: with the volume mounted at data_dir and the spool a folder on it (a Kubernetes PVC), a volume that came
    back under a new device number (re-attached block device, NFS remount) stayed refused until restart. Played with
    a copy: the same files, the same marker, every folder a new inode."""
    data = tmp_path / "data"
    root = data / "spool"
    spool = Spool(root)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"first"])
    os.rename(data, tmp_path / "volume")  # the volume goes away...
    data.mkdir()  # ...leaving its bare mount point
    with pytest.raises(StoreFailedError):
        spool.write("1.2", "1.2.3", "1.2.3.2", [b"lost"])
    data.rmdir()
    shutil.copytree(tmp_path / "volume", data, symlinks=True)  # back: new device, new inodes, the same content
    assert os.stat(root).st_ino != os.stat(tmp_path / "volume" / "spool").st_ino
    with capture_logs() as logs:
        spool.write("1.2", "1.2.3", "1.2.3.2", [b"back"])
    assert [e["event"] for e in logs] == ["spool_root_back"]
    assert dcm_names(root) == ["1.2.3.1.dcm", "1.2.3.2.dcm"]


def test_another_volume_in_the_spools_place_is_refused_though_its_root_looks_the_same(tmp_path):
    """Defect: with the root a mount point, any volume mounted there passed (every ext4 root is inode 2, and a
    freed device number is handed out again), and writes went on onto it. Played with the very same folder emptied:
    the same device and inode, none of the spool's content."""
    root, volume = tmp_path / "spool", tmp_path / "volume"
    spool = Spool(root)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"first"])
    volume.mkdir()
    for child in root.iterdir():  # volume A away, an empty volume B in its place: the root itself stays
        os.rename(child, volume / child.name)
    with capture_logs() as logs, pytest.raises(StoreFailedError) as err:
        spool.write("1.2", "1.2.3", "1.2.3.2", [b"on B"])
    assert err.value.status == StoreStatus.OUT_OF_RESOURCES_STORE and f"has no {MARKER}" in str(err.value)
    assert [e["event"] for e in logs] == ["spool_root_lost"] and list(root.iterdir()) == []
    os.symlink("f" * 32, root / MARKER)  # another node's spool volume mounted there by mistake
    with pytest.raises(StoreFailedError) as err:
        spool.write("1.2", "1.2.4", "1.2.4.1", [b"on B"])
    assert "'ffffffffffffffffffffffffffffffff', not" in str(err.value) and dcm_names(root) == []
    os.unlink(root / MARKER)
    for child in volume.iterdir():  # volume A back
        os.rename(child, root / child.name)
    spool.write("1.2", "1.2.3", "1.2.3.2", [b"back"])
    assert dcm_names(root) == ["1.2.3.1.dcm", "1.2.3.2.dcm"]


def test_a_spool_from_before_markers_is_marked_at_start_and_every_node_on_it_reads_the_same_id(tmp_path, monkeypatch):
    root = tmp_path / "spool"
    (root / "1.2" / "1.2.3").mkdir(parents=True)
    (root / "1.2" / "1.2.3" / "1.2.3.1.dcm").write_bytes(b"old")  # received before this version: no marker
    first = Spool(root)
    marker = read_marker(root)
    assert marker and len(marker) == 32 and (root / MARKER).is_symlink()
    assert not (root / MARKER).is_file()  # a dangling link: folder walks that keep files (DICOM readers) skip it
    assert (root / "1.2" / "1.2.3" / "1.2.3.1.dcm").read_bytes() == b"old"
    assert read_marker(Spool(root).root) == marker  # another process, another listener on the shared root
    # Two listeners starting together: the other one links its id between our look and our link; its id wins.
    other = tmp_path / "other"
    real_symlink = os.symlink

    def late(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_symlink("e" * 32, dst)
        return real_symlink(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", late)
    racer = Spool(other)
    monkeypatch.undo()
    assert read_marker(other) == "e" * 32 and racer.root_problem() is None
    racer.write("1.2", "1.2.3", "1.2.3.1", [b"a"])
    first.write("1.2", "1.2.3", "1.2.3.2", [b"a"])


def test_without_symbolic_links_a_file_holds_the_id(tmp_path, monkeypatch):
    root = tmp_path / "spool"

    def unsupported(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EPERM, "Operation not permitted")  # e.g. an SMB share without mfsymlinks

    monkeypatch.setattr(os, "symlink", unsupported)
    spool = Spool(root)
    assert (root / MARKER).is_file() and (root / MARKER).read_text().strip() == read_marker(root)
    assert read_marker(Spool(root).root) == read_marker(root)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"a"])
    os.rename(root / MARKER, tmp_path / "kept")
    assert "has no" in (spool.root_problem() or "")
    os.rename(tmp_path / "kept", root / MARKER)
    assert spool.root_problem() is None


def test_a_root_that_cannot_be_marked_at_start_is_refused_until_it_can(tmp_path, monkeypatch):
    root = tmp_path / "spool"

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "symlink", refused)
    with capture_logs() as logs:
        spool = Spool(root)
    assert [e["event"] for e in logs] == ["spool_root_lost"] and "cannot be read or marked" in logs[0]["problem"]
    with pytest.raises(StoreFailedError):
        spool.write("1.2", "1.2.3", "1.2.3.1", [b"a"])
    monkeypatch.undo()
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"a"])  # marked now: from here on this is the spool
    assert read_marker(root) and dcm_names(root) == ["1.2.3.1.dcm"]


def test_checks_are_cached_but_a_new_series_folder_is_checked_at_once(tmp_path):
    root = tmp_path / "spool"
    clock = FakeClock(100.0)
    spool = Spool(root, clock=clock)
    spool.write("1.2", "1.2.3", "1.2.3.1", [b"a"])
    os.rename(root / MARKER, tmp_path / "kept")  # the marker gone (as on a bare mount point)
    for n in range(2, 20):  # into a folder already made: checked at most once per ROOT_CHECK_SECONDS
        spool.write("1.2", "1.2.3", f"1.2.3.{n}", [b"a"])
    with pytest.raises(StoreFailedError):  # a new series folder is checked at once, whatever the clock
        spool.write("1.2", "1.2.4", "1.2.4.1", [b"a"])
    os.rename(tmp_path / "kept", root / MARKER)
    spool.write("1.2", "1.2.4", "1.2.4.1", [b"a"])  # checked again (the last check failed): fine
    os.rename(root / MARKER, tmp_path / "kept")
    spool.write("1.2", "1.2.4", "1.2.4.2", [b"a"])  # within the second
    clock.advance(ROOT_CHECK_SECONDS)
    with pytest.raises(StoreFailedError):
        spool.write("1.2", "1.2.4", "1.2.4.3", [b"a"])


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
            assert "is no longer the spool it started on" in answer.json()["checks"]["spool"]
            root.rmdir()
            os.rename(tmp_path / "volume", root)
            assert client.get("/readyz").status_code == 200
    finally:
        service.engine.dispose()


def test_a_restart_before_the_spool_volume_is_mounted_refuses_writes_until_it_is(tmp_path):
    """Defect: a node (re)started while its spool volume was not mounted yet (a reboot, a mount unit ordered after
    the node) found no marker on the bare mount point, marked it as a new spool and acknowledged C-STOREs into it;
    once the volume was mounted those files were hidden under it, and the index rows of the files on the volume
    named nothing readable meanwhile. Now a root without a marker is not marked while the index holds files in it
    and none of them is there: writes get 0xA701, /readyz says why, and both recover once the volume is back."""
    from node.config import load_config
    from node.ingest import Origin
    from node.service import Service
    from tests.ctgen import write_ct_series
    from tests.dicomfiles import dataset_bytes

    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\n[worker]\nenabled = false\n')
    made = write_ct_series(tmp_path / "ct", size=16, slices=3, seed=6)
    first = Service(load_config(path, environ={}))
    root = first.config.node.spool_dir
    first.ingestor.accept(dataset_bytes(made.paths[0]), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    first.engine.dispose()
    os.rename(root, tmp_path / "volume")  # the node stopped, the volume not mounted at the next start...
    root.mkdir()  # ...its bare mount point in its place

    service = Service(load_config(path, environ={}))
    try:
        with TestClient(service.http._app, base_url="http://127.0.0.1") as client:
            answer = client.get("/readyz")
            assert answer.status_code == 503
            assert f"has no {MARKER} and none of 1 files the index holds" in answer.json()["checks"]["spool"]
            with pytest.raises(StoreFailedError) as err:
                service.ingestor.accept(dataset_bytes(made.paths[1]), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
            assert err.value.status == StoreStatus.OUT_OF_RESOURCES_STORE
            assert list(root.iterdir()) == []  # nothing written, no marker made on the bare mount point
            root.rmdir()
            os.rename(tmp_path / "volume", root)  # the volume mounted: no restart needed
            assert client.get("/readyz").status_code == 200
            service.ingestor.accept(dataset_bytes(made.paths[1]), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
            assert dcm_names(root) == sorted(f"{uid}.dcm" for uid in made.sop_uids[:2])
    finally:
        service.engine.dispose()


def test_a_new_spool_and_one_whose_indexed_files_are_there_are_marked_at_start(tmp_path):
    from node.config import load_config
    from node.ingest import Origin
    from node.service import Service
    from tests.ctgen import write_ct_series
    from tests.dicomfiles import dataset_bytes

    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\n[worker]\nenabled = false\n')
    made = write_ct_series(tmp_path / "ct", size=16, slices=2, seed=7)
    first = Service(load_config(path, environ={}))  # no rows: marked
    root = first.config.node.spool_dir
    assert read_marker(root) is not None
    first.ingestor.accept(dataset_bytes(made.paths[0]), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    first.engine.dispose()
    (root / MARKER).unlink()  # a spool from before markers: rows, and their files there
    again = Service(load_config(path, environ={}))
    try:
        assert again.spool.root_problem() is None and read_marker(root) is not None
        again.ingestor.accept(dataset_bytes(made.paths[1]), "1.2.840.10008.1.2.1", Origin("CT1", "a2"))
    finally:
        again.engine.dispose()


def test_the_index_names_files_of_this_spool_only(tmp_path):
    """`Index.sample_files`: rows of this spool id (paths relative to the root), or without a spool id the rows whose
    absolute path lies under the root — not another host's spool, not a folder whose name merely starts the same."""
    from node.db import create_engine_for, init_schema
    from node.index import Index, InstanceRecord

    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    index = Index(engine)

    def row(n: int, path: str, spool_id: str | None) -> InstanceRecord:
        return InstanceRecord(sop_uid=f"1.2.3.{n}", series_uid=f"1.2.{n}", study_uid="1.2", sop_class_uid="1.2.840",
                              transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=1, sha256="0" * 64,
                              spool_id=spool_id)

    root = tmp_path / "spool"
    index.record_instances([row(1, "1.2/1.2.1/1.2.3.1.dcm", "a"), row(2, "1.2/1.2.2/1.2.3.2.dcm", "b"),
                            row(3, f"{root}/1.2/1.2.3/1.2.3.3.dcm", None),
                            row(4, f"{root}-old/1.2/1.2.4/1.2.3.4.dcm", None)])
    assert index.sample_files(root, "a") == [root / "1.2/1.2.1/1.2.3.1.dcm"]
    assert index.sample_files(root, None) == [root / "1.2/1.2.3/1.2.3.3.dcm"]
    assert index.sample_files(tmp_path / "elsewhere", None) == []
    engine.dispose()
