"""Metrics and paired tests for a binary classifier against a reader, in plain numpy/scipy.

Every function takes 1-D arrays (labels 0/1, probabilities in [0, 1], decisions 0/1) and returns floats or small
dicts of floats; undefined values (a class absent, a zero denominator) are ``nan``, never a silent 0. Raises
``ValueError`` for arrays of different lengths or labels outside {0, 1}. Checked against scikit-learn and a
hand-computed exact binomial in ``tests/unit/training/test_stats.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps

NAN = float("nan")
MCNEMAR_EXACT_BELOW = 25  # discordant pairs: below this the exact binomial test, at or above the chi-square


def _binary(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x).reshape(-1)
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return a.astype(np.int64)


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays differ in length: {lengths}")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else NAN


def confusion(y: Any, pred: Any) -> dict[str, int]:
    """Counts tp, fp, tn, fn of decisions ``pred`` against labels ``y``."""
    yt, yp = _binary("y", y), _binary("pred", pred)
    _same_length(y=yt, pred=yp)
    return {
        "tp": int(((yt == 1) & (yp == 1)).sum()),
        "fp": int(((yt == 0) & (yp == 1)).sum()),
        "tn": int(((yt == 0) & (yp == 0)).sum()),
        "fn": int(((yt == 1) & (yp == 0)).sum()),
    }


def decision_metrics(y: Any, pred: Any) -> dict[str, float]:
    """Accuracy, sensitivity (recall), specificity, precision (PPV), NPV and F1 of decisions ``pred``."""
    c = confusion(y, pred)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counted half."""
    yt, s = _binary("y", y), np.asarray(p, dtype=np.float64).reshape(-1)
    _same_length(y=yt, p=s)
    n_pos, n_neg = int(yt.sum()), int((1 - yt).sum())
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = sps.rankdata(s)  # average ranks handle ties (Mann-Whitney U)
    u = ranks[yt == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) at threshold +inf to (1, 1)."""
    yt, s = _binary("y", y), np.asarray(p, dtype=np.float64).reshape(-1)
    _same_length(y=yt, p=s)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], yt[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1] if len(s_sorted) else np.array([], int)
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = int(yt.sum()), int((1 - yt).sum())
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(len(fps) + 1, NAN)
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(len(tps) + 1, NAN)
    return fpr, tpr, np.r_[np.inf, s_sorted[last_of_run]]


def youden_threshold(y: Any, p: Any) -> float:
    """The score threshold maximising sensitivity + specificity (0.5 when a class is absent)."""
    fpr, tpr, thr = roc_curve(y, p)
    if not np.isfinite(tpr).all() or not np.isfinite(fpr).all():
        return 0.5
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thr[best])


def brier(y: Any, p: Any) -> float:
    """Brier score: mean squared difference between probability and outcome (0 best, 0.25 = coin at 0.5)."""
    yt, s = _binary("y", y), np.asarray(p, dtype=np.float64).reshape(-1)
    _same_length(y=yt, p=s)
    return float(np.mean((s - yt) ** 2)) if len(yt) else NAN


def reliability(y: Any, p: Any, bins: int = 10) -> dict[str, Any]:
    """Equal-width reliability bins [lo, hi) over [0, 1] (the last closed) and the expected calibration error.

    Returns ``edges`` (bins + 1), and per bin ``count``, ``mean_predicted`` and ``observed`` (share of
    positives; ``nan`` for an empty bin), plus ``ece`` = Σ count/n · |observed − mean_predicted|.
    """
    yt, s = _binary("y", y), np.asarray(p, dtype=np.float64).reshape(-1)
    _same_length(y=yt, p=s)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=s, minlength=bins)
    sum_y = np.bincount(idx, weights=yt, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        obs = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    n = max(1, len(yt))
    ece = float(np.nansum(count / n * np.abs(obs - mean_p)))
    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "mean_predicted": [float(v) for v in mean_p],
        "observed": [float(v) for v in obs],
        "ece": ece,
    }


def cohen_kappa(a: Any, b: Any) -> float:
    """Cohen's kappa between two raters' binary decisions: (p_o − p_e) / (1 − p_e)."""
    x, z = _binary("a", a), _binary("b", b)
    _same_length(a=x, b=z)
    if not len(x):
        return NAN
    p_o = float(np.mean(x == z))
    pa, pb = float(x.mean()), float(z.mean())
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return _ratio(p_o - p_e, 1.0 - p_e) if p_e < 1.0 else NAN


def mcnemar(correct_a: Any, correct_b: Any, *, exact_below: int = MCNEMAR_EXACT_BELOW) -> dict[str, Any]:
    """McNemar's test of paired correctness (same cases, two raters).

    ``b`` = cases only A got right, ``c`` = cases only B got right. Returns both the exact two-sided binomial
    p-value (b ~ Bin(b + c, 1/2)) and the chi-square with continuity correction ((|b − c| − 1)² / (b + c), 1 df),
    and ``p_value``/``method`` for the one chosen: exact when b + c < ``exact_below``.
    """
    a, b_ = _binary("correct_a", correct_a), _binary("correct_b", correct_b)
    _same_length(correct_a=a, correct_b=b_)
    b = int(((a == 1) & (b_ == 0)).sum())
    c = int(((a == 0) & (b_ == 1)).sum())
    n = b + c
    if n == 0:
        p_exact, chi2, p_chi2 = 1.0, 0.0, 1.0
    else:
        p_exact = float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), n, 0.5)))
        chi2 = float((abs(b - c) - 1) ** 2 / n) if abs(b - c) >= 1 else 0.0
        p_chi2 = float(sps.chi2.sf(chi2, 1))
    exact = n < exact_below
    return {
        "a_only_correct": b,
        "b_only_correct": c,
        "both_correct": int(((a == 1) & (b_ == 1)).sum()),
        "both_wrong": int(((a == 0) & (b_ == 0)).sum()),
        "discordant": n,
        "p_exact": p_exact,
        "chi2_cc": chi2,
        "p_chi2_cc": p_chi2,
        "method": "exact binomial" if exact else "chi-square with continuity correction",
        "p_value": p_exact if exact else p_chi2,
    }


def paired_ttest(a: Any, b: Any) -> dict[str, Any]:
    """Student's paired t-test of a − b (e.g. per-fold accuracies): mean difference, its 95 % CI, t, df, p."""
    x, z = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    _same_length(a=x, b=z)
    d = x - z
    k = len(d)
    if k < 2:
        return {"mean_difference": float(d.mean()) if k else NAN, "ci95": [NAN, NAN], "t": NAN, "df": NAN, "p_value": NAN}
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return {"mean_difference": mean, "ci95": [mean, mean], "t": NAN, "df": float(k - 1), "p_value": NAN}
    se = sd / math.sqrt(k)
    t = mean / se
    q = float(sps.t.ppf(0.975, k - 1))
    return {
        "mean_difference": mean,
        "ci95": [mean - q * se, mean + q * se],
        "t": float(t),
        "df": float(k - 1),
        "p_value": float(2.0 * sps.t.sf(abs(t), k - 1)),
    }


def corrected_paired_ttest(a: Any, b: Any, n_train: float, n_test: float) -> dict[str, float]:
    """Nadeau & Bengio's corrected resampled t-test: the variance of the per-fold differences is inflated by
    (1/k + n_test/n_train) instead of 1/k, because folds share most of their training data."""
    x, z = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    _same_length(a=x, b=z)
    d = x - z
    k = len(d)
    if k < 2 or n_train <= 0:
        return {"mean_difference": float(d.mean()) if k else NAN, "t": NAN, "df": NAN, "p_value": NAN}
    var = float(d.var(ddof=1))
    mean = float(d.mean())
    if var == 0.0:
        return {"mean_difference": mean, "t": NAN, "df": float(k - 1), "p_value": NAN}
    t = mean / math.sqrt((1.0 / k + n_test / n_train) * var)
    return {"mean_difference": mean, "t": float(t), "df": float(k - 1), "p_value": float(2.0 * sps.t.sf(abs(t), k - 1))}


def mean_sd(values: Any) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1) of finite values, with their count."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    return {
        "mean": float(v.mean()) if len(v) else NAN,
        "sd": float(v.std(ddof=1)) if len(v) > 1 else NAN,
        "n": int(len(v)),
    }

