"""training.crossval.lesion: the per-series lesion features, the per-fold two-stage fusion (segmenter features on
the fold's fit cases, then the classifier's logit on its validation split; never its test labels), and the features
made by a real (tiny) segmenter from prepared cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.lesion_evidence import ALL_FEATURES, CANDIDATE_FEATURES, FEATURES_V1, FEATURES_V2, series_features
from training.crossval.lesion import (
    COLUMNS,
    FEATURES,
    MIN_PER_CLASS,
    Fused,
    fuse_folds,
    segmenter_features,
)


def _softmax(lung: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """(S, g, g, 3) probabilities: background / lung / lesion from boolean masks (lesion inside lung)."""
    p = np.zeros((*lung.shape, 3), np.float32)
    p[..., 0] = 1.0
    p[lung] = (0.1, 0.9, 0.0)
    p[lesion] = (0.05, 0.15, 0.8)
    return p


def test_series_features_count_lesion_pixels_inside_the_lungs() -> None:
    lung = np.zeros((4, 16, 16), bool)
    lung[:, 2:14, 2:14] = True
    lesion = np.zeros_like(lung)
    lesion[1, 4:7, 4:7] = True   # 9 pixels on slice 1
    lesion[3, 5:7, 5:7] = True   # 4 pixels on slice 3
    p = _softmax(lung, lesion)
    p[0, 0, 0] = (0.0, 0.0, 1.0)  # lesion outside the lung mask: lesion probability counts as lung, so it counts
    f = dict(zip(FEATURES_V1, series_features(p, FEATURES_V1), strict=True))
    assert f["log1p_lesion_px"] == pytest.approx(np.log1p(14))
    assert f["log1p_max_slice_px"] == pytest.approx(np.log1p(9))
    assert f["log1p_lesion_slices"] == pytest.approx(np.log1p(3))
    assert f["max_lesion_logit"] > 5  # probability 1.0, clipped
    empty = dict(zip(FEATURES_V1, series_features(_softmax(lung, np.zeros_like(lung)), FEATURES_V1), strict=True))
    assert empty["log1p_lesion_px"] == 0 and empty["max_lesion_logit"] < 0
    g = dict(zip(FEATURES_V2, series_features(p, FEATURES_V2), strict=True))  # the arm's set: 0.8 on 13 lung pixels + 1.0 outside
    assert g["log1p_px_p30"] == pytest.approx(np.log1p(14)) and g["log1p_slices_p30"] == pytest.approx(np.log1p(3))
    assert g["log1p_probability_sum"] == pytest.approx(np.log1p(13 * 0.8 + 1.0), rel=1e-5)


def _synthetic(n: int = 400, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels, a weak classifier, lesion features that see what it misses, fold numbers and validation splits."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    p = 1 / (1 + np.exp(-(0.8 * (2 * y - 1) + rng.normal(0, 1.5, n))))  # AUC ~0.75
    feats = rng.normal(0, 1, (n, len(FEATURES)))
    feats[:, 0] += 3.0 * y  # the segmenter's evidence separates well
    fold_of = rng.permutation(np.arange(n) % folds) + 1
    return y, p, feats, fold_of


def _validation(fold_of: np.ndarray, p: np.ndarray, seed: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in np.unique(fold_of):
        idx = rng.choice(np.flatnonzero(fold_of != k), 60, replace=False)
        out[int(k)] = (idx, p[idx])
    return out


def test_fusion_gains_where_the_features_carry_signal() -> None:
    y, p, feats, fold_of = _synthetic()
    fused = fuse_folds(y, fold_of, p, _validation(fold_of, p), feats)
    assert isinstance(fused, Fused)
    assert np.isfinite(fused.p).all() and np.isfinite(fused.thr).all()
    acc_fused = np.mean((fused.p >= fused.thr) == y)
    assert acc_fused > np.mean((p >= 0.5) == y) + 0.1
    assert [f["fold"] for f in fused.folds] == [1, 2, 3, 4, 5]
    assert all(f["coefficients"][FEATURES[0]] > 0 for f in fused.folds)
    assert all(f["fit_cases"] > f["validation_cases"] for f in fused.folds)
    # The recorded coefficients are the fold's fusion: applied to a test case they give its score.
    f1, case = fused.folds[0], int(np.flatnonzero(fold_of == 1)[0])
    c = f1["coefficients"]
    z = f1["intercept"] + c["classifier_logit"] * np.log(p[case] / (1 - p[case])) + sum(
        c[n] * v for n, v in zip(FEATURES, feats[case], strict=True))
    assert fused.p[case] == pytest.approx(1 / (1 + np.exp(-z)))


def test_fusion_never_reads_test_labels_and_uses_the_fit_cases() -> None:
    y, p, feats, fold_of = _synthetic()
    val = _validation(fold_of, p)
    base = fuse_folds(y, fold_of, p, val, feats)
    assert isinstance(base, Fused)
    for k in np.unique(fold_of):
        # Flip the labels of fold k's test cases: fold k's scores and threshold do not move.
        test = fold_of == k
        flipped = y.copy()
        flipped[test] = 1 - flipped[test]
        again = fuse_folds(flipped, fold_of, p, val, feats)
        assert isinstance(again, Fused)
        np.testing.assert_array_equal(again.p[test], base.p[test])
        np.testing.assert_array_equal(again.thr[test], base.thr[test])
    # Stage 1 learns from fold 1's fit cases (outside fold 1 and its validation split): flipping half of their
    # labels (all of them would only flip stage 1's sign, which stage 2 undoes) moves fold 1's scores.
    fit1 = (fold_of != 1) & (np.arange(len(y)) % 4 < 2)
    fit1[val[1][0]] = False
    flipped = y.copy()
    flipped[fit1] = 1 - flipped[fit1]
    moved = fuse_folds(flipped, fold_of, p, val, feats)
    assert isinstance(moved, Fused)
    assert not np.allclose(moved.p[fold_of == 1], base.p[fold_of == 1])


def test_a_validation_split_too_small_to_fit_gives_the_reason() -> None:
    y, p, feats, fold_of = _synthetic(n=60, folds=3)
    val = {k: (np.flatnonzero(fold_of != k)[: MIN_PER_CLASS], p[np.flatnonzero(fold_of != k)[: MIN_PER_CLASS]])
           for k in (1, 2, 3)}
    why = fuse_folds(y, fold_of, p, val, feats)
    assert isinstance(why, str) and f"at least {MIN_PER_CLASS} of each" in why


def test_features_from_a_real_segmenter_are_cached(tmp_path: Path) -> None:
    """A tiny U-Net trained here on phantoms, run over prepared cases: finite features, one row per case, the
    second call read from the cache; a segmenter on another grid than the cases is refused with the reason."""
    from training.dataset import load_dataset
    from training.phantom import generate_dataset
    from training.prepared import prepare
    from training.segmenter import SegmenterSettings, train_segmenter

    data = tmp_path / "data"
    generate_dataset(data, cases=4, seed=43, size=48, slices=(6, 6))
    weights = tmp_path / "weights"
    tiny = SegmenterSettings(epochs=1, steps_per_epoch=2, grid=32, base=4, depth=2, batch_size=4,
                             lesion_sampling="case")
    card = train_segmenter(data, weights / "segmenter" / "0.0.1", settings=tiny, version="0.0.1", progress=False,
                           log=lambda _: None)
    assert card["training"]["settings"]["lesion_sampling"] == "case"
    assert "drawn case first" in card["training"]["augmentation"]
    prep = prepare(load_dataset(data), 32, tmp_path / "cache")
    first = segmenter_features(prep, weights, tmp_path / "cache", log=lambda _: None)
    assert not isinstance(first, str), first
    # no candidate model in this weights folder: the arm's set is v2, the candidate columns are empty
    assert first.values.shape == (4, len(COLUMNS)) and first.candidates is None and first.feature_set == "v2"
    assert first.of().shape == (4, len(FEATURES_V2)) and np.isfinite(first.of(ALL_FEATURES)).all()
    assert np.isnan(first.of(CANDIDATE_FEATURES)).all()
    assert first.segmenter["version"] == "0.0.1" and not first.from_cache
    second = segmenter_features(prep, weights, tmp_path / "cache", log=lambda _: None)
    assert not isinstance(second, str) and second.from_cache
    assert second.seconds == pytest.approx(first.seconds)  # the computing time, kept with the cache
    np.testing.assert_array_equal(second.values, first.values)
    newer = weights / "segmenter" / "0.0.2"  # the same weights as another version: the default now, not asked for
    shutil.copytree(weights / "segmenter" / "0.0.1", newer)
    card_path = newer / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "version": "0.0.2"}))
    latest = segmenter_features(prep, weights, tmp_path / "cache", log=lambda _: None)
    pinned = segmenter_features(prep, weights, tmp_path / "cache", log=lambda _: None, version="0.0.1")
    assert not isinstance(latest, str) and not isinstance(pinned, str)
    assert (latest.segmenter["version"], pinned.segmenter["version"]) == ("0.0.2", "0.0.1")
    other = prepare(load_dataset(data), 16, tmp_path / "cache")
    why = segmenter_features(other, weights, tmp_path / "cache", log=lambda _: None)
    assert isinstance(why, str) and "32² grid" in why and "16²" in why


def test_the_block_and_its_report_section_state_both_arms() -> None:
    """metrics.json's block from a fused run (synthetic), and the report section drawn from it: accuracies that
    match the decisions, the subtle-lesion sensitivity of each arm, the paired tests and every fold's fit."""
    from types import SimpleNamespace

    from training.crossval.lesion import SegmenterFeatures, lesion_block
    from training.report import to_markdown
    from training.report_sections import fused_headline, lesion_blocks

    y, p, feats, fold_of = _synthetic()
    fused = fuse_folds(y, fold_of, p, _validation(fold_of, p), feats)
    assert isinstance(fused, Fused)
    subtle = (y == 1) & (np.arange(len(y)) % 4 == 1)
    ds = SimpleNamespace(cases=[SimpleNamespace(row={"subtle": "1" if s else "0"}, reader_label=None) for s in subtle])
    thr = np.full(len(y), 0.5)
    about = {"name": "unet", "version": "9.9.9", "training_data": {"cases": 40, "seed": 1000}}
    cand = {"name": "cand", "version": "0.0.1", "training_data": [{"cases": 30, "seed": 6000}]}
    block = lesion_block(ds, y, fold_of, (p, thr), fused, SegmenterFeatures(feats, about, 1.0, False, cand),
                         bootstrap=100, seed=0)
    assert block["feature_set"] == "v3" and block["features"] == list(FEATURES)
    arms = block["arms"]
    assert arms["classifier"]["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    assert arms["lesion_evidence"]["accuracy"] == pytest.approx(np.mean((fused.p >= fused.thr) == y))
    assert block["subtle_sensitivity"]["lesion_evidence"] == pytest.approx(np.mean(fused.p[subtle] >= fused.thr[subtle]))
    assert block["auc_paired_bootstrap"]["difference"] > 0
    text = to_markdown(lesion_blocks({"lesion_evidence": block}))
    assert "Classifier + lesion evidence" in text and "unet 9.9.9, trained on 40 phantoms, generator seed 1000" in text
    assert text.count("classifier_logit") == 5  # one fitted row per fold
    assert "candidate model: cand 0.0.1, trained on the U-Net's candidates in 30 (seed 6000) phantoms" in text
    ms = arms["lesion_evidence"]["accuracy_over_folds"]
    assert fused_headline({"lesion_evidence": block}).startswith(f"mean accuracy {100 * ms['mean']:.1f} % ± ")
    assert fused_headline({"lesion_evidence": {"skipped": "too small"}}) is None
    assert "Skipped: too small." in to_markdown(lesion_blocks({"lesion_evidence": {"skipped": "too small"}}))


def test_the_block_carries_the_fused_arms_prevalence_calibration_and_the_candidate_stages_gain() -> None:
    """The headline model is the fused arm: its own 10 % prevalence table and calibration (the report gave the
    classifier alone's there), and with the same fusion over feature set v2 its arm and the paired tests of the
    candidate stage's gain (README quoted them; no code made them)."""
    from types import SimpleNamespace

    from training.calibration import ece
    from training.crossval.imbalance import predictive_values
    from training.crossval.lesion import SegmenterFeatures, lesion_block
    from training.report import to_markdown
    from training.report_sections import lesion_blocks

    y, p, feats, fold_of = _synthetic()
    validation = _validation(fold_of, p)
    fused = fuse_folds(y, fold_of, p, validation, feats)
    weaker = fuse_folds(y, fold_of, p, validation, feats[:, 1:], FEATURES[1:])  # without the separating column
    assert isinstance(fused, Fused) and isinstance(weaker, Fused)
    ds = SimpleNamespace(cases=[SimpleNamespace(row={"subtle": "0"}, reader_label=None) for _ in y])
    about = {"name": "unet", "version": "9.9.9", "training_data": {"cases": 40, "seed": 1000}}
    block = lesion_block(ds, y, fold_of, (p, np.full(len(y), 0.5)), fused,
                         SegmenterFeatures(feats, about, 1.0, False, None), bootstrap=100, seed=0,
                         without_candidates=weaker)
    d = (fused.p >= fused.thr).astype(int)
    sens, spec = d[y == 1].mean(), 1 - d[y == 0].mean()
    op = block["prevalence"]["operating_point"]
    assert (op["sensitivity"], op["specificity"]) == (pytest.approx(sens), pytest.approx(spec))
    assert op["target"]["ppv"] == pytest.approx(predictive_values(sens, spec, 0.10)["ppv"])
    assert block["calibration"]["ece"] == pytest.approx(ece(y, fused.p))
    wc = block["without_candidates"]
    assert wc["arm"]["accuracy"] == pytest.approx(np.mean((weaker.p >= weaker.thr) == y))
    assert wc["auc_paired_bootstrap"]["difference"] > 0 and wc["mcnemar"]["a_only_correct"] > wc["mcnemar"]["b_only_correct"]
    text = to_markdown(lesion_blocks({"lesion_evidence": block}))
    assert "without the candidate stage (v2)" in text and "with − without the candidate stage" in text
    assert "evaluated at 10% prevalence (classifier + lesion evidence)" in text
    assert "Calibration of the fused arm's out-of-fold probabilities" in text
