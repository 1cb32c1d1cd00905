"""training.calibration: temperature scaling fitted on the validation split lowers the expected calibration error
on a held-out phantom set (tiny model, fixed seeds), and the fit itself behaves on known miscalibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.preprocess import PreprocessConfig
from models.registry import Registry, apply_temperature
from training.calibration import calibration_block, ece, fit_temperature
from training.common import load_grid_cases
from training.train import predict_classifier

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_calibration_lowers_ece_on_held_out_phantoms(fusion_weights: Path, fusion_sets: dict[str, Path]) -> None:
    """Fitted on the validation set as training does (``calibration_block``), judged on 32 other phantoms."""
    model = Registry(fusion_weights).classifier("2.0.0-test")._m.model
    cfg = PreprocessConfig(grid=32)
    val = load_grid_cases(fusion_sets["val"], 32, with_targets=False, progress=False)
    test = load_grid_cases(fusion_sets["test"], 32, with_targets=False, progress=False)
    yv, pv = np.array([c.label for c in val]), predict_classifier(model, val, cfg)
    cal = calibration_block(yv, pv, 0.5, fitted_on="validation")
    assert cal["validation_ece_after"] < cal["validation_ece_before"]
    y, p = np.array([c.label for c in test]), predict_classifier(model, test, cfg)
    q = apply_temperature(p, cal["temperature"])
    before, after = ece(y, p), ece(y, q)
    assert after < before, f"held-out ECE {before:.4f} → {after:.4f} with T = {cal['temperature']:.3f}"
    # The decision is unchanged: the threshold is mapped through the same T.
    assert ((p >= cal["threshold_uncalibrated"]) == (q >= cal["threshold"])).all()


def test_temperature_recovers_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-logit))).astype(int)  # calibrated at T = 1
    over = 1 / (1 + np.exp(-3 * logit))  # overconfident: logits ×3 → T ≈ 3
    under = 1 / (1 + np.exp(-0.5 * logit))  # underconfident → T ≈ 0.5
    assert fit_temperature(y, over) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(y, under) == pytest.approx(0.5, rel=0.1)
    block = calibration_block(y, over, 0.5, fitted_on="synthetic")
    assert block["validation_ece_after"] < block["validation_ece_before"] / 3
    assert block["threshold"] == pytest.approx(0.5)  # logit 0 is a fixed point of temperature scaling
    assert fit_temperature([1, 1, 1], [0.2, 0.9, 0.6]) == 1.0  # one class: nothing to fit


def test_ece_matches_a_hand_computation() -> None:
    y = [0, 1, 1, 0]
    p = [0.05, 0.95, 0.55, 0.45]  # bins 0, 9, 5, 4: |0.05-0| + |0.95-1| + |0.55-1| + |0.45-0| over 4
    assert ece(y, p) == pytest.approx((0.05 + 0.05 + 0.45 + 0.45) / 4)
