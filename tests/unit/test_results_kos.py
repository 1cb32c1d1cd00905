"""Tests for node.results.kos: the IOCM rejection note built from a real SR + SEG written out and read back."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset

from node.results import (
    AlgorithmIdentity,
    Findings,
    ResultKind,
    ResultsError,
    build_rejection_kos,
    build_results,
    result_uid,
)
from node.results import codes as result_codes
from node.results.kos import FALLBACK_DATETIME
from tests.conftest import require_tool
from tests.unit.results_support import ATTENTION, ct_sources, dciodvfy_errors, synthetic_masks, walk

ALGORITHM = AlgorithmIdentity(name="pneumonia-attn", version="0.3.1")
SITE_ROOT = "1.2.826.0.1.3680043.10.999."
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return ct_sources(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def source_series(sources: list[Dataset]) -> str:
    return str(sources[0].SeriesInstanceUID)


@pytest.fixture(scope="module")
def superseded(tmp_path_factory: pytest.TempPathFactory, sources: list[Dataset]) -> list[Dataset]:
    """Version 1's SR and SEG as the node wrote them, read back from disk."""
    lungs, lesion = synthetic_masks()
    findings = Findings(probability=0.83, threshold=0.5, attention=ATTENTION, lungs=lungs, lesion=lesion)
    v1 = build_results(sources, findings, ALGORITHM)
    assert v1.seg is not None
    out = tmp_path_factory.mktemp("v1")
    v1.sr.save_as(out / "sr.dcm", enforce_file_format=True)
    v1.seg.save_as(out / "seg.dcm", enforce_file_format=True)
    return [pydicom.dcmread(out / "sr.dcm"), pydicom.dcmread(out / "seg.dcm")]


@pytest.fixture(scope="module")
def kos(superseded: list[Dataset], source_series: str) -> Dataset:
    return build_rejection_kos(superseded, ALGORITHM, source_series_uid=source_series, series_version=2)


@pytest.fixture(scope="module")
def kos_path(tmp_path_factory: pytest.TempPathFactory, kos: Dataset) -> Path:
    path = tmp_path_factory.mktemp("kos") / "kos.dcm"
    with pytest.MonkeyPatch.context() as mp:  # written with pydicom's validation raising, as it is read below
        mp.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
        kos.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test plant malformed values without pydicom warning about them."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _build(superseded: list[Dataset], source_series: str, **kwargs: object) -> Dataset:
    options: dict = {"source_series_uid": source_series, "series_version": 2, **kwargs}
    algorithm = options.pop("algorithm", ALGORITHM)
    return build_rejection_kos(superseded, algorithm, **options)


# --- files: strict read-back, dciodvfy, dsrdump -------------------------------------------------------------


def test_rejection_note_reads_back_strictly(kos_path: Path, strict_reading: None) -> None:
    ds = pydicom.dcmread(kos_path)
    for element in ds.iterall():
        _ = element.value
    assert ds.SOPClassUID == pydicom.uid.KeyObjectSelectionDocumentStorage
    assert ds.Modality == "KO"
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    assert len(document.content.get_references()) == 2


def test_dciodvfy_reports_no_errors(kos_path: Path) -> None:
    require_tool("dciodvfy")
    errors, warnings = dciodvfy_errors(kos_path)
    assert errors == []
    assert warnings == []


def test_dsrdump_reads_the_rejection_note(kos_path: Path) -> None:
    exe = require_tool("dsrdump")
    run = subprocess.run([exe, str(kos_path)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    # DCMTK knows no TID 2010 constraints and says so; any other warning or error fails.
    noise = "W: Check for template constraints not yet supported"
    assert [ln for ln in run.stderr.splitlines() if ln.strip() and ln.strip() != noise] == []
    assert "Key Object Selection Document" in run.stdout
    assert '<CONTAINER:(,,"Rejected for Quality Reasons")' in run.stdout
    assert "<contains COMPOSITE:" in run.stdout and "<contains IMAGE:" in run.stdout


# --- what IOCM asks of the note ------------------------------------------------------------------------------


def _ref(ds: Dataset) -> tuple[str, str, str, str]:
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))


