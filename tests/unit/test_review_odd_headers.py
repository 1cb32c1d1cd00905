"""Review of the results (SR, SEG, key-images KOS, "not processed" SR) and the classifier's clinical inputs for
headers as real senders write them.

What failed before the fixes:
- a sender that writes Latin-1 text without declaring a Specific Character Set (older modalities, names filled in
  by a RIS): the results copied the 8-bit bytes under the default repertoire, and dciodvfy refused every one
  ("Character invalid for character repertoire"); they now say ISO_IR 100, the set the node read the text in;
- PatientAge written without its zero padding or in lower case ("45Y", "045y"): the gate read the age, the
  classifier did not, so an adult was judged with "age: missing" fused into the verdict.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.tag import Tag

from node.results import AlgorithmIdentity, SkipReason, build_results, build_skipped_sr
from tests.unit.results_support import cached_series, read_back_strictly, sent_as_spooled
from tests.unit.test_results import needs_dciodvfy  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="review-model", version="0.0.1")


def _every_result(sources: list[Dataset]) -> list[tuple[str, Dataset]]:
    results = build_results(sources, cached_series()[1], ALGORITHM)
    skipped = build_skipped_sr(sources, SkipReason.NOT_CT, "detail", ALGORITHM)
    assert results.seg is not None and results.key_images is not None
    return [("sr", results.sr), ("seg", results.seg), ("kos", results.key_images), ("skipped", skipped)]


def _dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path``; it echoes values as their bytes, which need not be UTF-8."""
    exe = shutil.which("dciodvfy")
    assert exe is not None
    run = subprocess.run([exe, str(path)], capture_output=True, timeout=60, check=False)
    return [ln for ln in (run.stdout + run.stderr).decode("utf-8", "replace").splitlines() if ln.startswith("Error")]


def _undeclared_latin1(ds: Dataset) -> None:
    """The German sample's name (pydicom's chrGerm.dcm, PS3.5 Annex examples) as its bytes, sent without the
    Specific Character Set that declared them; an institution name in Latin-1 too (copied as equipment)."""
    (path,) = get_charset_files("chrGerm.dcm")
    name = pydicom.dcmread(path, stop_before_pixels=True).get_item(0x00100010).value
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.add_new(0x00100010, "PN", name)
    ds.add_new(0x00080080, "LO", "Klinikum S\xfcd".encode("latin-1"))


@pytest.mark.usefixtures("needs_dciodvfy")
def test_undeclared_latin1_text_gives_valid_results_that_keep_it(tmp_path: Path) -> None:
    sources = sent_as_spooled(_undeclared_latin1)
    assert "SpecificCharacterSet" not in sources[0]
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        back = read_back_strictly(built)
        assert back.SpecificCharacterSet == "ISO_IR 100", kind
        assert str(back.PatientName) == "Äneas^Rüdiger", kind
    assert "SpecificCharacterSet" not in sources[0]  # the sources are not modified


def test_ascii_text_under_the_default_repertoire_declares_nothing() -> None:
    sources = sent_as_spooled(lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 6"))
    for kind, built in _every_result(sources):
        assert "SpecificCharacterSet" not in read_back_strictly(built), kind
    for kind, built in _every_result(list(cached_series()[0])):
        assert "SpecificCharacterSet" not in read_back_strictly(built), kind


@pytest.mark.parametrize(("sent", "years"), [
    ("045Y", 45.0), ("45Y", 45.0), ("045y", 45.0), ("45 Y", 45.0), ("540M", 45.0),
    ("45", None),  # no unit: no age (the SR says it was missing)
])
def test_the_classifier_reads_the_age_the_gate_reads(sent: str, years: float | None, tmp_path: Path) -> None:
    """The series loaded as the worker loads it (`models.preprocess.load_series`), its clinical inputs taken as the
    classifier takes them (`node.pipelines.runner.clinical_of`)."""
    from models.preprocess import load_series
    from node.gate import header_age_years
    from node.pipelines.runner import clinical_of

    def mutate(ds: Dataset) -> None:
        ds["PatientAge"] = pydicom.DataElement(0x00101010, "AS", sent, validation_mode=0)  # as sent
        ds.PatientBirthDate = ""

    paths = []
    for i, ds in enumerate(sent_as_spooled(mutate)):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    volume = load_series([str(p) for p in paths])
    assert header_age_years(volume.datasets[0]) == years
    assert volume.patient_age == years
    clinical = clinical_of(volume)
    assert clinical.value("age") == years
    assert clinical.describe("age") == ("missing" if years is None else "45 years")


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize(("thickness", "spacing"), [("0", None), ("-2.5", None), ("2.5", "-2.5"), ("0", "0")])
def test_a_zero_or_negative_slice_thickness_or_spacing_gives_a_valid_seg(
    thickness: str, spacing: str | None, tmp_path: Path
) -> None:
    """SliceThickness 0 or a negative SpacingBetweenSlices (a stack sent in descending order) in the source: the
    SEG's Pixel Measures carry the measured slice distance instead (ctgen's 2.5 mm), never the invalid value."""
    def mutate(ds: Dataset) -> None:
        ds.SliceThickness = thickness
        if spacing is not None:
            ds.SpacingBetweenSlices = spacing

    sources = sent_as_spooled(mutate)
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
    seg = read_back_strictly(build_results(sources, cached_series()[1], ALGORITHM).seg)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.5)
    assert float(measures.SliceThickness) == (float(thickness) if float(thickness) > 0 else pytest.approx(2.5))
    assert str(sources[0].SliceThickness) == thickness  # the sources are not modified


