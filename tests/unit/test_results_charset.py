"""Results for series sent in every character set DICOM's examples use (node.results.attributes.charset_repair).

The Specific Character Set and the Patient's Name are taken, as raw bytes, from pydicom's character-set sample
files (the examples of DICOM PS3.5 Annexes H-K and others; not made here) and put on a CT series, as a sender in
that country would send them. Every result (SR, SEG, key-images KOS, the "not processed" SR) must build, read back
under strict validation with the same name, and say a character set highdicom and dciodvfy take. Before the
repair, the usual Japanese ``\\ISO 2022 IR 87`` and Korean ``\\ISO 2022 IR 149`` failed every result of the series.
"""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files
from pydicom.valuerep import PersonName

from node.results import AlgorithmIdentity, SkipReason, build_results, build_skipped_sr
from node.results.attributes import UTF8, charset_repair
from tests.unit.results_support import cached_series, dciodvfy_errors, read_back_strictly
from tests.unit.test_results import needs_dciodvfy  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="charset-model", version="0.0.1")
SAMPLES = sorted(
    Path(p).name for p in get_charset_files("chr*.dcm") if "PatientName" in pydicom.dcmread(p, stop_before_pixels=True)
)


def _sample(name: str) -> Dataset:
    (path,) = get_charset_files(name)
    return pydicom.dcmread(path, stop_before_pixels=True)


def _sent_in(name: str) -> tuple[list[Dataset], str]:
    """The CT series carrying the sample's character set and name, written and read back as the node reads what it
    received; and that name decoded."""
    sample = _sample(name)
    sources = []
    for ds in copy.deepcopy(cached_series()[0]):
        ds.SpecificCharacterSet = sample.SpecificCharacterSet
        ds.PatientName = sample.PatientName  # keeps the sample's own bytes: written in the same set
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        sources.append(pydicom.dcmread(buffer))  # read as the node reads its spool: decoded in the sent set
    return sources, str(sample.PatientName)


