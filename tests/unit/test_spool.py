"""Spool: atomic durable writes at UID-only paths; bad UIDs and disk errors map to DIMSE statuses."""

from __future__ import annotations

import errno
import os

import pytest

from node.errors import InvalidUIDError, SpoolFullError, StoreFailedError, StoreStatus
from node.spool import Spool


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
