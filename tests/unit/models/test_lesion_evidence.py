"""models.lesion_evidence: per-slice evidence pooled into each feature set, and the card's lesion fusion (parsed,
applied with the set its coefficients name, refused with another segmenter or without evidence). Pure numpy; the loaded-model side is in
tests/unit/test_lesion_fusion.py."""

from __future__ import annotations

import numpy as np
import pytest

from models.lesion_evidence import (
    CLASSIFIER_TERM,
    FEATURES_V1,
    FEATURES_V2,
    TOP_K,
    LesionEvidence,
    LesionFusion,
    LesionFusionError,
    SliceEvidence,
    largest,
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
    s = slice_evidence(p)
    assert s.pixels.tolist() == [0, 0, 20, 0, 6, 0]
    assert s.pixels_p30.tolist() == [0, 0, 20, 0, 6, 4]
    assert s.pixels_p10.tolist() == s.pixels_p30.tolist()
    assert s.max_probability.tolist() == pytest.approx([0, 0, 0.9, 0, 0.6, 0.3])
    assert s.probability_sum.tolist() == pytest.approx([0, 0, 18.0, 0, 3.6, 1.2], rel=1e-5)
    assert s.top.shape == (6, TOP_K) and s.top[2, :20].tolist() == pytest.approx([0.9] * 20) and s.top[2, 20] == 0
    outside = p.copy()
    outside[1, 0:2, 0:2] = [0.05, 0.0, 0.95]  # lesion probability where lung + lesion ≥ 0.5 but outside the lung box
    assert slice_evidence(outside).pixels[1] == 4  # it is "in the lungs" by the softmax, so counted
    nolung = p.copy()
    nolung[3, 0:2, 0:2] = [0.7, 0.0, 0.3]  # lung + lesion < 0.5: not inside the lungs
    assert slice_evidence(nolung).max_probability[3] == 0


def test_pooled_features_match_the_whole_volume_features_and_name_each_quantity():
    p = _volume()
    f = dict(zip(FEATURES_V1, series_features(p, FEATURES_V1), strict=True))
    assert f["max_lesion_logit"] == pytest.approx(float(logit(0.9)), rel=1e-5)
    assert f["log1p_lesion_px"] == pytest.approx(np.log1p(26))
    assert f["log1p_max_slice_px"] == pytest.approx(np.log1p(20))
    assert f["log1p_lesion_slices"] == pytest.approx(np.log1p(2))
    g = dict(zip(FEATURES_V2, series_features(p, FEATURES_V2), strict=True))
    assert g["top10_lesion_logit"] == pytest.approx(float(logit(0.9)), rel=1e-5)
    assert g["top50_lesion_logit"] == pytest.approx(float(logit((20 * 0.9 + 6 * 0.6 + 4 * 0.3) / 50)), rel=1e-5)
    assert g["top200_lesion_logit"] == pytest.approx(float(logit((20 * 0.9 + 6 * 0.6 + 4 * 0.3) / 200)), rel=1e-5)
    assert g["log1p_px_p30"] == pytest.approx(np.log1p(30)) and g["log1p_px_p10"] == pytest.approx(np.log1p(30))
    assert g["log1p_probability_sum"] == pytest.approx(np.log1p(22.8), rel=1e-5)
    assert g["log1p_slices_p30"] == pytest.approx(np.log1p(3))
    # computed per slice in chunks (as streaming does), pooled at the end: the same numbers, in any slice order
    parts = [slice_evidence(p[a : a + 4]) for a in (0, 4)]
    joined = SliceEvidence.concat(parts)
    for names in (FEATURES_V1, FEATURES_V2):
        assert np.array_equal(pooled_features(joined, names), series_features(p, names))
        shuffled = SliceEvidence.stack([(parts[i // 4], i % 4) for i in (5, 0, 2, 4, 1, 3)])
        assert np.allclose(pooled_features(shuffled, names), series_features(p, names))
    ev = LesionEvidence.from_probabilities(p, SEG)
    assert ev.grid == 32 and np.array_equal(ev.features(), series_features(p))
    assert "26 lesion pixels at p >= 0.5 on 2 of 6 slices, 30 at p >= 0.3" in ev.describe() and "0.900" in ev.describe()
    assert ev.describe().isascii()


def test_the_top_k_pool_takes_the_series_largest_probabilities_from_every_slice():
    """More lesion pixels than TOP_K on one slice and some on another: the series' top 200 is the union's top."""
    lung = np.ones((2, 32, 32), np.float32)
    lesion = np.zeros_like(lung)
    lesion[0] = np.linspace(0.0, 0.8, 32 * 32).reshape(32, 32)  # 1024 graded pixels
    lesion[1, :3, :3] = 0.99
    g = dict(zip(FEATURES_V2, series_features(softmax(lung, lesion), FEATURES_V2), strict=True))
    everything = np.sort(np.concatenate([lesion[0].ravel(), lesion[1].ravel()]))[::-1]
    assert g["top200_lesion_logit"] == pytest.approx(float(logit(everything[:200].mean())), rel=1e-5)
    assert g["top10_lesion_logit"] == pytest.approx(float(logit(everything[:10].mean())), rel=1e-5)


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
    assert fusion.features == FEATURES_V1  # a v1 card (classifiers 2.1.0, 2.2.0) pools the v1 features
    x = np.array([logit(0.3)[()], *ev.features(FEATURES_V1)])
    c = np.array([1.0, 0.5, 0.2, 0.1, 0.3])
    assert fusion.probability(0.3, ev) == pytest.approx(1 / (1 + np.exp(-(-1.0 + c @ x))))
    none = LesionEvidence.from_probabilities(softmax(np.ones((6, 32, 32), np.float32), np.zeros((6, 32, 32))), SEG)
    assert fusion.probability(0.3, ev) > fusion.probability(0.3, none)
    assert fusion.probability(0.6, none) > fusion.probability(0.3, none)
    assert LesionFusion.from_card({**_card(), "lesion_fusion": fusion.to_card()}) == fusion  # round trip


def test_a_v2_card_pools_the_graded_features():
    c2 = dict(zip(FEATURES_V2, (0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.3), strict=True))
    fusion = LesionFusion.from_card(_card(coefficients={CLASSIFIER_TERM: 0.7, **c2}))
    assert fusion is not None and fusion.features == FEATURES_V2
    assert fusion.to_card()["features"] == [CLASSIFIER_TERM, *FEATURES_V2]
    ev = LesionEvidence.from_probabilities(_volume(), SEG)
    z = -1.0 + 0.7 * logit(0.3)[()] + np.array(list(c2.values())) @ ev.features(FEATURES_V2)
    assert fusion.probability(0.3, ev) == pytest.approx(1 / (1 + np.exp(-z)))


@pytest.mark.parametrize("bad", [
    {"coefficients": {CLASSIFIER_TERM: 1.0}},  # features missing
    {"coefficients": {**_card()["lesion_fusion"]["coefficients"], "extra": 1.0}},
    {"coefficients": {**_card()["lesion_fusion"]["coefficients"], "top10_lesion_logit": 1.0}},  # two sets mixed
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


@pytest.mark.parametrize("fill", ["distinct", "mostly_zero", "all_zero", "negative", "nan", "few_positive"])
def test_largest_equals_partition_then_sort(fill: str) -> None:
    """`largest` (the per-slice top-k of the evidence) is the same array as numpy's partition + sort, whatever the
    ties: lesion maps are exactly 0 outside the lungs, where numpy's partition slows ~10×."""
    rng = np.random.default_rng(7)
    rows = rng.random((6, 4096)).astype(np.float32)
    if fill == "mostly_zero":
        rows[rng.random(rows.shape) < 0.9] = 0.0
    elif fill == "all_zero":
        rows[:] = 0.0
    elif fill == "negative":
        rows -= 0.5
    elif fill == "nan":
        rows[2, 17] = np.nan
    elif fill == "few_positive":
        rows[:] = 0.0
        rows[:, :50] = rng.random((6, 50))
    k = 200
    expected = -np.sort(-np.partition(rows, rows.shape[1] - k, axis=1)[:, -k:], axis=1)
    assert np.array_equal(largest(rows, k), expected, equal_nan=True)