def test_references_exactly_the_superseded_instances(kos_path: Path, superseded: list[Dataset]) -> None:
    ds = pydicom.dcmread(kos_path)
    expected = {_ref(s) for s in superseded}
    evidence = {
        (
            str(study.StudyInstanceUID),
            str(series.SeriesInstanceUID),
            str(sop.ReferencedSOPInstanceUID),
            str(sop.ReferencedSOPClassUID),
        )
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == expected
    assert "PertinentOtherEvidenceSequence" not in ds
    referencing = [item for item in walk(ds) if "ReferencedSOPSequence" in item]
    in_tree = [
        (
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
            str(item.ReferencedSOPSequence[0].ReferencedSOPClassUID),
            item.ValueType,
        )
        for item in referencing
    ]
    assert sorted(in_tree) == sorted(
        (str(s.SOPInstanceUID), str(s.SOPClassUID), "IMAGE" if "Rows" in s else "COMPOSITE")
        for s in superseded
    )
    assert all(item.RelationshipType == "CONTAINS" for item in referencing)


def test_title_is_rejected_for_quality_reasons_in_tid_2010(kos_path: Path) -> None:
    ds = pydicom.dcmread(kos_path)
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    assert ds.ValueType == "CONTAINER"
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in ds.ContentSequence]
    assert "113011" not in names  # no Document Title Modifier: no CID 7011 reason fits a superseded version
    (description,) = [
        item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert "superseded by version 2" in description.TextValue


def test_note_is_in_the_study_with_the_patient_copied_and_in_its_own_series(
    kos: Dataset, superseded: list[Dataset], source_series: str
) -> None:
    for keyword in PATIENT_AND_STUDY:
        assert str(kos[keyword].value) == str(superseded[0][keyword].value), keyword
    assert kos.SeriesInstanceUID == result_uid(source_series, 2, ALGORITHM.model_key, ResultKind.KOS_SERIES)
    assert kos.SOPInstanceUID == result_uid(source_series, 2, ALGORITHM.model_key, ResultKind.KOS)
    assert kos.SeriesInstanceUID not in {s.SeriesInstanceUID for s in superseded}
    assert kos.SeriesNumber == result_codes.versioned_number(result_codes.KOS_SERIES_NUMBER, 2) == 9913
    assert kos.SeriesDescription == result_codes.KOS_SERIES_DESCRIPTION
    assert kos.Manufacturer == ALGORITHM.manufacturer
    assert kos.InstanceNumber == 1


def test_the_algorithm_is_the_device_observer(kos_path: Path) -> None:
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(kos_path))
    (observer,) = document.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == ALGORITHM.device_uid


# --- determinism, dates, UIDs ---------------------------------------------------------------------------------


def test_same_inputs_give_the_same_bytes_in_any_order(
    kos: Dataset, superseded: list[Dataset], source_series: str
) -> None:
    again = _build(superseded, source_series)
    assert _bytes(again) == _bytes(kos)
    assert _bytes(_build(list(reversed(superseded)), source_series)) == _bytes(kos)
    assert "InstanceCreationDate" not in kos and "InstanceCreationTime" not in kos
    newer = _build(superseded, source_series, series_version=3)
    assert newer.SOPInstanceUID != kos.SOPInstanceUID and newer.SeriesNumber == 9923


def test_content_datetime_comes_from_the_superseded_objects_or_the_caller(
    kos: Dataset, superseded: list[Dataset], source_series: str
) -> None:
    source_when = {(str(s.ContentDate), str(s.ContentTime)) for s in superseded}
    assert source_when == {("20260102", "030405")}
    assert {(str(kos.ContentDate), str(kos.ContentTime))} == source_when
    given = _build(superseded, source_series, content_datetime=dt.datetime(2027, 5, 6, 7, 8, 9))
    assert (str(given.ContentDate), str(given.ContentTime)) == ("20270506", "070809")
    assert str(given.SeriesDate) == "20270506"


def test_missing_or_malformed_dates_fall_back_without_failing(
    superseded: list[Dataset], source_series: str, lenient: None
) -> None:
    no_content = [copy.deepcopy(s) for s in superseded]
    for ds in no_content:
        del ds.ContentDate, ds.ContentTime
    assert str(_build(no_content, source_series).ContentDate) == str(superseded[0].StudyDate)
    malformed = [copy.deepcopy(s) for s in no_content]
    malformed[0].ContentDate, malformed[0].ContentTime = "20261345", "25x"
    malformed[1].ContentDate = "not a date"
    for ds in malformed:
        del ds.StudyDate, ds.StudyTime
    first = _build(malformed, source_series)
    assert (str(first.ContentDate), str(first.ContentTime)) == (
        FALLBACK_DATETIME.strftime("%Y%m%d"),
        FALLBACK_DATETIME.strftime("%H%M%S"),
    )
    assert _bytes(first) == _bytes(_build(malformed, source_series))


