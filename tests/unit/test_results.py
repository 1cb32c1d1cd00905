"""Tests for node.results: SR/SEG built from a ctgen series, written out, read back strictly and validated."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import UID

from node.results import (
    AlgorithmIdentity,
    Findings,
    ModelNotes,
    ResultKind,
    ResultsError,
    ResultSet,
    SkipReason,
    Superseded,
    build_results,
    build_skipped_sr,
    result_uid,
)
from node.results.geometry import VoxelSize, largest_region, outline, polygon_area
from tests.conftest import require_tool
from tests.unit.results_support import (
    ATTENTION,
    SLICES,
    SPACING_MM,
    ct_sources,
    dciodvfy_errors,
    encoded_without_timestamps,
    named,
    synthetic_masks,
)

ALGORITHM = AlgorithmIdentity(name="pneumonia-attn", version="0.3.1")


@pytest.fixture
def needs_dciodvfy() -> None:
    require_tool("dciodvfy")  # skips locally, fails under CI


@pytest.fixture
def needs_dsrdump() -> None:
    require_tool("dsrdump")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return ct_sources(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def findings() -> Findings:
    lungs, lesion = synthetic_masks()
    return Findings(probability=0.83, threshold=0.5, attention=ATTENTION, lungs=lungs, lesion=lesion, notes=NOTES)


NOTES = ModelNotes(
    fusion_inputs=(("age", "63 years (from DICOM header)"), ("fever", "present (from request text in the DICOM header)")),
    missing_inputs=("sex", "cough", "dyspnoea"),
    calibration="The probability is calibrated: temperature scaling (T = 1.300) fitted on the validation split.",
    operating_point="Pneumonia reported when the probability is at or above 0.500 (Youden J on the validation set).",
    fused_evidence=(("image classifier", "probability 0.412 (calibrated, before the lesion fusion)"),
                    ("segmenter lesion evidence", "pacsnode-lung-lesion-unet 1.0.0: largest lesion probability 0.973 "
                     "in the lungs, 412 lesion pixels on 6 of 10 slices (on the 128 x 128 model grid)")),
    scope=("Validated scope: adults, non-contrast axial chest CT.", "Contrast: checked in the header only."),
)


@pytest.fixture(scope="module")
def results(sources: list[Dataset], findings: Findings) -> ResultSet:
    return build_results(sources, findings, ALGORITHM)


@pytest.fixture
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _superseded_v1(sources: list[Dataset]) -> list[Superseded]:
    series, model, study = sources[0].SeriesInstanceUID, ALGORITHM.model_key, sources[0].StudyInstanceUID
    return [
        Superseded(
            study,
            result_uid(series, 1, model, "sr-series"),
            result_uid(series, 1, model, "sr"),
            pydicom.uid.Comprehensive3DSRStorage,
        ),
        Superseded(
            study,
            result_uid(series, 1, model, "seg-series"),
            result_uid(series, 1, model, "seg"),
            pydicom.uid.SegmentationStorage,
        ),
    ]


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory, results: ResultSet, sources: list[Dataset], findings: Findings
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    assert results.seg is not None
    v2 = build_results(sources, findings, ALGORITHM, series_version=2, superseded=_superseded_v1(sources))
    clear = dataclasses.replace(findings, probability=0.1, lesion=np.zeros_like(findings.lesion))
    return {
        "sr": _write(results.sr, out / "sr.dcm"),
        "seg": _write(results.seg, out / "seg.dcm"),
        "sr-v2": _write(v2.sr, out / "sr-v2.dcm"),
        "sr-no-lesion": _write(build_results(sources, clear, ALGORITHM).sr, out / "sr-no-lesion.dcm"),
    }


def _skipped(sources: list[Dataset], reason: SkipReason) -> Dataset:
    return build_skipped_sr(sources, reason, f"test detail for {reason.name}", ALGORITHM)


# --- files: strict read-back, highdicom read-back, dciodvfy, dsrdump --------------------------------------------


def _read_strictly(path: Path) -> Dataset:
    """Read ``path`` and decode every element (values are validated as they are decoded)."""
    ds = pydicom.dcmread(path)
    for element in ds.iterall():
        _ = element.value
    return ds


def test_sr_and_seg_read_back_strictly(written: dict[str, Path], strict_reading: None) -> None:
    for path in written.values():
        _read_strictly(path)
    sr = pydicom.dcmread(written["sr"])
    seg = pydicom.dcmread(written["seg"])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert isinstance(hd.sr.srread(written["sr"]), hd.sr.Comprehensive3DSR)
    assert hd.seg.segread(written["seg"]).number_of_segments == 2


@pytest.mark.parametrize("reason", list(SkipReason))
def test_skipped_sr_reads_back_strictly(
    sources: list[Dataset], reason: SkipReason, tmp_path: Path, strict_reading: None
) -> None:
    path = _write(_skipped(sources, reason), tmp_path / "skipped.dcm")
    _read_strictly(path)
    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("kind", ["sr", "seg", "sr-v2", "sr-no-lesion"])
def test_dciodvfy_reports_no_errors(written: dict[str, Path], kind: str) -> None:
    errors, warnings = dciodvfy_errors(written[kind])
    assert errors == []
    # The only warning expected: dciodvfy does not know our (declared) private coding scheme designator.
    assert all("99PACSAI" in w for w in warnings), warnings


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("reason", list(SkipReason))
def test_dciodvfy_accepts_skipped_sr(sources: list[Dataset], reason: SkipReason, tmp_path: Path) -> None:
    errors, warnings = dciodvfy_errors(_write(_skipped(sources, reason), tmp_path / "skipped.dcm"))
    assert errors == []
    assert all("99PACSAI" in w for w in warnings), warnings


@pytest.mark.usefixtures("needs_dsrdump")
def test_dsrdump_reads_the_sr(written: dict[str, Path]) -> None:
    run = subprocess.run(
        ["dsrdump", str(written["sr"])], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "E:" not in run.stderr and "W:" not in run.stderr, run.stderr
    assert "Comprehensive 3D SR" in run.stdout
    assert 'CODE:(,,"Pneumonia")=(52101004,SCT,"Present")' in run.stdout
    assert 'NUM:(,,"Volume")=' in run.stdout and 'SCOORD:(,,"Image Region")=(POLYLINE' in run.stdout


# --- SR content -----------------------------------------------------------------------------------------------


def _report(path: Path) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of the SR file, as highdicom parses it."""
    content = hd.sr.srread(path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def test_sr_codes_the_finding_and_probability(written: dict[str, Path], findings: Findings) -> None:
    sr = pydicom.dcmread(written["sr"])
    (evaluation,) = named(sr, "233604007", "SCT")
    assert evaluation.ValueType == "CODE"
    assert evaluation.ConceptCodeSequence[0].CodeValue == "52101004"  # Present: 0.83 >= 0.5
    (probability,) = named(sr, "P-PNEUMONIA", "99PACSAI")
    value = probability.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(findings.probability)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    (threshold,) = named(sr, "P-THRESHOLD", "99PACSAI")
    assert float(threshold.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.5)
    assert sr.SeriesNumber == 9901 and "NOT FOR CLINICAL USE" in sr.SeriesDescription


def test_sr_names_the_fusion_inputs_calibration_and_operating_point(written: dict[str, Path]) -> None:
    sr = pydicom.dcmread(written["sr"])
    texts = {code: [str(i.TextValue) for i in named(sr, code, "99PACSAI")]
             for code in ("AI-FUSION-IN", "AI-FUSION-MISS", "AI-FUSION-EV", "AI-CALIBRATION", "AI-OPERATING-PT",
                          "AI-SCOPE")}
    assert texts["AI-FUSION-IN"] == ["age: 63 years (from DICOM header)",
                                     "fever: present (from request text in the DICOM header)"]
    assert texts["AI-FUSION-MISS"] == ["sex", "cough", "dyspnoea"]
    assert texts["AI-FUSION-EV"] == [f"{name}: {value}" for name, value in NOTES.fused_evidence]
    assert texts["AI-CALIBRATION"] == [NOTES.calibration] and texts["AI-OPERATING-PT"] == [NOTES.operating_point]
    assert texts["AI-SCOPE"] == list(NOTES.scope)


def test_model_notes_validate() -> None:
    with pytest.raises(ResultsError, match="fusion_inputs"):
        ModelNotes(fusion_inputs=(("age", ""),))
    with pytest.raises(ResultsError, match="calibration"):
        ModelNotes(calibration="  ")
    with pytest.raises(ResultsError, match="fused_evidence"):
        ModelNotes(fused_evidence=(("", "x"),))
    with pytest.raises(ResultsError, match="scope"):
        ModelNotes(scope=("",))


def test_finding_is_absent_below_threshold(sources: list[Dataset], findings: Findings) -> None:
    below = dataclasses.replace(findings, probability=0.49)
    sr = build_results(sources, below, ALGORITHM).sr
    (evaluation,) = named(sr, "233604007", "SCT")
    assert evaluation.ConceptCodeSequence[0].CodeValue == "272519000"  # Absent


def test_sr_names_the_algorithm(written: dict[str, Path]) -> None:
    (context,) = _report(written["sr"]).get_observer_contexts()
    assert context.observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")
    attributes = context.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == ALGORITHM.name
    assert attributes.manufacturer_name == ALGORITHM.manufacturer
    sr = pydicom.dcmread(written["sr"])
    names = {item.TextValue for item in named(sr, "111001", "DCM")}  # Algorithm Name
    versions = {item.TextValue for item in named(sr, "111003", "DCM")}  # Algorithm Version
    assert names == {ALGORITHM.name} and versions == {ALGORITHM.version}
    assert sr.ManufacturerModelName == ALGORITHM.name and sr.SoftwareVersions == ALGORITHM.version


def test_key_slices_are_the_top_attention_slices(written: dict[str, Path], sources: list[Dataset]) -> None:
    sr = pydicom.dcmread(written["sr"])
    expected = [sources[i].SOPInstanceUID for i in np.argsort(-ATTENTION)[:3]]
    (probability,) = named(sr, "P-PNEUMONIA", "99PACSAI")
    refs = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in probability.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert refs == expected
    library = named(sr, "111028", "DCM")[0]  # Image Library
    library_uids = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in named(library, "260753009", "SCT")  # Source
    }
    assert set(expected) <= library_uids


