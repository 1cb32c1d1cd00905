"""Ingest against hostile data sets (issue "Hostile networks"): deflate bombs inflated within a small window,
cut data sets refused with 0xC000 wherever they are cut, VR-mode mismatches refused, real encapsulated and
Deflated files from pydicom's test data still accepted."""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.db import create_engine_for, init_schema
from node.errors import InstanceTooLargeError, InvalidDatasetError, ReceiveError, StoreStatus
from node.index import Index
from node.ingest import Ingestor, Origin
from node.spool import Spool
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes

ORIGIN = Origin(calling_ae="HOSTILE", association_id="a-1")


@pytest.fixture
def ingestor(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    yield Ingestor(Spool(tmp_path / "spool"), Index(engine))
    engine.dispose()


@pytest.fixture
def ct(tmp_path) -> Path:
    return write_ct_series(tmp_path / "in", slices=1, size=16, seed=3).paths[0]


def encoded(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def spooled(ingestor: Ingestor) -> list[Path]:
    return list(ingestor.spool.root.rglob("*.dcm"))


def test_a_deflate_bomb_is_refused_with_a700_in_a_small_window_of_memory(ingestor, ct):
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of zeros: ~32 KB deflated
    bomb = deflate(encoded(ds))
    del ds
    tracemalloc.start()
    try:
        with pytest.raises(InstanceTooLargeError) as err:
            ingestor.accept(bomb, DeflatedExplicitVRLittleEndian, ORIGIN, max_inflated_bytes=16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.status == StoreStatus.OUT_OF_RESOURCES
    assert peak < 2 << 20, f"inflating took {peak >> 10} KiB"
    assert not spooled(ingestor)


def test_a_large_deflated_instance_under_the_limit_is_stored_without_inflating_it_whole(ingestor, ct):
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    data = deflate(encoded(ds))
    tracemalloc.start()
    try:
        rec = ingestor.accept(data, DeflatedExplicitVRLittleEndian, ORIGIN, max_inflated_bytes=64 << 20).record
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"inflating took {peak >> 10} KiB"
    assert pydicom.dcmread(rec.path).Rows == 4096


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_a_broken_deflate_stream_is_c000(ingestor, ct, damage):
    data = deflate(dataset_bytes(ct))
    data = data[: len(data) // 2] if damage == "cut" else b"\xff" * 64 + data
    with pytest.raises(InvalidDatasetError):
        ingestor.accept(data, DeflatedExplicitVRLittleEndian, ORIGIN)


def _element_ends(data: bytes) -> set[int]:
    """Offsets where a top-level element ends (a cut there leaves a shorter but well-formed data set)."""
    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return {0} | {e.value_tell + e.length for e in data_element_generator(fp, False, True)}


def test_a_data_set_cut_anywhere_inside_an_element_is_c000(ingestor, ct):
    data = dataset_bytes(ct)
    ends = _element_ends(data)
    statuses: dict[int, int] = {}
    for cut in range(1, len(data)):
        try:
            ingestor.accept(data[:cut], ExplicitVRLittleEndian, ORIGIN)
            statuses[cut] = 0
        except ReceiveError as exc:
            statuses[cut] = int(exc.status)
    inside = {cut: s for cut, s in statuses.items() if cut not in ends}
    assert set(inside.values()) == {StoreStatus.CANNOT_UNDERSTAND}, {c: hex(s) for c, s in inside.items() if s != 0xC000}
    # at an element boundary the rest is simply missing: no UID or no pixel data is 0xA900, never success
    assert set(statuses.values()) <= {StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DATASET_MISMATCH}
    assert not spooled(ingestor)


@pytest.mark.parametrize(
    "sent_implicit, context", [(True, ExplicitVRLittleEndian), (False, ImplicitVRLittleEndian)],
    ids=["implicit-on-explicit", "explicit-on-implicit"],
)
def test_a_data_set_in_the_other_vr_mode_is_c000(ingestor, ct, sent_implicit, context):
    data = encoded(pydicom.dcmread(ct), implicit=sent_implicit)
    # pydicom warns that it would switch VR mode; the node refuses instead
    with pytest.warns(UserWarning, match="VR"), pytest.raises(InvalidDatasetError, match="VR") as err:
        ingestor.accept(data, context, ORIGIN)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND
    assert not spooled(ingestor)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "image_dfl.dcm", "CT_small.dcm"]
)
def test_real_files_from_pydicom_still_pass_the_strict_parse(ingestor, name):
    path = get_testdata_file(name)
    assert path is not None
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    rec = ingestor.accept(dataset_bytes(Path(path)), str(meta.TransferSyntaxUID), ORIGIN).record
    assert rec.transfer_syntax_uid == meta.TransferSyntaxUID
