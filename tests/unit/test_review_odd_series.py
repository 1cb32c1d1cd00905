"""Series shaped as CT scanners send them, through the gate and the worker (review of odd series).

Two headers that say the series is out of scope passed the gate and got a verdict:

- contrast recorded in the Contrast/Bolus module but not in Contrast/Bolus Agent (the agent left empty, as Type 2
  allows, or blanked by an anonymiser, while an injector-linked scanner filled in the route, volume, ingredient or
  flow rate): only ContrastBolusAgent was read, so a series whose header says 80 mL of iodine went in IV was judged;
- a child's PatientAge written without the zero padding or in lower case ("11Y", "011y"), with no birth date: the
  strict nnnD/W/M/Y parse read it as no age at all, the series got a verdict and its SR said the age was missing.

Sound (coded refusal or result, checked here): a localizer in the axial series, two reconstructions at the same
positions, an Enhanced CT multi-frame instance, contrast named on one slice only, per-slice RescaleSlope/Intercept.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.gate import check_header
from node.ingest import Origin
from node.results import SkipReason
from node.states import JobState
from tests.unit.test_scope_review import _header, _run
from tests.unit.test_worker import dataset_bytes, node, receive_edited  # noqa: F401 - node: fixture

# ---------------------------------------------------------------------------------------------------------
# Contrast recorded outside Contrast/Bolus Agent
# ---------------------------------------------------------------------------------------------------------

_GIVEN = [
    {"ContrastBolusRoute": "IV"},
    {"ContrastBolusVolume": 80},
    {"ContrastBolusIngredient": "IODINE"},
    {"ContrastBolusTotalDose": 28},
    {"ContrastBolusIngredientConcentration": 350},
    {"ContrastFlowRate": [3.5, 2.0]},
]


@pytest.mark.parametrize("fields", _GIVEN)
def test_contrast_recorded_in_the_bolus_module_is_refused(fields):
    ds = _header(ContrastBolusAgent="", **fields)  # Type 2: present and empty
    refusal = check_header(ds)
    assert refusal is not None and refusal.reason is SkipReason.OUT_OF_SCOPE and "contrast" in refusal.detail
    assert "IODINE" not in refusal.detail  # no header value quoted


@pytest.mark.parametrize("fields", [
    {}, {"ContrastBolusAgent": ""}, {"ContrastBolusAgent": "NONE", "ContrastBolusRoute": "NONE"},
    {"ContrastBolusVolume": 0, "ContrastBolusTotalDose": 0, "ContrastFlowRate": [0]}, {"ContrastBolusRoute": ""},
])
def test_a_bolus_module_that_says_no_contrast_still_passes(fields):
    assert check_header(_header(**fields)) is None


def test_contrast_given_without_an_agent_gets_no_verdict_through_the_worker(node, tmp_path):  # noqa: F811
    """Before: DONE with a verdict (the runner was called) for a series whose header says 80 mL IV iodine."""
    _, _, ingestor, *_ = node

    def injected(ds):
        ds.ContrastBolusAgent = ""
        ds.ContrastBolusRoute, ds.ContrastBolusVolume, ds.ContrastBolusIngredient = "IV", 80, "IODINE"

    series = receive_edited(ingestor, tmp_path, "inj", injected, slices=10, seed=21)
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert "contrast" in job.last_error and runner.calls == 0


# ---------------------------------------------------------------------------------------------------------
# A child's age in a loosely written PatientAge
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("age", "refused"), [
    ("11Y", True), ("011y", True), ("6M", True), ("11 Y", True), ("45Y", False), ("045y", False),
    ("45", False),  # no unit: still unknown (judged, the SR says the age was missing)
    ("0Y", False),  # a placeholder, as "000Y"
])
def test_a_loosely_written_age_is_read(age, refused):
    ds = _header()
    ds["PatientAge"] = pydicom.DataElement(0x00101010, "AS", age, validation_mode=0)
    refusal = check_header(ds)
    assert (refusal is not None) is refused
    if refused:
        assert refusal.reason is SkipReason.OUT_OF_SCOPE and "under 18 years" in refusal.detail
        assert age not in refusal.detail


def test_a_child_aged_11y_gets_no_verdict_through_the_worker(node, tmp_path):  # noqa: F811
    """Before: DONE with a verdict, and the SR said the header gave no age."""
    _, _, ingestor, *_ = node

    def child(ds):
        ds["PatientAge"] = pydicom.DataElement(0x00101010, "AS", "11Y", validation_mode=0)
        ds.PatientBirthDate = ""

    series = receive_edited(ingestor, tmp_path, "child11", child, slices=10, seed=22)
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert "under 18 years" in job.last_error and runner.calls == 0


# ---------------------------------------------------------------------------------------------------------
# Found sound: coded refusals or results
# ---------------------------------------------------------------------------------------------------------

def _accept(ingestor, path):
    ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))


def _copy(path, tmp_path, name, edit):
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    edit(ds)
    out = tmp_path / f"{name}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_localizer_inside_the_axial_series_is_a_coded_refusal(node, tmp_path):  # noqa: F811
    _, _, ingestor, *_ = node
    series = receive_edited(ingestor, tmp_path, "loc", lambda ds: None, slices=10, seed=23)

    def scout(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 0, -1], [-15.5, 0, 0]

    _accept(ingestor, _copy(series.paths[0], tmp_path, "scout", scout))
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.MIXED_ORIENTATION.value)
    assert runner.calls == 0


def test_two_kernels_at_the_same_positions_are_a_coded_refusal(node, tmp_path):  # noqa: F811
    _, _, ingestor, *_ = node
    series = receive_edited(ingestor, tmp_path, "k1", lambda ds: None, slices=10, seed=24)
    for i, path in enumerate(series.paths):
        _accept(ingestor, _copy(path, tmp_path, f"k2-{i}", lambda ds: setattr(ds, "ConvolutionKernel", "B70f")))
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.UNEVEN_SPACING.value)
    assert "duplicate" in job.last_error and runner.calls == 0


def test_an_enhanced_ct_multi_frame_instance_is_a_coded_refusal(node, tmp_path):  # noqa: F811
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    _, _, ingestor, *_ = node
    series = receive_edited(ingestor, tmp_path, "mf-src", lambda ds: None, slices=10, seed=25)
    frames = [pydicom.dcmread(p) for p in series.paths]

    def enhanced(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.NumberOfFrames, ds.PixelData = len(frames), b"".join(f.PixelData for f in frames)
        per_frame = []
        for f in frames:
            item, plane = Dataset(), Dataset()
            plane.ImagePositionPatient = f.ImagePositionPatient
            item.PlanePositionSequence = Sequence([plane])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        for keyword in ("ImagePositionPatient", "InstanceNumber"):
            delattr(ds, keyword)

    path = _copy(series.paths[0], tmp_path, "mf", enhanced)
    uid = pydicom.dcmread(path).SeriesInstanceUID
    assert uid == series.series_uid
    _accept(ingestor, path)
    job, runner = _run(node, series.series_uid)
    assert job.state == JobState.SKIPPED and runner.calls == 0
    assert job.skip_reason in (SkipReason.MULTI_FRAME.value, SkipReason.NOT_ORIGINAL_AXIAL.value)


def test_contrast_named_on_one_slice_only_is_refused(node, tmp_path):  # noqa: F811
    _, _, ingestor, *_ = node

    def fifth(ds):
        if ds.InstanceNumber == 5:
            ds.ContrastBolusAgent = "IOHEXOL 350"

    series = receive_edited(ingestor, tmp_path, "c5", fifth, slices=10, seed=26)
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert runner.calls == 0


def test_per_slice_rescale_reads_the_same_hounsfield_units(tmp_path):
    from models.preprocess import load_series
    from tests.ctgen import write_ct_series

    series = write_ct_series(tmp_path / "r", size=32, slices=6, seed=27)
    before = load_series(series.paths).hu
    for n, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) - 1024
        slope, intercept = (1.0, 0.5, 2.0)[n % 3], (-1024.0, -2048.0)[n % 2]
        ds.PixelData = np.round((hu - intercept) / slope).astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored, ds.HighBit = slope, intercept, 16, 15
        ds.save_as(path, enforce_file_format=True)
    after = load_series(series.paths).hu
    assert np.abs(after - before).max() <= 1.0  # slope 2: one stored step is 2 HU, rounded to the nearest


def test_a_loosely_written_adult_age_is_not_called_missing_in_the_verdicts_scope():
    from types import SimpleNamespace

    from node.config import GateSection
    from node.pipelines.base import scope_notes

    volume = SimpleNamespace(datasets=[_header(PatientAge="45Y")])
    assert not any(line.startswith("Patient age") for line in scope_notes(volume, 256, GateSection()))  # type: ignore[arg-type]