def test_lesion_volume_matches_independent_computation(
    written: dict[str, Path], sources: list[Dataset], findings: Findings
) -> None:
    (group,) = _report(written["sr"]).get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
    row_mm, col_mm = (float(v) for v in sources[0].PixelSpacing)
    expected_ml = findings.lesion.sum() * row_mm * col_mm * float(sources[0].SpacingBetweenSlices) / 1000.0
    assert expected_ml == pytest.approx(findings.lesion.sum() * SPACING_MM / 1000.0)
    assert volume.value == pytest.approx(expected_ml)
    assert volume.unit == hd.sr.CodedConcept("ml", "UCUM", "milliliter")
    segment = group.referenced_segment
    assert segment is not None
    assert segment.referenced_segment_numbers == [2]
    assert segment.referenced_sop_instance_uid == pydicom.dcmread(written["seg"]).SOPInstanceUID


def test_lesion_outline_on_the_key_slice_with_most_lesion(
    written: dict[str, Path], sources: list[Dataset], findings: Findings
) -> None:
    (group,) = _report(written["sr"]).get_planar_roi_measurement_groups()
    region = group.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert (
        region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == sources[4].SOPInstanceUID
    )
    points = region.value
    assert np.array_equal(points[0], points[-1])  # closed
    assert points.min() >= 0 and points.max() <= 32
    (area,) = group.get_measurements(name=hd.sr.CodedConcept("42798000", "SCT", "Area"))
    main_blob = findings.lesion[4].copy()
    main_blob[20, 22] = False  # the separate one-pixel component is not part of the largest region
    assert area.value == pytest.approx(main_blob.sum() * 1.0 * 1.0)
    assert area.unit.value == "mm2"
    # What OHIF shows as the outline's label: "<NUM meaning>: <value> <unit>"; no finding-site line.
    assert area.name.meaning == "Pneumonia lesion area" and group.finding_sites == []


