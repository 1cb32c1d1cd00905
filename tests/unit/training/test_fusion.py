"""Clinical fusion end to end: a tiny classifier trained on phantoms (age, sex, symptoms from clinical.csv) is saved
with its card, loaded through the registry the node uses, and its probability moves when only one clinical input
changes; the image-only ablation arm ignores them; a 1.x-style card still loads with the 4-feature age-sex input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.clinical import AGE_SEX, ClinicalInputs, feature_count
from models.preprocess import load_series
from models.registry import Registry

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BASE = ClinicalInputs(age=60.0, sex="F", fever=0.0, cough=0.0, dyspnoea=0.0)


@pytest.fixture(scope="module")
def weights(fusion_weights: Path) -> Path:
    return fusion_weights


@pytest.fixture(scope="module")
def tiny_set(fusion_sets: dict[str, Path]) -> Path:
    return fusion_sets["test"]


def _probabilities(weights: Path, version: str, data: Path, inputs: list[ClinicalInputs]) -> list[float]:
    files = sorted((data / "CASE0001" / "dicom").glob("*.dcm"))
    vol = load_series(files)
    cls = Registry(weights).classifier(version)
    return [cls.predict(vol, clinical=c).raw_probability for c in inputs]  # type: ignore[misc]


def test_card_names_the_clinical_vector(weights: Path) -> None:
    card = json.loads((weights / "classifier" / "2.0.0-test" / "model_card.json").read_text())
    assert card["clinical_inputs"]["schema"] == "age-sex-symptoms"
    assert card["clinical_inputs"]["used"] == ["age", "sex", "fever", "cough", "dyspnoea"]
    assert len(card["clinical_inputs"]["features"]) == feature_count("age-sex-symptoms") == 10


@pytest.mark.parametrize("change", [
    {"fever": 1.0}, {"cough": 1.0}, {"dyspnoea": 1.0}, {"fever": None}, {"age": 85.0}, {"sex": "M"}, {"sex": None},
])
def test_each_clinical_input_moves_the_output(weights: Path, tiny_set: Path, change: dict) -> None:
    base, changed = _probabilities(weights, "2.0.0-test", tiny_set, [BASE, replace(BASE, **change)])
    # A few training steps move the zero-initialised fusion head a little: 1e-6 is ~30 float32 steps at p ≈ 0.4,
    # and the same input gives the same bits (the image-only test below shows "no effect" is exact).
    assert abs(changed - base) > 1e-6, f"{change} left the probability at {base}"


def test_image_only_arm_ignores_clinical_inputs(weights: Path, tiny_set: Path) -> None:
    other = ClinicalInputs(age=20.0, sex="M", fever=1.0, cough=1.0, dyspnoea=1.0)
    a, b = _probabilities(weights, "2.0.0-image-only", tiny_set, [BASE, other])
    assert a == pytest.approx(b, abs=1e-7)


def test_output_reports_inputs_used_and_missing(weights: Path, tiny_set: Path) -> None:
    vol = load_series(sorted((tiny_set / "CASE0001" / "dicom").glob("*.dcm")))
    out = Registry(weights).classifier("2.0.0-test").predict(vol, clinical=ClinicalInputs(age=50.0, cough=1.0))
    assert out.clinical_used == ("age", "sex", "fever", "cough", "dyspnoea")
    assert out.clinical is not None and out.clinical.missing() == ["sex", "fever", "dyspnoea"]


def test_an_age_sex_card_loads_with_four_features(weights: Path, tiny_set: Path, tmp_path: Path) -> None:
    """A 1.x card has no clinical_inputs: the registry feeds the 4-feature age-sex vector (a model built for it)."""
    import keras

    from models.classifier import build_classifier
    from training.common import write_model

    src = json.loads((weights / "classifier" / "2.0.0-test" / "model_card.json").read_text())
    card = {k: v for k, v in src.items() if k not in ("clinical_inputs", "calibration", "files")}
    keras.utils.set_random_seed(0)
    model = build_classifier(grid=32, channels=2, widths=(8, 16), features=16, clinical_features=4)
    write_model(model, tmp_path / "classifier" / "1.0.0", {**card, "version": "1.0.0"})
    cls = Registry(tmp_path).classifier("1.0.0")
    assert (cls.clinical_schema, cls.clinical_used, cls.temperature) == (AGE_SEX, ("age", "sex"), 1.0)
    vol = load_series(sorted((tiny_set / "CASE0001" / "dicom").glob("*.dcm")))
    out = cls.predict(vol, clinical=BASE)  # symptoms are dropped: this version does not read them
    assert out.clinical is not None and out.clinical.fever is None and out.clinical.age == 60.0
    assert 0.0 < out.probability < 1.0 and np.isfinite(cls.threshold)
