"""models.lesion_evidence: per-slice evidence pooled into the four features, and the card's lesion fusion (parsed,
applied, refused with another segmenter or without evidence). Pure numpy; the loaded-model side is in
tests/unit/test_lesion_fusion.py."""

from __future__ import annotations

import numpy as np
import pytest

from models.lesion_evidence import (
    CLASSIFIER_TERM,
    FEATURES,
    LesionEvidence,
    LesionFusion,
    LesionFusionError,
    logit,
    pooled_features,
    series_features,
    slice_evidence,
)

SEG = ("lung_lesion_unet", "1.0.0")


def softmax(lung: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """A (slices, g, g, 3) softmax with the given lung and lesion probabilities."""
    lesion = np.minimum(lesion, lung)
    return np.stack([1 - lung, lung - lesion, lesion], axis=-1).astype(np.float32)


def _volume() -> np.ndarray:
    lung = np.zeros((6, 32, 32), np.float32)
    lung[:, 4:28, 4:28] = 1.0
    lesion = np.zeros_like(lung)
    lesion[2, 10:14, 10:15] = 0.9  # 20 px on slice 2
    lesion[4, 20:22, 20:23] = 0.6  # 6 px on slice 4
    lesion[5, 6:8, 6:8] = 0.3  # below 0.5: no pixel, but the largest probability on that slice
    return softmax(lung, lesion)


def test_slice_evidence_counts_lesion_pixels_inside_the_lungs_only():
    p = _volume()
    top, px = slice_evidence(p)
    assert px.tolist() == [0, 0, 20, 0, 6, 0]
    assert top.tolist() == pytest.approx([0, 0, 0.9, 0, 0.6, 0.3])
    outside = p.copy()
    outside[1, 0:2, 0:2] = [0.05, 0.0, 0.95]  # lesion probability where lung + lesion ≥ 0.5 but outside the lung box
    assert slice_evidence(outside)[1][1] == 4  # it is "in the lungs" by the softmax, so counted
    nolung = p.copy()
    nolung[3, 0:2, 0:2] = [0.7, 0.0, 0.3]  # lung + lesion < 0.5: not inside the lungs
    assert slice_evidence(nolung)[0][3] == 0


def test_pooled_features_match_the_whole_volume_features_and_name_each_quantity():
    p = _volume()
    f = dict(zip(FEATURES, series_features(p), strict=True))
    assert f["max_lesion_logit"] == pytest.approx(float(logit(0.9)), rel=1e-5)
    assert f["log1p_lesion_px"] == pytest.approx(np.log1p(26))
    assert f["log1p_max_slice_px"] == pytest.approx(np.log1p(20))
    assert f["log1p_lesion_slices"] == pytest.approx(np.log1p(2))
    # computed per slice in chunks (as streaming does), pooled at the end: the same numbers
    parts = [slice_evidence(p[a : a + 4]) for a in (0, 4)]
    top, px = np.concatenate([t for t, _ in parts]), np.concatenate([x for _, x in parts])
    assert np.array_equal(pooled_features(top, px), series_features(p))
    ev = LesionEvidence.from_probabilities(p, SEG)
    assert ev.grid == 32 and np.array_equal(ev.features(), series_features(p))
    assert "26 lesion pixels on 2 of 6 slices" in ev.describe() and "0.900" in ev.describe()


def _card(**over):
    block = {"segmenter": {"name": SEG[0], "version": SEG[1]},
             "coefficients": {CLASSIFIER_TERM: 1.0, "max_lesion_logit": 0.5, "log1p_lesion_px": 0.2,
                              "log1p_max_slice_px": 0.1, "log1p_lesion_slices": 0.3},
             "intercept": -1.0, "fitted_on": "a test set"}
    block.update(over)
    return {"name": "pneumonia_classifier", "version": "9.9.9", "lesion_fusion": block}


def test_the_fusion_is_the_cards_logistic_regression_and_rises_with_lesion_evidence():
    assert LesionFusion.from_card({"name": "x"}) is None
    fusion = LesionFusion.from_card(_card())
    assert fusion is not None and fusion.segmenter == SEG
    ev = LesionEvidence.from_probabilities(_volume(), SEG)
    x = np.array([logit(0.3)[()], *ev.features()])
    c = np.array([1.0, 0.5, 0.2, 0.1, 0.3])
    assert fusion.probability(0.3, ev) == pytest.approx(1 / (1 + np.exp(-(-1.0 + c @ x))))
    none = LesionEvidence.from_probabilities(softmax(np.ones((6, 32, 32), np.float32), np.zeros((6, 32, 32))), SEG)
    assert fusion.probability(0.3, ev) > fusion.probability(0.3, none)
    assert fusion.probability(0.6, none) > fusion.probability(0.3, none)
    assert LesionFusion.from_card({**_card(), "lesion_fusion": fusion.to_card()}) == fusion  # round trip


@pytest.mark.parametrize("bad", [
    {"coefficients": {CLASSIFIER_TERM: 1.0}},  # features missing
    {"coefficients": {**_card()["lesion_fusion"]["coefficients"], "extra": 1.0}},
    {"intercept": "high"},
    {"intercept": float("nan")},
    {"segmenter": "lung_lesion_unet 1.0.0"},
])
def test_a_malformed_fusion_block_is_refused(bad):
    with pytest.raises(LesionFusionError, match="9.9.9"):
        LesionFusion.from_card(_card(**bad))


def test_the_fusion_refuses_another_segmenters_evidence_and_none():
    fusion = LesionFusion.from_card(_card())
    assert fusion is not None
    other = LesionEvidence.from_probabilities(_volume(), (SEG[0], "2.0.0"))
    with pytest.raises(LesionFusionError, match="not from lung_lesion_unet 2.0.0"):
        fusion.probability(0.5, other)
    with pytest.raises(LesionFusionError, match="none was given"):
        fusion.probability(0.5, None)
    fusion.check_segmenter(*SEG)