def test_sr_carries_the_not_for_clinical_use_note(written: dict[str, Path]) -> None:
    sr = pydicom.dcmread(written["sr"])
    notes = [item.TextValue for item in named(sr, "121106", "DCM")]
    assert any("NOT FOR CLINICAL USE" in note and "synthetic phantoms" in note for note in notes)
    schemes = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert "99PACSAI" in schemes


def test_sr_copies_patient_and_study_from_the_source(results: ResultSet, sources: list[Dataset]) -> None:
    for ds in (results.sr, results.seg):
        assert ds is not None
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
            assert ds[keyword].value == sources[0][keyword].value
        assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID


def test_no_lesion_means_no_outline_and_zero_volume(sources: list[Dataset], findings: Findings) -> None:
    clear = dataclasses.replace(findings, probability=0.1, lesion=np.zeros_like(findings.lesion))
    result = build_results(sources, clear, ALGORITHM)
    assert named(result.sr, "111030", "DCM") == []  # no Image Region
    (volume,) = named(result.sr, "118565006", "SCT")
    assert float(volume.MeasuredValueSequence[0].NumericValue) == 0.0


def test_superseded_objects_are_referenced(written: dict[str, Path], sources: list[Dataset]) -> None:
    old_sr, old_seg = _superseded_v1(sources)
    sr = pydicom.dcmread(written["sr-v2"])
    (study_item,) = sr.PredecessorDocumentsSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == old_sr.series_uid
    assert [i.ReferencedSOPInstanceUID for i in series_item.ReferencedSOPSequence] == [
        old_sr.sop_instance_uid
    ]
    notes = " ".join(item.TextValue for item in named(sr, "SUPERSEDES", "99PACSAI"))
    assert old_sr.sop_instance_uid in notes and old_seg.sop_instance_uid in notes
    assert sr.SOPInstanceUID != old_sr.sop_instance_uid
    assert sr.SeriesInstanceUID != old_sr.series_uid