def _raw(keyword: str, vr: str, value: bytes) -> Callable[[Dataset], None]:
    tag = Tag(keyword)
    return lambda ds: ds.__setitem__(tag, RawDataElement(tag, vr, len(value), value, 0, False, True))


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize(("keyword", "vr", "value"), [
    ("PatientID", "LO", b"123\t45"), ("StudyDescription", "LO", b"CT THORAX\tLUNGE"),
    ("InstitutionName", "LO", b"KLINIK\r\nNORD"), ("StationName", "SH", b"CT\x0c1"),
])
def test_a_control_character_in_a_one_line_text_is_not_copied(
    keyword: str, vr: str, value: bytes, tmp_path: Path
) -> None:
    """SH and LO allow no control character but ESC (PS3.5 Table 6.2-1): copied as sent, the value made every
    result invalid. It is blanked (Type 2) or left out, as other malformed values are."""
    sources = sent_as_spooled(_raw(keyword, vr, value))
    assert sources[0][keyword].value == value.decode()
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        back = read_back_strictly(built)
        assert value.decode() not in [str(e.value) for e in back.iterall() if e.VR in ("SH", "LO")], kind


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("keyword", [
    "ReferencedStudySequence", "ProcedureCodeSequence", "ReferencedPatientSequence", "OtherPatientIDsSequence",
    "IssuerOfPatientIDQualifiersSequence", "AdmittingDiagnosesCodeSequence",
])
def test_an_empty_optional_sequence_is_not_copied(keyword: str, tmp_path: Path) -> None:
    """Type 3 sequences of the Patient and Study modules sent empty: if present they need an item (PS3.3), so
    copied as sent each made the results invalid. Left out; one with an item is still copied."""
    sources = sent_as_spooled(lambda ds: setattr(ds, keyword, PydicomSequence([])))
    assert keyword in sources[0] and len(sources[0][keyword].value) == 0
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        assert keyword not in read_back_strictly(built), kind


def test_a_sequence_with_an_item_is_still_copied() -> None:
    def mutate(ds: Dataset) -> None:
        item = Dataset()
        item.PatientID = "OTHER-1"
        item.IssuerOfPatientID = "HOSPITAL-B"
        item.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = PydicomSequence([item])

    back = read_back_strictly(build_results(sent_as_spooled(mutate), cached_series()[1], ALGORITHM).sr)
    assert back.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSPITAL-B"


