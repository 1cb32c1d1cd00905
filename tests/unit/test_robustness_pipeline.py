"""The shipped default pneumonia pipeline on acquisitions outside what it was validated on.

Measured on normal chest phantoms (seed 7100, 48 slices) through `PneumoniaPipeline.analyse` with the shipped
default (classifier 2.4.0 + U-Net 1.1.0 + candidate model 1.0.0): at 128 px 18 of 60 were called pneumonia, the
same anatomy at 192 px 7 of 40, at 256 px 2 of 60 (384 and 512 px: 0 of 20 each). The lesion fusion was fitted and
tested on 256–512 px only. Below the matrix its card states (``validated_acquisition.min_matrix``) the pipeline now refuses
the series as outside the model's scope before any model runs.
"""

from __future__ import annotations

import pytest

from models.preprocess import load_series
from node.config import GateSection
from node.gate import GateRefusal
from node.pipelines.pneumonia import PneumoniaPipeline
from node.pipelines.runner import RegistryRunner
from node.results import SkipReason

SEED, NORMAL = 7100, 29  # a normal phantom: 0.943 at 128 px, 0.014 at 256 px (threshold 0.123) before the check


def _normal(tmp_path, rows: int):
    from training.phantom import generate_case

    row = generate_case(SEED, NORMAL, 0, tmp_path, (rows, rows), (48, 48))
    assert row["n_lesions"] == 0 and row["lesion_volume_ml"] == 0.0  # the ground truth: no lesion at all
    return load_series(sorted((tmp_path / str(row["dicom_dir"])).glob("*.dcm")))


@pytest.fixture(scope="module")
def runner():
    return RegistryRunner(device="cpu")


class _Counting:
    """Wraps a runner and counts model calls."""

    def __init__(self, base):
        self.base, self.calls = base, 0
        self.min_matrix = base.min_matrix

    def segment(self, volume):
        self.calls += 1
        return self.base.segment(volume)

    def classify(self, volume, lesion=None):
        self.calls += 1
        return self.base.classify(volume, lesion)


def test_a_normal_128_px_phantom_gets_no_verdict_from_the_shipped_default(runner, tmp_path):
    """Before: Findings with probability 0.943 (pneumonia at threshold 0.123) for a phantom without any lesion."""
    counting = _Counting(runner)
    out = PneumoniaPipeline().analyse(_normal(tmp_path, 128), counting, GateSection())
    assert isinstance(out, GateRefusal), f"a verdict: {getattr(out, 'probability', None)}"
    assert out.reason is SkipReason.OUT_OF_SCOPE and "128 x 128 matrix" in out.detail and "256" in out.detail
    assert counting.calls == 0


def test_the_same_anatomy_at_256_px_still_gets_its_verdict(runner, tmp_path):
    out = PneumoniaPipeline().analyse(_normal(tmp_path, 256), runner, GateSection())
    assert not isinstance(out, GateRefusal)
    assert out.probability < out.threshold
    # the verdict states its scope (the SR's AI-SCOPE items): the card's matrix, the checks made, contrast from the
    # header and the image; the phantom's header gives the age, so no line says the age went unchecked
    scope = out.notes.scope
    assert "at least 256 px" in scope[0] and "the 256 px matrix" in scope[1] and "in Hounsfield units" in scope[1]
    assert scope[2].startswith("Contrast: checked in the header (Contrast/Bolus Agent empty or none) and in the image")
    assert len(scope) == 3


def test_the_limit_comes_from_the_card_and_the_scope_check_switch(runner, tmp_path):
    assert runner.min_matrix == runner.classifier.card["validated_acquisition"]["min_matrix"] == 256
    # with the scope check off (test fakes, ctgen series) nothing is refused for its matrix
    out = PneumoniaPipeline().analyse(_normal(tmp_path, 128), runner, GateSection(scope_check=False))
    assert not isinstance(out, GateRefusal)
    assert "Not checked ([gate] scope_check = false" in out.notes.scope[1]  # and the verdict says so


@pytest.mark.parametrize("block, expected", [(None, 0), ({}, 0), ({"min_matrix": 256}, 256)])
def test_min_matrix_of_a_card(block, expected):
    from models.registry import min_matrix_of

    card = {"name": "c", "version": "1"} | ({} if block is None else {"validated_acquisition": block})
    assert min_matrix_of(card) == expected


@pytest.mark.parametrize("value", [-1, 19.5, "192", True])
def test_a_malformed_min_matrix_is_refused(value):
    from models.registry import RegistryError, min_matrix_of

    with pytest.raises(RegistryError, match="min_matrix"):
        min_matrix_of({"name": "c", "version": "1", "validated_acquisition": {"min_matrix": value}})


def test_the_streaming_runner_carries_the_limit(runner):
    from node.prefetch import StreamingRunner

    assert StreamingRunner(runner, models=None, work=[]).min_matrix == 256