def test_superseded_needs_the_sop_class(sources: list[Dataset], findings: Findings) -> None:
    with pytest.raises(ResultsError, match="superseded"):
        build_results(sources, findings, ALGORITHM, superseded=[("1.2.3", "1.2.4", "1.2.5")])


# --- SEG content ----------------------------------------------------------------------------------------------


def test_seg_segments_frames_and_masks(
    written: dict[str, Path], sources: list[Dataset], findings: Findings
) -> None:
    seg = hd.seg.segread(written["seg"])
    assert seg.SeriesNumber == 9902 and seg.SegmentationType == "BINARY"
    lungs, lesion = seg.SegmentSequence
    assert lungs.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert lungs.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    for segment in (lungs, lesion):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == ALGORITHM.name
        (identification,) = segment.SegmentationAlgorithmIdentificationSequence
        assert identification.AlgorithmVersion == ALGORITHM.version
        assert identification.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    lungs_rgb = hd.color.CIELabColor.from_dicom_value(lungs.RecommendedDisplayCIELabValue).to_rgb()
    lesion_rgb = hd.color.CIELabColor.from_dicom_value(lesion.RecommendedDisplayCIELabValue).to_rgb()
    assert lungs_rgb[2] > max(lungs_rgb[:2])  # blue-ish
    assert lesion_rgb[0] > 200 and max(lesion_rgb[1:]) < 100  # red
    assert seg.NumberOfFrames == 2 * SLICES  # empty frames kept
    referenced = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], segment_numbers=[1, 2]
    )
    assert pixels.shape == (SLICES, 32, 32, 2)
    assert np.array_equal(pixels[..., 0].astype(bool), findings.lungs)
    assert np.array_equal(pixels[..., 1].astype(bool), findings.lesion)
    assert seg.ContentQualification == "RESEARCH"


# --- UIDs and determinism -------------------------------------------------------------------------------------


