"""Sequences in received data sets (node.ingestscan): stepped through in bounded memory, whatever their size, length
encoding or depth, every VR inside checked, malformed structure refused with 0xC000 — through `Ingestor.accept`,
the path both front doors take."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from node.db import create_engine_for, init_schema
from node.errors import InvalidDatasetError, StoreStatus
from node.index import Index
from node.ingest import Ingestor, Origin
from node.ingestscan import MAX_DEPTH
from node.spool import Spool
from tests.ctgen import write_ct_series

ORIGIN = Origin(calling_ae="SEQUENCES", association_id="a-1")
MARKER = "MARKER-VALUE"
ITEMS = 5_000  # a value to find a planted element's header by


@pytest.fixture
def ingestor(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    yield Ingestor(Spool(tmp_path / "spool"), Index(engine))
    engine.dispose()


@pytest.fixture
def ct(tmp_path) -> Dataset:
    return pydicom.dcmread(write_ct_series(tmp_path / "in", slices=1, size=16, seed=5).paths[0])


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def item(*elements: tuple[int, str, object], undefined: bool = False) -> Dataset:
    ds = Dataset()
    for tag, vr, value in elements:
        ds.add_new(tag, vr, value)
    ds.is_undefined_length_sequence_item = undefined
    return ds


def with_sequence(ds: Dataset, items: list[Dataset], *, undefined: bool, tag: int = 0x00400275) -> Dataset:
    """``ds`` with a sequence (Request Attributes Sequence by default) of ``items``, placed before Pixel Data."""
    ds.add_new(tag, "SQ", Sequence(items))
    ds[tag].is_undefined_length = undefined
    return ds


def flip_marker_vr(data: bytes) -> bytes:
    """The planted LO element holding `MARKER` with its VR turned into "RH" (no such VR): a bit flipped in transit."""
    header = b"\x09\x00\x10\x10LO"
    assert data.count(header) == 1
    return data.replace(header, b"\x09\x00\x10\x10RH")


def marker() -> tuple[int, str, object]:
    return 0x00091010, "LO", MARKER


def nested(depth: int, leaf: Dataset, *, undefined: bool) -> Dataset:
    """``leaf`` inside ``depth`` levels of items of a private sequence (0009,1020)."""
    current = leaf
    for _ in range(depth):
        outer = item((0x00090010, "LO", "NODE TEST"), undefined=undefined)
        outer.add_new(0x00091020, "SQ", Sequence([current]))
        outer[0x00091020].is_undefined_length = undefined
        current = outer
    return current


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-length", "defined-length"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_sequence_of_many_items_is_stepped_through_in_little_memory(ingestor, ct, undefined, ts):
    """pydicom reads a sequence whole into objects: `ITEMS` small items (~0.2 MB encoded) took 10 MB here (14 KB
    now), a 14 MiB data set of such items 680 MB and 28 s, per association (a 1 GiB one would take tens of GB)."""
    items = [item((0x00091001, "US", i % 7), undefined=undefined) for i in range(ITEMS)]
    for it in items:
        it.add_new(0x00090010, "LO", "NODE TEST")
    data = encoded(with_sequence(ct, items, undefined=undefined), implicit=ts.is_implicit_VR)
    del items
    tracemalloc.start()
    try:
        rec = ingestor.accept(data, ts, ORIGIN).record
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"the parse took {peak >> 10} KiB for {len(data) >> 10} KiB"
    assert len(pydicom.dcmread(rec.path).RequestAttributesSequence) == ITEMS  # stored as sent


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-length", "defined-length"])
def test_a_bad_vr_deep_inside_a_large_sequence_is_c000(ingestor, ct, undefined):
    """A sequence over 1 MiB (here: an item holding a 1.5 MiB value) used to be seeked past unchecked when of
    defined length; now every element at every depth is checked, without reading the large value."""
    big = item((0x00090010, "LO", "NODE TEST"), (0x00091030, "OB", bytes(3 << 19)), undefined=undefined)
    deep = nested(5, item((0x00090010, "LO", "NODE TEST"), marker(), undefined=undefined), undefined=undefined)
    data = encoded(with_sequence(ct, [big, deep], undefined=undefined))
    ingestor.accept(data, ExplicitVRLittleEndian, ORIGIN)  # well-formed: stored
    with pytest.raises(InvalidDatasetError, match="no valid VR") as err:
        ingestor.accept(flip_marker_vr(data), ExplicitVRLittleEndian, ORIGIN)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-length", "defined-length"])
def test_sequences_nested_past_the_limit_are_c000(ingestor, ct, undefined):
    ok = encoded(with_sequence(ct.copy(), [nested(MAX_DEPTH - 1, item(marker()), undefined=undefined)],
                               undefined=undefined))
    ingestor.accept(ok, ExplicitVRLittleEndian, ORIGIN)
    ct.SOPInstanceUID = generate_uid()
    deep = encoded(with_sequence(ct, [nested(MAX_DEPTH + 1, item(marker()), undefined=undefined)],
                                 undefined=undefined))
    with pytest.raises(InvalidDatasetError, match="nested deeper"):
        ingestor.accept(deep, ExplicitVRLittleEndian, ORIGIN)


def _item_header_offset(data: bytes) -> int:
    """Where the first item of the planted sequence (0040,0275) starts."""
    return data.index(b"\x40\x00\x75\x02SQ\x00\x00") + 12


@pytest.mark.parametrize("damage", ["item-past-sequence", "not-an-item", "no-sequence-delimiter"])
def test_malformed_sequence_structure_is_c000(ingestor, ct, damage):
    undefined = damage == "no-sequence-delimiter"
    data = bytearray(encoded(with_sequence(ct, [item(marker())], undefined=undefined)))
    at = _item_header_offset(bytes(data))
    if damage == "item-past-sequence":  # the item claims 16 bytes more than its (defined-length) sequence holds
        length = int.from_bytes(data[at + 4:at + 8], "little")
        data[at + 4:at + 8] = (length + 16).to_bytes(4, "little")
    elif damage == "not-an-item":
        data[at:at + 4] = b"\x09\x00\x10\x10"
    else:  # the undefined-length sequence's delimiter turned into another item header: runs into the pixel data
        end = data.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", at)
        data[end:end + 8] = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    with pytest.raises(InvalidDatasetError) as err:
        ingestor.accept(bytes(data), ExplicitVRLittleEndian, ORIGIN)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND


def test_encapsulated_pixel_data_inside_an_item_is_not_taken_for_a_sequence(ingestor, tmp_path):
    """An Icon Image Sequence may hold encapsulated (undefined-length, itemised) Pixel Data: not a sequence."""
    path = pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    source = pydicom.dcmread(path)
    icon = item((0x00280010, "US", source.Rows), (0x00280011, "US", source.Columns), undefined=True)
    icon.add_new(0x7FE00010, "OB", source.PixelData)
    icon[0x7FE00010].is_undefined_length = True
    with_sequence(source, [icon], undefined=True, tag=0x00880200)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, source)
    rec = ingestor.accept(fp.getvalue(), str(source.file_meta.TransferSyntaxUID), ORIGIN).record
    assert Path(rec.path).exists() and pydicom.dcmread(rec.path).IconImageSequence[0].Rows == source.Rows


def _implicit_item(length: int) -> bytes:
    """One undefined-length item holding a private element of ``length`` bytes, in Implicit VR Little Endian."""
    return (struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HHL", 0x0029, 0x1008, length)
            + b"A" * length + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))


@pytest.mark.parametrize("length", [20, 70, 330])
def test_a_un_sequence_of_undefined_length_holds_implicit_vr_items(ingestor, ct, length):
    """PS3.5 6.2.2: a private sequence relayed from Implicit to Explicit VR becomes UN of undefined length whose items
    stay Implicit VR — routine from PACS and routers. Read as Explicit VR, an element whose length bytes look like
    letters (70 = 'F\\0', 330 = 'J\\1') was refused as having no VR (review of this walker)."""
    ct.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ct[0x00291020] = DataElement(0x00291020, "UN", _implicit_item(length), is_undefined_length=True)
    ingestor.accept(encoded(ct), ExplicitVRLittleEndian, ORIGIN)


def test_a_defined_length_sequence_may_end_an_undefined_length_item(ingestor, ct):
    """PS3.5 7.5 lets the length forms mix: the walker read the outer item's delimiter as running past the inner
    item's end and refused the data set."""
    code = item((0x00080100, "SH", "T-D1100"), (0x00080102, "SH", "SRT"))
    outer = item((0x00080100, "SH", "T-D1100"), undefined=True)
    outer.add_new(0x00082228, "SQ", Sequence([code]))  # defined length, its item too: the last element of ``outer``
    ingestor.accept(encoded(with_sequence(ct, [outer], undefined=True, tag=0x00082218)), ExplicitVRLittleEndian,
                    ORIGIN)


@pytest.mark.parametrize("length", [0x4F42, 0x4E55])
def test_an_implicit_vr_element_after_a_sequence_is_not_taken_for_explicit_vr(ingestor, ct, length):
    """pydicom guesses the VR mode from the first element it reads; asked again after each sequence, it took an
    Implicit VR element whose length bytes read as letters ('BO', 'UN') for Explicit VR and misread the rest."""
    with_sequence(ct, [item(marker(), undefined=True)], undefined=True, tag=0x00081140)
    ct.add_new(0x00082111, "ST", "x" * length)  # Derivation Description, right after the sequence
    rec = ingestor.accept(encoded(ct, implicit=True), ImplicitVRLittleEndian, ORIGIN).record
    assert rec.series_uid == ct.SeriesInstanceUID
