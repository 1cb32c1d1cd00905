"""Contrast seen in the image (models.scope.contrast_problem, node.pipelines.base.chest_scope_refusal): a chest CT
with iodine in its blood is out of the models' scope even when its header does not say so (Contrast/Bolus Agent
stripped or never filled in). Chest phantoms with their blood (heart, great and pulmonary vessels) raised to venous
and arterial values are refused; the same phantoms unenhanced, noisier, or with denser bone marrow are not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.preprocess import Volume, load_series
from models.registry import Registry
from models.scope import assess_chest_scope, contrast_problem, measure
from node.config import GateSection
from node.pipelines.base import chest_scope_refusal
from tests.conftest import TEST_WEIGHTS_DIR, require_weights
from training.phantom import generate_dataset, load_masks
from training.phantom.spec import Tissue

Case = tuple[Volume, np.ndarray, np.ndarray]  # volume, true lungs, tissue labels


@pytest.fixture(scope="module")
def chests(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    out = tmp_path_factory.mktemp("contrast_chests")
    generate_dataset(out, cases=4, seed=29, prevalence=0.5, size=128, slices=24)
    cases = []
    for _, row in pd.read_csv(out / "clinical.csv").iterrows():
        masks = load_masks(out / row.masks)
        cases.append((load_series(sorted((out / row.dicom_dir).glob("*.dcm"))), masks["lungs"], masks["tissue"]))
    return cases


def _changed(volume: Volume, tissue: np.ndarray, kind: Tissue, add_hu: float) -> Volume:
    hu = volume.hu.astype(np.float32, copy=True)
    hu[tissue == kind] += add_hu
    return dataclasses.replace(volume, hu=hu, _cache={})


def test_unenhanced_chests_hold_no_enhanced_blood(chests: list[Case]) -> None:
    for volume, lungs, _ in chests:
        m = measure(volume, lungs)
        assert m["mediastinum_ml"] > 300 and m["mediastinum_enhanced_ml"] <= 5, m
        assert contrast_problem(m) is None


@pytest.mark.parametrize("add_hu", [130.0, 250.0])  # blood at ~170 HU (venous) and ~290 HU (arterial phase)
def test_enhanced_blood_is_refused(chests: list[Case], add_hu: float) -> None:
    for volume, lungs, tissue in chests:
        enhanced = _changed(volume, tissue, Tissue.VESSEL, add_hu)
        verdict = assess_chest_scope(enhanced, lungs)
        assert verdict.in_scope  # still a whole chest: contrast is a check of its own
        reason = contrast_problem(verdict.measures)
        assert reason is not None and reason.startswith("contrast enhancement in the image: "), verdict.measures
        assert verdict.measures["mediastinum_enhanced_ml"] > 100 and len(reason) <= 170
        assert 130 <= verdict.measures["mediastinum_enhanced_hu"] <= 600


def test_noise_and_dense_marrow_do_not_read_as_contrast(chests: list[Case]) -> None:
    rng = np.random.default_rng(5)
    for volume, lungs, tissue in chests:
        noisy = dataclasses.replace(volume, hu=volume.hu + rng.normal(0, 40, volume.hu.shape).astype(np.float32),
                                    _cache={})
        assert contrast_problem(measure(noisy, lungs)) is None  # lone bright voxels, not a blood pool
        sclerotic = _changed(volume, tissue, Tissue.MARROW, 200.0)  # vertebral marrow at 380-500 HU
        assert contrast_problem(measure(sclerotic, lungs)) is None
        # a cortex that no longer reads as a closed ring (60 % of it at marrow values): the marrow is still bone's
        patchy = volume.hu.astype(np.float32, copy=True)
        patchy[(tissue == Tissue.BONE) & (rng.random(volume.hu.shape) < 0.6)] = 250.0
        patchy[tissue == Tissue.MARROW] += 50.0
        assert measure(dataclasses.replace(volume, hu=patchy, _cache={}), lungs)["mediastinum_enhanced_ml"] <= 5


def test_the_node_refuses_an_enhanced_chest_with_the_shipped_unet_unless_told_not_to(chests: list[Case]) -> None:
    require_weights()
    segmenter = Registry(Path(TEST_WEIGHTS_DIR) if TEST_WEIGHTS_DIR else None).segmenter()
    volume, _, tissue = chests[0]
    assert chest_scope_refusal(volume, segmenter.predict(volume).lungs, GateSection()) is None
    enhanced = _changed(volume, tissue, Tissue.VESSEL, 200.0)
    lungs = segmenter.predict(enhanced).lungs
    refusal = chest_scope_refusal(enhanced, lungs, GateSection())
    assert refusal is not None and refusal.detail.startswith("outside the model's scope: contrast enhancement in")
    assert chest_scope_refusal(enhanced, lungs, GateSection(refuse_contrast=False)) is None
    assert chest_scope_refusal(enhanced, lungs, GateSection(scope_check=False)) is None