def test_same_inputs_give_identical_objects(
    sources: list[Dataset], findings: Findings, results: ResultSet
) -> None:
    again = build_results(sources, findings, ALGORITHM)
    assert again.seg is not None and results.seg is not None
    assert encoded_without_timestamps(again.sr) == encoded_without_timestamps(results.sr)
    assert encoded_without_timestamps(again.seg) == encoded_without_timestamps(results.seg)
    skipped = _skipped(sources, SkipReason.TOO_FEW_SLICES)
    assert encoded_without_timestamps(skipped) == encoded_without_timestamps(_skipped(sources, SkipReason.TOO_FEW_SLICES))


def test_uids_change_with_version_and_model(
    sources: list[Dataset], findings: Findings, results: ResultSet
) -> None:
    assert results.seg is not None
    newer = build_results(sources, findings, ALGORITHM, series_version=2)
    other_model = build_results(sources, findings, dataclasses.replace(ALGORITHM, version="0.4.0"))
    other_name = build_results(sources, findings, dataclasses.replace(ALGORITHM, name="other-net"))
    seen = {results.sr.SOPInstanceUID, results.seg.SOPInstanceUID, results.sr.SeriesInstanceUID}
    for variant in (newer, other_model, other_name):
        assert variant.seg is not None
        uids = {variant.sr.SOPInstanceUID, variant.seg.SOPInstanceUID, variant.sr.SeriesInstanceUID}
        assert len(uids) == 3 and not (uids & seen)
        seen |= uids


def test_result_uid_is_valid_deterministic_and_distinct() -> None:
    series = "1.2.826.0.1.3680043.10.1411.12345678901234567890123456789012345"
    uids = {kind: result_uid(series, 1, "m@1", kind) for kind in ResultKind}
    assert len(set(uids.values())) == len(ResultKind)
    for uid in uids.values():
        assert len(uid) <= 64 and UID(uid).is_valid
    assert result_uid(series, 1, "m@1", "sr") == uids[ResultKind.SR]
    assert result_uid(series, 2, "m@1", "sr") != uids[ResultKind.SR]
    assert result_uid(series, 1, "m@2", "sr") != uids[ResultKind.SR]
    assert result_uid(series + "1", 1, "m@1", "sr") != uids[ResultKind.SR]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.2.3", 1, "m", "report"), "kind"),
        (("not a uid", 1, "m", "sr"), "source_series_uid"),
        (("1.2.3", 0, "m", "sr"), "series_version"),
        (("1.2.3", 1, " ", "sr"), "model_version"),
    ],
)
def test_result_uid_rejects_bad_input(args: tuple[str, int, str, str], message: str) -> None:
    with pytest.raises(ResultsError, match=message):
        result_uid(*args)


def test_sr_and_seg_uids_come_from_result_uid(results: ResultSet, sources: list[Dataset]) -> None:
    assert results.seg is not None
    series = sources[0].SeriesInstanceUID
    assert results.sr.SOPInstanceUID == result_uid(series, 1, ALGORITHM.model_key, "sr")
    assert results.sr.SeriesInstanceUID == result_uid(series, 1, ALGORITHM.model_key, "sr-series")
    assert results.seg.SOPInstanceUID == result_uid(series, 1, ALGORITHM.model_key, "seg")
    assert results.seg.SeriesInstanceUID == result_uid(series, 1, ALGORITHM.model_key, "seg-series")


def test_content_datetime_defaults_to_the_source_and_can_be_given(
    sources: list[Dataset], findings: Findings, results: ResultSet
) -> None:
    assert (str(results.sr.ContentDate), str(results.sr.ContentTime)) == ("20260102", "030405")
    when = dt.datetime(2027, 5, 6, 7, 8, 9)
    given = build_results(sources, findings, ALGORITHM, content_datetime=when)
    assert given.seg is not None
    assert str(given.sr.ContentDate) == str(given.seg.ContentDate) == "20270506"


