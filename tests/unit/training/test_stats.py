"""training.stats against independent computations: scikit-learn, scipy's binomtest, the chi-square formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from training import stats


def _sample(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    p[:20] = np.round(p[:20], 1)  # ties
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decision_metrics_match_sklearn(seed: int) -> None:
    y, p = _sample(seed)
    pred = (p >= 0.5).astype(int)
    m = stats.decision_metrics(y, pred)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert stats.confusion(y, pred) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_roc_curve_match_sklearn(seed: int) -> None:
    y, p = _sample(seed)
    assert stats.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
    fpr, tpr, thr = stats.roc_curve(y, p)
    s_fpr, s_tpr, s_thr = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)
    np.testing.assert_allclose(thr[1:], s_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.roc_auc_score(y, p))


def test_youden_threshold_maximises_j() -> None:
    y, p = _sample(3)
    t = stats.youden_threshold(y, p)
    j = stats.decision_metrics(y, p >= t)
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert j["sensitivity"] + j["specificity"] - 1 == pytest.approx(float(np.max(tpr - fpr)))


def test_brier_and_kappa_match_sklearn() -> None:
    y, p = _sample(4)
    assert stats.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2, 150)
    b = np.where(rng.random(150) < 0.8, a, 1 - a)
    assert stats.cohen_kappa(a, b) == pytest.approx(skm.cohen_kappa_score(a, b))
    assert stats.cohen_kappa(a, a) == pytest.approx(1.0)


def test_reliability_bins_match_sklearn_calibration_curve() -> None:
    from sklearn.calibration import calibration_curve

    y, p = _sample(6, 400)
    p = p[20:] * 0.999 + 0.0003  # no score exactly on a bin edge: sklearn closes bins on the right, we on the left
    y = y[20:]
    r = stats.reliability(y, p, bins=10)
    obs, pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    nonempty = [i for i, c in enumerate(r["count"]) if c > 0]
    np.testing.assert_allclose(np.array(r["observed"])[nonempty], obs)
    np.testing.assert_allclose(np.array(r["mean_predicted"])[nonempty], pred)
    assert sum(r["count"]) == len(y)
    ece = sum(c / len(y) * abs(o - m) for c, o, m in zip(r["count"], r["observed"], r["mean_predicted"], strict=True) if c)
    assert r["ece"] == pytest.approx(ece)


@pytest.mark.parametrize(("b", "c"), [(3, 9), (0, 5), (7, 7), (30, 12)])
def test_mcnemar_against_binomtest_and_chi2_formula(b: int, c: int) -> None:
    both, neither = 50, 10
    a = np.r_[np.ones(both), np.ones(b), np.zeros(c), np.zeros(neither)].astype(int)
    r = np.r_[np.ones(both), np.zeros(b), np.ones(c), np.zeros(neither)].astype(int)
    m = stats.mcnemar(a, r)
    assert (m["a_only_correct"], m["b_only_correct"], m["both_correct"], m["both_wrong"]) == (b, c, both, neither)
    assert m["p_exact"] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue)
    chi2 = max(0, abs(b - c) - 1) ** 2 / (b + c)  # clipped at 0 when b == c (statsmodels does not clip)
    assert m["chi2_cc"] == pytest.approx(chi2)
    assert m["p_chi2_cc"] == pytest.approx(math.erfc(math.sqrt(chi2 / 2)))  # chi-square 1 df survival
    assert m["method"] == ("exact binomial" if b + c < 25 else "chi-square with continuity correction")


def test_mcnemar_without_discordant_pairs() -> None:
    m = stats.mcnemar([1, 0, 1], [1, 0, 1])
    assert m["discordant"] == 0 and m["p_value"] == 1.0


def test_paired_ttest_matches_scipy() -> None:
    a = np.array([0.91, 0.88, 0.93, 0.90, 0.86, 0.92, 0.89, 0.94, 0.90, 0.87])
    b = np.array([0.85, 0.87, 0.88, 0.86, 0.84, 0.90, 0.85, 0.89, 0.88, 0.86])
    r = stats.paired_ttest(a, b)
    ref = sps.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic)
    assert r["p_value"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval()
    assert r["ci95"] == pytest.approx([ci.low, ci.high])
    corr = stats.corrected_paired_ttest(a, b, n_train=720, n_test=80)
    d = a - b
    t = d.mean() / math.sqrt((1 / 10 + 80 / 720) * d.var(ddof=1))
    assert corr["t"] == pytest.approx(t)
    assert corr["p_value"] > r["p_value"]  # the correction only ever widens


def test_undefined_values_are_nan_not_zero() -> None:
    assert math.isnan(stats.roc_auc([1, 1], [0.2, 0.4]))
    assert math.isnan(stats.decision_metrics([0, 0], [0, 0])["sensitivity"])
    assert math.isnan(stats.paired_ttest([0.9, 0.9], [0.8, 0.8])["t"])
    assert stats.mean_sd([1.0, float("nan"), 3.0]) == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2)), "n": 2}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="0 and 1"):
        stats.confusion([0, 2], [0, 1])
    with pytest.raises(ValueError, match="length"):
        stats.roc_auc([0, 1, 1], [0.1, 0.2])