@pytest.mark.parametrize("dates", [("SeriesDate", "ContentDate"), ("ContentDate",)])
def test_a_childs_age_is_read_from_the_birth_date_when_the_study_date_is_empty(
    dates: tuple[str, ...], tmp_path: Path
) -> None:
    """No PatientAge, a birth date, and StudyDate empty (Type 2; a scan without a worklist entry) while the series
    or image says when it was made: the age was unknown, so a 10-year-old passed the gate's adult check and was
    judged. The dates of the series, acquisition or image date the scan as well."""
    from models.preprocess import load_series
    from node.gate import check_header

    def mutate(ds: Dataset) -> None:
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, keyword, "20260102" if keyword in dates else "")
        ds.PatientBirthDate = "20151230"
        if "PatientAge" in ds:
            del ds.PatientAge

    sources = sent_as_spooled(mutate)
    refusal = check_header(sources[0])
    assert refusal is not None and refusal.reason is SkipReason.OUT_OF_SCOPE and "under 18" in refusal.detail
    assert "2015" not in refusal.detail
    paths = []
    for i, ds in enumerate(sources):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert load_series([str(p) for p in paths]).patient_age == 10.0


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize(("keyword", "vr", "value"), [
    ("PregnancyStatus", "US", b"\x00\x00"), ("SmokingStatus", "CS", b"N "), ("QualityControlSubject", "CS", b"Y "),
])
def test_a_value_outside_an_enumeration_is_not_copied(keyword: str, vr: str, value: bytes, tmp_path: Path) -> None:
    """Pregnancy Status 0 (the enumeration is 1-4), Smoking Status "N" (YES, NO, UNKNOWN): copied as sent, every
    result was invalid. Left out (Type 3); a value of the enumeration is still copied."""
    sources = sent_as_spooled(_raw(keyword, vr, value))
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        assert keyword not in read_back_strictly(built), kind
    kept = sent_as_spooled(lambda ds: setattr(ds, "PregnancyStatus", 4))
    assert read_back_strictly(build_results(kept, cached_series()[1], ALGORITHM).sr).PregnancyStatus == 4


def _one_item(keyword: str, **attributes: str) -> Callable[[Dataset], None]:
    item = Dataset()
    for name, value in attributes.items():
        setattr(item, name, value)
    return lambda ds: setattr(ds, keyword, PydicomSequence([item]))


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize(("keyword", "attributes"), [
    ("ProcedureCodeSequence", {"CodeValue": "CTCHEST", "CodeMeaning": "CT CHEST"}),  # no scheme, from a RIS
    ("ProcedureCodeSequence", {}),
    ("ReferencedStudySequence", {}),
    ("OtherPatientIDsSequence", {"IssuerOfPatientID": "HOSPITAL-B"}),  # no Patient ID, no type
])
def test_an_optional_sequence_with_an_incomplete_item_is_not_copied(
    keyword: str, attributes: dict[str, str], tmp_path: Path
) -> None:
    sources = sent_as_spooled(_one_item(keyword, **attributes))
    for kind, built in _every_result(sources):
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        assert keyword not in read_back_strictly(built), kind
    complete = _one_item("ProcedureCodeSequence", CodeValue="CTCHEST", CodingSchemeDesignator="L", CodeMeaning="CT")
    back = read_back_strictly(build_results(sent_as_spooled(complete), cached_series()[1], ALGORITHM).sr)
    assert back.ProcedureCodeSequence[0].CodingSchemeDesignator == "L"


@pytest.mark.parametrize(("text", "expected"), [
    ("Fever: No, Cough: Yes, Dyspnea: No", (0.0, 1.0, 0.0)),  # a request form's checklist, as a RIS fills it in
    ("FEVER: NEGATIVE; COUGH: POSITIVE", (0.0, 1.0, None)),
    ("fever - none. dyspnoea: no", (0.0, None, 0.0)),
    ("non-febrile, productive cough", (0.0, 1.0, None)),
    ("non-productive cough", (None, 1.0, None)),  # a dry cough is a cough
    ("dyspnoea: no change", (None, None, 1.0)),  # unchanged breathlessness is still there
    ("cough: none and fever", (1.0, 0.0, None)),  # the answer ends the negation
])
def test_request_text_answered_no_is_not_read_as_the_symptom(text: str, expected: tuple) -> None:
    """The classifier's symptom inputs from a header's request text (ReasonForStudy), read as the classifier reads
    them (`node.pipelines.runner.clinical_of` → `models.clinical.from_header`). "Fever: No" was read as fever present
    (the term was found and no negation came before it), so a checklist answered no read as every symptom present
    and the SR said so."""
    from models.clinical import from_header

    ds = Dataset()
    ds.ReasonForStudy = text
    got = from_header(ds)
    assert (got.fever, got.cough, got.dyspnoea) == expected