# --- skipped SR -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(SkipReason))
def test_skipped_sr_codes_the_reason(sources: list[Dataset], reason: SkipReason) -> None:
    sr = _skipped(sources, reason)
    (status,) = named(sr, "AI-STATUS", "99PACSAI")
    assert status.ConceptCodeSequence[0].CodeValue == "NOT-PROCESSED"
    (coded,) = named(sr, "SKIP-REASON", "99PACSAI")
    assert coded.ConceptCodeSequence[0].CodeValue == reason.code.value
    (detail,) = named(sr, "SKIP-DETAIL", "99PACSAI")
    assert detail.TextValue == f"test detail for {reason.name}"
    assert any("NOT FOR CLINICAL USE" in item.TextValue for item in named(sr, "121106", "DCM"))
    assert sr.SOPInstanceUID == result_uid(sources[0].SeriesInstanceUID, 1, ALGORITHM.model_key, "skipped-sr")


def test_skip_reason_codes_are_distinct() -> None:
    values = [reason.code.value for reason in SkipReason]
    assert len(set(values)) == len(values) and all(len(v) <= 16 for v in values)


def test_skipped_sr_rejects_empty_detail(sources: list[Dataset]) -> None:
    with pytest.raises(ResultsError, match="detail"):
        build_skipped_sr(sources, SkipReason.NOT_CT, "  ", ALGORITHM)


# --- input checks and error conversion ------------------------------------------------------------------------


def test_findings_validate_their_fields(findings: Findings) -> None:
    with pytest.raises(ResultsError, match="probability"):
        dataclasses.replace(findings, probability=1.5)
    with pytest.raises(ResultsError, match="attention"):
        dataclasses.replace(findings, attention=ATTENTION[:-1])
    with pytest.raises(ResultsError, match="lesion"):
        dataclasses.replace(findings, lesion=findings.lesion[:, :-1])
    with pytest.raises(ResultsError, match="lungs"):
        dataclasses.replace(findings, lungs=findings.lungs.astype(float))


def test_findings_must_match_the_sources(sources: list[Dataset], findings: Findings) -> None:
    with pytest.raises(ResultsError, match="slices"):
        build_results(sources[:-1], findings, ALGORITHM)