def test_a_site_uid_root_heads_every_uid_the_note_creates(
    kos: Dataset, superseded: list[Dataset], source_series: str
) -> None:
    site = dataclasses.replace(ALGORITHM, uid_root=SITE_ROOT)
    built = _build(superseded, source_series, algorithm=site)
    from_superseded = {str(elem.value) for s in superseded for elem in s.iterall() if elem.VR == "UI"}
    created = {
        elem.keyword: str(elem.value)
        for elem in built.iterall()
        if elem.VR == "UI"
        and str(elem.value) not in from_superseded
        and not str(elem.value).startswith("1.2.840.10008.")
    }
    # The device observer UID is a UIDREF content item (VR UI, keyword UID).
    (device_uid,) = [str(item.UID) for item in walk(built) if item.ValueType == "UIDREF"]
    created["DeviceObserverUID"] = device_uid
    assert {"SOPInstanceUID", "SeriesInstanceUID", "DeviceObserverUID"} <= set(created), created
    assert {k: v for k, v in created.items() if not v.startswith(SITE_ROOT)} == {}
    assert built.SOPInstanceUID == result_uid(
        source_series, 2, ALGORITHM.model_key, ResultKind.KOS, SITE_ROOT
    )
    assert built.SOPInstanceUID != kos.SOPInstanceUID


# --- refused input ----------------------------------------------------------------------------------------------


def _with(superseded: list[Dataset], index: int, **values: object) -> list[Dataset]:
    changed = [copy.copy(s) for s in superseded]
    changed[index] = copy.deepcopy(superseded[index])
    for keyword, value in values.items():
        delattr(
            changed[index], keyword
        )  # a new element takes the current validation mode; the old kept its own
        if value is not None:
            setattr(changed[index], keyword, value)
    return changed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: [], "non-empty sequence"),
        (lambda s: s[0], "non-empty sequence"),
        (lambda s: [s[0], "sr.dcm"], r"superseded\[1\] must be a pydicom Dataset"),
        (lambda s: _with(s, 1, StudyInstanceUID="1.2.3.4"), "more than one study"),
        (lambda s: _with(s, 1, SOPInstanceUID="1.2.x"), r"superseded\[1\] carries an invalid SOPInstanceUID"),
        (lambda s: _with(s, 0, SeriesInstanceUID="1." + "2" * 70), "invalid SeriesInstanceUID"),
        (lambda s: _with(s, 0, SOPClassUID=None), r"superseded\[0\] lacks SOPClassUID"),
        (lambda s: [s[0], s[0]], "same SOP instance more than once"),
    ],
)
def test_bad_superseded_lists_are_refused(
    superseded: list[Dataset],
    source_series: str,
    change: Callable[[list[Dataset]], object],
    message: str,
    lenient: None,
) -> None:
    with pytest.raises(ResultsError, match=message):
        _build(change(superseded), source_series)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"series_version": 1}, "series_version must be an int >= 2"),
        ({"series_version": 0}, "series_version"),
        ({"series_version": True}, "series_version"),
        ({"series_version": "2"}, "series_version"),
        ({"source_series_uid": "not a uid"}, "source_series_uid"),
        ({"content_datetime": "20260102"}, "content_datetime"),
        ({"algorithm": "pneumonia-attn"}, "algorithm must be an AlgorithmIdentity"),
    ],
)
def test_bad_arguments_are_refused(
    superseded: list[Dataset], source_series: str, options: dict, message: str
) -> None:
    with pytest.raises(ResultsError, match=message):
        _build(superseded, source_series, **options)


def test_a_note_cannot_reject_objects_in_its_own_series(
    kos: Dataset, superseded: list[Dataset], source_series: str
) -> None:
    with pytest.raises(ResultsError, match="own series"):
        _build([kos], source_series)


