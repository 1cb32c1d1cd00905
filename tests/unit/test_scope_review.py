"""Series a scanner or PACS really sends that the models must not judge, through the worker (gate, load, pipeline):
sagittal and coronal reformats, MIP/MinIP slabs, a Rescale Slope of 0 or not a number, children. Each one got a
verdict or a misleading reason before (found by review); now each is refused with a reason that names what it is."""

from __future__ import annotations

import pydicom
import pytest

from models.preprocess import PreprocessError, load_series
from node.results import SkipReason
from node.states import JobState
from node.worker import Worker
from tests.ctgen import write_ct_series
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