def test_sources_from_two_series_are_refused(sources: list[Dataset], findings: Findings) -> None:
    mixed = [*sources[:-1], copy.deepcopy(sources[-1])]
    mixed[-1].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ResultsError, match="more than one series"):
        build_results(mixed, findings, ALGORITHM)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientSex", "Q"),  # not an enumerated value (highdicom refused it and echoed it)
        ("PatientSex", ["M", "F"]),
        ("PatientBirthDate", "19950000"),
        ("PatientBirthDate", "1995"),
        ("PatientBirthDate", "1995-01-01"),
        ("PatientBirthDate", "garbage!"),
        ("StudyDate", "20251399"),
        ("StudyTime", "256199"),
        ("PatientAge", "forty"),
        ("AccessionNumber", "X" * 40),
    ],
)
def test_a_malformed_source_attribute_never_loses_the_result(
    sources: list[Dataset], findings: Findings, keyword: str, value: object, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    # A new element, created while reading validation is off (an element keeps the reading mode of its creation:
    # the shared sources' elements may have been made under any mode another test left set in this process).
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    broken = copy.deepcopy(sources)
    for ds in broken:
        if keyword in ds:
            del ds[keyword]
        setattr(ds, keyword, value)
    built_objects = [build_skipped_sr(broken, SkipReason.NOT_CT, "detail", ALGORITHM),
                     build_results(broken, findings, ALGORITHM).sr, build_results(broken, findings, ALGORITHM).seg]
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    for built in built_objects:
        assert str(built.get(keyword, "")) in ("", str(sources[0].get(keyword, "")))  # blanked, never copied bad
        path = tmp_path / f"{keyword}.dcm"
        built.save_as(path, enforce_file_format=True)
        pydicom.dcmread(path)  # strict reading: every value valid for its VR


def test_absent_type2_patient_attributes_still_give_a_skipped_sr(
    sources: list[Dataset], tmp_path: Path
) -> None:
    sparse = copy.deepcopy(sources)
    for ds in sparse:
        for keyword in (
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "ReferringPhysicianName",
        ):
            delattr(ds, keyword)
    sr = build_skipped_sr(sparse, SkipReason.NOT_CT, "no CT", ALGORITHM)
    assert sr.PatientBirthDate == "" and sr.AccessionNumber == ""
    assert all("AccessionNumber" not in ds for ds in sparse)  # inputs untouched
    if shutil.which("dciodvfy"):
        errors, _ = dciodvfy_errors(_write(sr, tmp_path / "sparse.dcm"))
        assert errors == []


def test_algorithm_identity_validates() -> None:
    with pytest.raises(ResultsError, match="name"):
        AlgorithmIdentity(name="", version="1")
    with pytest.raises(ResultsError, match="version"):
        AlgorithmIdentity(name="x", version="v" * 65)


# --- geometry -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_outline_encloses_exactly_the_largest_region(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((24, 24)) < 0.45
    region = largest_region(mask)
    points = outline(region)
    assert np.array_equal(points[0], points[-1])
    assert polygon_area(points, VoxelSize(1.0, 1.0, 1.0)) == pytest.approx(region.sum())
    assert polygon_area(points, VoxelSize(0.5, 2.0, 1.0)) == pytest.approx(region.sum())
    assert points.min() >= 0 and points.max() <= 24


def test_result_uid_accepts_source_uids_with_leading_zero_components():
    """Real modalities send such UIDs; the receive path stores them, so results must be able to reference them."""
    uid = result_uid("1.2.0840.10008.01", 1, "m@1", "sr")
    assert uid == result_uid("1.2.0840.10008.01", 1, "m@1", "sr")
    assert len(uid) <= 64 and uid.replace(".", "").isdigit()
    with pytest.raises(ResultsError):
        result_uid("1.2.x", 1, "m@1", "sr")


SITE_ROOT = "1.2.826.0.1.3680043.10.999."


def _uids(ds: Dataset) -> dict[str, str]:
    """Every UI-valued element anywhere in ``ds`` (keyword → value; multi-valued ones flattened)."""
    found: dict[str, str] = {}

    def visit(_ds: Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR == "UI" and elem.value:
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                found[f"{elem.keyword}={v}"] = str(v)

    ds.walk(visit)
    if hasattr(ds, "file_meta"):
        ds.file_meta.walk(visit)
    return found


def test_a_site_uid_root_heads_every_uid_the_node_creates(sources: list[Dataset], findings: Findings) -> None:
    site = dataclasses.replace(ALGORITHM, uid_root=SITE_ROOT)
    built = build_results(sources, findings, site)
    skipped = build_skipped_sr(sources, SkipReason.TOO_FEW_SLICES, "3 slices", site)
    assert built.seg is not None
    from_sources = {str(v) for s in sources for v in _uids(s).values()}
    created = {}
    for obj in (built.sr, built.seg, skipped):
        for key, uid in _uids(obj).items():
            # ImplementationClassUID names the writing software (highdicom), not an object
            if uid not in from_sources and not uid.startswith("1.2.840.10008.") and "ImplementationClass" not in key:
                created[key] = uid
    assert any(k.startswith("SOPInstanceUID=") for k in created), created  # the check sees created UIDs
    assert {k: v for k, v in created.items() if not v.startswith(SITE_ROOT)} == {}
    series = sources[0].SeriesInstanceUID
    assert built.sr.SOPInstanceUID == result_uid(series, 1, ALGORITHM.model_key, "sr", SITE_ROOT)
    default = build_results(sources, findings, ALGORITHM)
    assert default.sr.SOPInstanceUID != built.sr.SOPInstanceUID
    assert not str(default.sr.SOPInstanceUID).startswith(SITE_ROOT)


@pytest.mark.parametrize("root", ["1.2.3", "1.2.x.", "1." * 20, ""])
def test_a_bad_uid_root_is_refused(root: str) -> None:
    with pytest.raises(ResultsError, match="uid_root"):
        dataclasses.replace(ALGORITHM, uid_root=root)
    with pytest.raises(ResultsError, match="root"):
        result_uid("1.2.3", 1, "m", "sr", root)
