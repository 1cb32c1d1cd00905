"""Series a scanner or PACS really sends that the models must not judge, through the worker (gate, load, pipeline):
sagittal and coronal reformats, MIP/MinIP slabs, a Rescale Slope of 0 or not a number, children. Each one got a
verdict or a misleading reason before (found by review); now each is refused with a reason that names what it is."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.preprocess import PreprocessError, load_series
from node.gate import check_header
from node.ingest import Origin
from node.results import SkipReason
from node.states import JobState
from node.worker import Worker
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.unit.test_worker import FixedRunner, node, queue_job, receive_edited  # noqa: F401 - node: fixture


def _header(**over):
    ds = pydicom.Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 512
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for keyword, value in over.items():
        setattr(ds, keyword, value)
    return ds


def _run(node, series_uid, runner=None):  # noqa: F811 - the fixture's value
    config, engine, _, queue, dispatcher, _ = node
    job_id = queue_job(queue, series_uid)
    runner = runner or FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    return queue.get(job_id), runner


# ---------------------------------------------------------------------------------------------------------
# Sagittal and coronal reformats: refused as not axial, not as "turned on their side (decubitus)"
# ---------------------------------------------------------------------------------------------------------

def _reformat(axial: list[Path], out: Path, plane: str) -> list[Path]:
    """A sagittal or coronal reformat of an axial ctgen series, as a console (or a scanner's direct MPR) writes
    it: one image per column (sagittal) or row (coronal), rows running head to feet."""
    dss = sorted((pydicom.dcmread(p) for p in axial), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.int16) for d in dss])[::-1]  # head (highest z) first
    x0, y0, _ = (float(v) for v in dss[0].ImagePositionPatient)
    top = float(dss[-1].ImagePositionPatient[2])
    dz = abs(float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2]))
    series_uid = pydicom.uid.generate_uid()
    out.mkdir()
    paths = []
    for k in range(hu.shape[2] if plane == "sagittal" else hu.shape[1]):
        d = copy.deepcopy(dss[0])
        d.SeriesInstanceUID = series_uid
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        if plane == "sagittal":
            image, d.ImageOrientationPatient, d.ImagePositionPatient = hu[:, :, k], [0, 1, 0, 0, 0, -1], [x0 + k, y0, top]
        else:
            image, d.ImageOrientationPatient, d.ImagePositionPatient = hu[:, k, :], [1, 0, 0, 0, 0, -1], [x0, y0 + k, top]
        d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # what a scanner's direct coronal/sagittal recon may write
        d.PixelSpacing = [dz, 1.0]
        d.Rows, d.Columns = image.shape
        d.PixelData = np.ascontiguousarray(image).astype("<u2").tobytes()
        paths.append(out / f"{plane}{k:03d}.dcm")
        d.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_sagittal_or_coronal_reformat_is_refused_as_not_axial(node, tmp_path, plane):  # noqa: F811
    """A chest reformat (16 slices of 32 px) got "the images are turned on their side (decubitus)": the gate read
    the column direction alone, so every non-axial plane looked like a patient lying on their side."""
    _, _, ingestor, *_ = node
    axial = write_ct_series(tmp_path / "axial", size=32, slices=16, seed=5)
    paths = _reformat(axial.paths, tmp_path / plane, plane)
    for path in paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    job, runner = _run(node, str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID))
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert f"not an axial series: the slices are {plane}" in job.last_error
    assert "decubitus" not in job.last_error and runner.calls == 0


@pytest.mark.parametrize(("orientation", "says"), [
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([1, 0, 0, 0, 0, -1], "coronal"),
    ([1, 0, 0, 0, 0.5, -0.8660254], "oblique, 60 degrees off axial"),
])
def test_non_axial_headers_name_their_plane(orientation, says):
    refusal = check_header(_header(ImageOrientationPatient=orientation))
    assert refusal is not None and refusal.reason is SkipReason.OUT_OF_SCOPE
    assert says in refusal.detail and "decubitus" not in refusal.detail


def test_decubitus_and_prone_axial_slices_are_still_told_apart():
    assert "decubitus" in check_header(_header(ImageOrientationPatient=[0, 1, 0, -1, 0, 0])).detail
    assert "prone" in check_header(_header(ImageOrientationPatient=[-1, 0, 0, 0, -1, 0])).detail
    assert check_header(_header(ImageOrientationPatient=[-1, 0, 0, 0, 1, 0])) is None  # feet first, supine


# ---------------------------------------------------------------------------------------------------------
# Projections: a MIP or MinIP slab is not a slice of anatomy
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_type", [
    ["DERIVED", "SECONDARY", "AXIAL", "MIP"],
    ["DERIVED", "SECONDARY", "MINIP"],
    ["ORIGINAL", "PRIMARY", "AXIAL", "MIN IP"],
    ["DERIVED", "PRIMARY", "AXIAL", "MAXIMUM"],
    ["DERIVED", "SECONDARY", "VOLUME_RENDER"],
])
def test_projection_images_are_refused(image_type):
    """A 5-slice MIP of a normal chest phantom took the shipped classifier from 0.03 to 0.995 (pneumonia) and
    MinIPs pull it the other way; the gate passed every ImageType but LOCALIZER."""
    refusal = check_header(_header(ImageType=image_type))
    assert refusal is not None and refusal.reason is SkipReason.NOT_ORIGINAL_AXIAL
    assert "projection" in refusal.detail


@pytest.mark.parametrize("image_type", [
    ["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
    ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"],
])
def test_ordinary_axial_image_types_pass(image_type):
    assert check_header(_header(ImageType=image_type)) is None


def test_a_mip_series_gets_no_verdict(node, tmp_path):  # noqa: F811
    _, _, ingestor, *_ = node

    def mip(ds):
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "MIP"]

    series = receive_edited(ingestor, tmp_path, "mip", mip, slices=10, seed=13)
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.NOT_ORIGINAL_AXIAL.value)
    assert "projection" in job.last_error and runner.calls == 0


# ---------------------------------------------------------------------------------------------------------
# A Rescale Slope that cannot turn stored values into HU
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", ["0", "-1", "NaN", "inf"])
def test_a_rescale_slope_of_zero_negative_or_not_finite_is_refused(node, tmp_path, slope):  # noqa: F811
    """Slope 0 was read as 1 (``float(slope or 1.0)``) and the series got a verdict; NaN became 'no body found'.
    No CT writes such a slope: the stored values cannot be read as HU, so the series is refused as unreadable."""
    _, _, ingestor, *_ = node

    def odd(ds):
        ds["RescaleSlope"] = pydicom.DataElement(0x00281053, "DS", slope, validation_mode=0)

    series = receive_edited(ingestor, tmp_path, "slope", odd, slices=10, seed=14)
    with pytest.raises(PreprocessError, match="RescaleSlope") as caught:
        load_series(series.paths)
    assert caught.value.kind == "pixels"
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.UNDECODABLE_PIXELS.value)
    assert "RescaleSlope" in job.last_error and runner.calls == 0


def test_a_missing_rescale_slope_still_means_one(tmp_path):
    series = write_ct_series(tmp_path / "s", size=32, slices=4, seed=15)
    for p in series.paths:
        ds = pydicom.dcmread(p)
        del ds.RescaleSlope
        ds.save_as(p, enforce_file_format=True)
    assert float(load_series(series.paths).hu.min()) < -900  # air outside the body


# ---------------------------------------------------------------------------------------------------------
# Children: the models were trained on adults (18–95 years)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("age", "birth", "study", "refused"), [
    ("010Y", "", "", True),
    ("006M", "", "", True),
    ("017Y", "", "", True),
    ("018Y", "", "", False),
    ("045Y", "", "", False),
    ("", "20150301", "20260102", True),  # 10 from the birth date
    ("", "19700101", "20260102", False),
    ("", "", "", False),  # unknown: judged (the SR says age was missing)
    ("45", "", "", False),  # malformed and no birth date: unknown
    ("000Y", "", "", False),  # a placeholder for "unknown", not a newborn
    ("000D", "20260102", "20260102", True),  # a newborn: the dates say so
])
def test_children_are_outside_the_models_scope(age, birth, study, refused):
    ds = _header(PatientBirthDate=birth, StudyDate=study)
    ds["PatientAge"] = pydicom.DataElement(0x00101010, "AS", age, validation_mode=0)  # as sent, even malformed
    refusal = check_header(ds)
    assert (refusal is not None) is refused
    if refused:
        assert refusal.reason is SkipReason.OUT_OF_SCOPE and "under 18 years" in refusal.detail
        assert age not in refusal.detail if age else birth not in refusal.detail  # no header value quoted


def test_a_childs_chest_ct_gets_no_verdict(node, tmp_path):  # noqa: F811
    """A 10-year-old's chest the size of the phantom's passed the image-based scope check (lungs 1–12 L over
    ≥ 150 mm) and got a verdict; the header's age was never looked at."""
    _, _, ingestor, *_ = node

    def child(ds):
        ds.PatientAge = "010Y"

    series = receive_edited(ingestor, tmp_path, "child", child, slices=10, seed=16)
    job, runner = _run(node, series.series_uid)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert "under 18 years" in job.last_error and runner.calls == 0