def _charset(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet", [])
    return [str(v) for v in value] if not isinstance(value, str) else [value]


def test_the_samples_cover_what_highdicom_refuses() -> None:
    names = set(SAMPLES)
    assert {"chrH31.dcm", "chrI2.dcm", "chrKoreanMulti.dcm", "chrX1.dcm", "chrX2.dcm", "chrFren.dcm"} <= names
    assert len(names) >= 14


@pytest.mark.parametrize("name", SAMPLES)
def test_every_result_builds_and_keeps_the_name(name: str) -> None:
    sources, patient_name = _sent_in(name)
    results = build_results(sources, cached_series()[1], ALGORITHM)
    assert results.seg is not None and results.key_images is not None
    skipped = build_skipped_sr(sources, SkipReason.NOT_CT, "detail", ALGORITHM)
    for built in (results.sr, results.seg, results.key_images, skipped):
        back = read_back_strictly(built)
        assert str(back.PatientName) == patient_name
        assert _charset(back) in (_charset(sources[0]), [UTF8], ["ISO 2022 IR 6", *_charset(sources[0])[1:]])


def test_japanese_keeps_its_set_respelt_and_korean_becomes_utf8() -> None:
    japanese, _ = _sent_in("chrH31.dcm")  # \ISO 2022 IR 87: value 1 empty means ISO 2022 IR 6
    assert _charset(read_back_strictly(build_results(japanese, cached_series()[1], ALGORITHM).sr)) == [
        "ISO 2022 IR 6", "ISO 2022 IR 87"]
    korean, _ = _sent_in("chrI2.dcm")  # highdicom 0.28 has no ISO 2022 IR 149: decoded, written as UTF-8
    assert _charset(read_back_strictly(build_results(korean, cached_series()[1], ALGORITHM).sr)) == [UTF8]


def test_repair_leaves_what_highdicom_takes() -> None:
    sources = cached_series()[0]
    for name in ("chrX1.dcm", "chrX2.dcm", "chrFren.dcm", "chrH32.dcm", "chrJapMultiExplicitIR6.dcm"):
        assert charset_repair(_sent_in(name)[0][0]) is None, name
    assert charset_repair(sources[0]) is None  # no Specific Character Set at all
    plain = copy.deepcopy(sources[0])
    plain.SpecificCharacterSet = "ISO_IR 6"
    repair = charset_repair(plain)
    assert repair is not None and repair.values == () and not repair.transcode
    misspelt = copy.deepcopy(sources[0])
    misspelt.SpecificCharacterSet = ["ISO_IR 100", "ISO_IR 100"]  # seen on the wire; not a valid multi-value
    repair = charset_repair(misspelt)
    assert repair is not None and repair.values == (UTF8,) and repair.transcode


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("name", ["chrH31.dcm", "chrI2.dcm"])
def test_dciodvfy_accepts_japanese_and_korean_results(name: str, tmp_path: Path) -> None:
    sources, _ = _sent_in(name)
    results = build_results(sources, cached_series()[1], ALGORITHM)
    assert results.seg is not None and results.key_images is not None
    for kind, ds in (("sr", results.sr), ("seg", results.seg), ("kos", results.key_images)):
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy_errors(path)
        assert errors == [], (kind, errors)
        assert all("99PACSAI" in w for w in warnings), (kind, warnings)


# PS3.5 Annex K's example: Wang^XiaoDong=王^小东=, each GB 2312 run after ESC $ ) A (ISO 2022 IR 58 in G1)
IR58_NAME = b"Wang^XiaoDong=\x1b$)A\xcd\xf5^\x1b$)A\xd0\xa1\xb6\xab="


def _raw_sent(charset: str | list[str], name: bytes, *, touched: bool) -> list[Dataset]:
    """The CT series with ``name``'s exact bytes as Patient's and Referring Physician's Name in ``charset``, read
    back from files; ``touched``: the names already decoded (by pydicom) before the builders see them."""
    sources = []
    for ds in copy.deepcopy(cached_series()[0]):
        ds.SpecificCharacterSet = charset
        ds.add_new(0x00100010, "PN", name)  # bytes: written as they are
        ds.add_new(0x00080090, "PN", name)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        sources.append(pydicom.dcmread(buffer))
        if touched:
            _ = sources[-1].PatientName, sources[-1].ReferringPhysicianName
    return sources


def _built(sources: list[Dataset]) -> dict[str, Dataset]:
    results = build_results(sources, cached_series()[1], ALGORITHM)
    assert results.seg is not None and results.key_images is not None
    return {"sr": results.sr, "seg": results.seg, "kos": results.key_images,
            "skipped": build_skipped_sr(sources, SkipReason.NOT_CT, "detail", ALGORITHM)}


def _written(ds: Dataset, tag: int) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    element = pydicom.dcmread(buffer).get_item(tag)
    assert element is not None
    return bytes(element.value)


@pytest.mark.parametrize("touched", [False, True])
def test_iso_2022_ir_58_loses_its_escape_sequences_in_utf8(touched: bool) -> None:
    expected = PersonName("Wang^XiaoDong=王^小东=")  # the trailing empty component group is dropped (PS3.5 6.2.1.1)
    sources = _raw_sent(["", "ISO 2022 IR 58"], IR58_NAME, touched=touched)
    for kind, built in _built(sources).items():
        back = read_back_strictly(built)
        assert _charset(back) == [UTF8], kind
        assert str(back.PatientName) == str(expected) == "Wang^XiaoDong=王^小东", kind
        assert back.PatientName.components == ("Wang^XiaoDong", "王^小东"), kind
        assert str(back.ReferringPhysicianName) == str(expected), kind
        for tag in (0x00100010, 0x00080090):
            assert b"\x1b" not in _written(built, tag), (kind, tag)
    assert _charset(sources[0]) == ["", "ISO 2022 IR 58"]  # the sources keep their own set


def test_utf8_text_never_holds_an_escape() -> None:
    """A value that still holds ESC once decoded is malformed: emptied (Type 2), never written as UTF-8."""
    escaped = b"Wang^XiaoDong=\x1b$)A\xe7\x8e\x8b "  # UTF-8 with a GB 2312 designation left in: no set has it
    for kind, built in _built(_raw_sent("ISO_IR 192", escaped, touched=False)).items():
        back = read_back_strictly(built)
        assert _charset(back) == [UTF8], kind
        assert str(back.PatientName) == "" and str(back.ReferringPhysicianName) == "", kind
        assert b"\x1b" not in _written(built, 0x00100010), kind