def test_library_errors_are_converted_without_patient_data(
    superseded: list[Dataset], source_series: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: highdicom refusing the document, with a patient value in its message."""
    patient_id = str(superseded[0].PatientID)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError(f"'{patient_id}' is not a valid value")

    monkeypatch.setattr(hd.ko, "KeyObjectSelectionDocument", refuse)
    with pytest.raises(ResultsError, match="building the rejection note failed") as caught:
        _build(superseded, source_series)
    assert isinstance(caught.value.__cause__, ValueError)
    assert patient_id in str(caught.value.__cause__) and patient_id not in str(caught.value)


# --- the key-images note sent with a verdict ------------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict(sources: list[Dataset]):
    lungs, lesion = synthetic_masks()
    findings = Findings(probability=0.83, threshold=0.5, attention=ATTENTION, lungs=lungs, lesion=lesion)
    return findings, build_results(sources, findings, ALGORITHM)


def _references(kos: Dataset) -> list[str]:
    return [sop.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
            for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence]


def test_key_images_name_the_top_attention_slices_and_the_sr(verdict, sources: list[Dataset], tmp_path: Path,
                                                              strict_reading: None) -> None:
    findings, built = verdict
    kos = built.key_images
    assert kos is not None
    path = tmp_path / "key.dcm"
    kos.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    for element in ds.iterall():
        _ = element.value
    assert (ds.Modality, ds.SOPClassUID) == ("KO", pydicom.uid.KeyObjectSelectionDocumentStorage)
    assert ds.ConceptNameCodeSequence[0].CodeValue == result_codes.FOR_REFERRING_PROVIDER.value  # 113002
    key = findings.key_slices(3)
    expected = {str(sources[i].SOPInstanceUID) for i in key} | {str(built.sr.SOPInstanceUID)}
    assert set(_references(ds)) == expected
    # in the content tree too: IMAGE items for the slices (highest attention first), COMPOSITE for the SR
    items = [i for i in ds.ContentSequence if i.ValueType in ("IMAGE", "COMPOSITE")]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"] == [
        str(sources[i].SOPInstanceUID) for i in key]
    assert [i.ValueType for i in items].count("COMPOSITE") == 1
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == sources[0].PatientID
    assert ds.SeriesInstanceUID not in {sources[0].SeriesInstanceUID, built.sr.SeriesInstanceUID}
    text = " ".join(str(i.TextValue) for i in walk(ds) if i.get("ValueType") == "TEXT")
    assert "Not for clinical use" in text


def test_the_sr_names_its_key_images_note(verdict) -> None:
    _, built = verdict
    kos, sr = built.key_images, built.sr
    assert str(kos.SOPInstanceUID) in _references(sr)  # the SR's evidence lists the note
    texts = [str(i.TextValue) for i in walk(sr) if i.get("ValueType") == "TEXT"]
    assert any(str(kos.SOPInstanceUID) in t for t in texts)
    assert "PredecessorDocumentsSequence" not in sr


def test_key_images_note_is_dciodvfy_clean_and_deterministic(verdict, sources: list[Dataset], tmp_path: Path) -> None:
    require_tool("dciodvfy")
    findings, built = verdict
    path = tmp_path / "key.dcm"
    built.key_images.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_errors(path)
    assert errors == [] and warnings == []
    again = build_results(sources, findings, ALGORITHM).key_images
    assert _bytes(again) == _bytes(built.key_images)


def test_measurement_only_findings_make_no_key_images(sources: list[Dataset]) -> None:
    lungs, lesion = synthetic_masks()
    built = build_results(sources, Findings(probability=None, threshold=None, attention=None, lungs=lungs,
                                            lesion=lesion), ALGORITHM)
    assert built.key_images is None
    texts = [str(i.TextValue) for i in walk(built.sr) if i.get("ValueType") == "TEXT"]
    assert not any("Key Object Selection" in t for t in texts)


def test_a_new_versions_sr_does_not_take_the_key_images_note_for_a_predecessor(verdict, sources: list[Dataset],
                                                                                 source_series: str) -> None:
    findings, v1 = verdict
    previous = [(str(o.StudyInstanceUID), str(o.SeriesInstanceUID), str(o.SOPInstanceUID), str(o.SOPClassUID))
                for o in (v1.sr, v1.seg, v1.key_images)]
    v2 = build_results(sources, findings, ALGORITHM, series_version=2, superseded=previous)
    predecessors = [sop.ReferencedSOPInstanceUID for study in v2.sr.PredecessorDocumentsSequence
                    for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence]
    assert predecessors == [str(v1.sr.SOPInstanceUID)]
    assert v2.key_images.SOPInstanceUID != v1.key_images.SOPInstanceUID
    assert v2.key_images.SeriesNumber == v1.key_images.SeriesNumber + 10
