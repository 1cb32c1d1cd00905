"""Acquisitions the shipped models were measured to misread, refused by the gate before any model runs.

Every phantom the models were trained, fitted and tested on is rendered slice by slice as a point sample: no slice
profile, so no partial volume along z. Averaging slices creates partial-volume rims at the diaphragm, the heart, the
great vessels and the apices that the models read as ground glass. Measured with the shipped default (classifier
2.4.0 + U-Net 1.1.0 + candidate model 1.0.0) on 10 normal phantoms (seed 7200, 256 px, 240 slices of ~1.2 mm):
point-sampled at 1.2 / 2.4 / 3.6 / 6 mm, 0 / 0 / 1 / 0 of 10 called pneumonia; the same anatomy averaged into slabs
of 2 / 3 / 5 slices (2.4 / 3.6 / 6 mm), 10 / 10 / 10 of 10 (median probability 0.996–0.997, threshold 0.123); on 20
normals at 256 px and 120 slices, a 3-slice AVERAGE slab 20 of 20 (the same series unaveraged: 3 of 20).
"""

from __future__ import annotations

import pytest

from node.gate import check_header
from node.results import SkipReason
from node.states import JobState
from node.worker import Worker
from tests.unit.test_scope_review import _header
from tests.unit.test_worker import FixedRunner, node, queue_job, receive_edited  # noqa: F401 - node: fixture


@pytest.mark.parametrize("image_type", [
    ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"],
    ["DERIVED", "PRIMARY", "AXIAL", "AVERAGE"],
    ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE IP"],
    "DERIVED\\SECONDARY\\AXIAL\\AVERAGE",
])
def test_averaged_slabs_are_refused(image_type):
    """An AVERAGE slab passed the gate (only MIP/MinIP were refused) and every normal phantom got a pneumonia
    verdict (20 of 20 at 0.99)."""
    refusal = check_header(_header(ImageType=image_type))
    assert refusal is not None and refusal.reason is SkipReason.NOT_ORIGINAL_AXIAL
    assert "averaged" in refusal.detail


@pytest.mark.parametrize("image_type", [
    ["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"],
])
def test_single_axial_slices_still_pass(image_type):
    assert check_header(_header(ImageType=image_type)) is None


def test_an_averaged_slab_series_gets_no_verdict_through_the_worker(node, tmp_path):  # noqa: F811
    """Through the worker: the series is refused before any model runs (the runner is never called)."""
    config, engine, ingestor, queue, dispatcher, _ = node

    def average(ds):
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"]

    series = receive_edited(ingestor, tmp_path, "avg", average, slices=10, seed=15)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.NOT_ORIGINAL_AXIAL.value)
    assert "averaged" in job.last_error and runner.calls == 0
