"""Class imbalance and the ablation, from out-of-fold predictions: PR curves and PR AUC at the data's prevalence
and at a target prevalence (10 %), sensitivity at fixed specificity, predictive values at the operating point,
calibration before and after, and image-only against image + clinical on the same folds with paired tests.

Target prevalence by reweighting, not by discarding cases: each negative of the pooled test folds counts
w = (1 − π)/π · n_pos/n_neg times (π the target prevalence), so the weighted test set has prevalence π. That is
the expectation of resampling the negatives to prevalence π (with replacement) and keeps every positive.
Sensitivity and specificity, and so the ROC curve, do not depend on prevalence; precision (PPV), NPV and the PR
curve do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from training import stats
from training.calibration import ece

TARGET_PREVALENCE = 0.10
FIXED_SPECIFICITIES = (0.90, 0.95)
PR_POINTS = 101  # recall grid of the stored PR curves


def negative_weight(y: np.ndarray, prevalence: float) -> float:
    """The weight per negative that gives the labels ``y`` the ``prevalence`` (1 when a class is absent)."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if not (0 < prevalence < 1):
        raise ValueError(f"prevalence must lie in (0, 1), got {prevalence}")
    return (1 - prevalence) / prevalence * n_pos / n_neg if n_pos and n_neg else 1.0


def pr_curve(y: np.ndarray, p: np.ndarray, w_neg: float = 1.0) -> dict[str, Any]:
    """Weighted PR curve (on a recall grid, the interpolated precision: the best precision at recall ≥ r) and PR
    AUC as average precision (the step-wise integral, no interpolation)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if len(np.unique(y)) < 2:
        return {"pr_auc": float("nan"), "recall": [], "precision": []}
    w = np.where(y == 1, 1.0, w_neg)
    prec, rec, _ = precision_recall_curve(y, p, sample_weight=w)
    grid = np.linspace(0, 1, PR_POINTS)
    interp = np.array([prec[rec >= r - 1e-12].max() for r in grid])  # the best precision at recall ≥ r
    return {"pr_auc": float(average_precision_score(y, p, sample_weight=w)), "recall": grid.round(4).tolist(),
            "precision": interp.round(4).tolist()}


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> dict[str, float]:
    """The highest sensitivity with specificity ≥ ``specificity`` on (y, p), and its threshold (chosen on these
    test predictions: a description of the curve, not an operating point)."""
    fpr, tpr, thr = stats.roc_curve(y, p)
    ok = fpr <= 1 - specificity + 1e-12
    if not ok.any() or len(np.unique(y)) < 2:
        return {"sensitivity": float("nan"), "threshold": float("nan")}
    i = int(np.argmax(np.where(ok, tpr, -1)))
    return {"sensitivity": float(tpr[i]), "threshold": float(min(thr[i], 1.0))}


def predictive_values(sens: float, spec: float, prevalence: float) -> dict[str, float]:
    """PPV and NPV of a test with ``sens``/``spec`` at ``prevalence`` (Bayes)."""
    tp, fp = sens * prevalence, (1 - spec) * (1 - prevalence)
    tn, fn = spec * (1 - prevalence), (1 - sens) * prevalence
    return {"ppv": tp / (tp + fp) if tp + fp else float("nan"), "npv": tn / (tn + fn) if tn + fn else float("nan")}


def prevalence_block(y: np.ndarray, p: np.ndarray, thr: np.ndarray, *, prevalence: float = TARGET_PREVALENCE,
                     bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """PR curves, PR AUC (bootstrap 95 % CI at ``prevalence``), sensitivity at fixed specificity and the operating
    point's PPV/NPV, at the data's prevalence and at ``prevalence``."""
    from training.evaluate import bootstrap_ci

    observed = float(y.mean()) if len(y) else float("nan")
    w = negative_weight(y, prevalence)
    d = stats.decision_metrics(y, (p >= thr).astype(np.int64))
    at_target = pr_curve(y, p, w)
    ci = bootstrap_ci((y, p), lambda yy, pp: pr_curve(yy, pp, negative_weight(yy, prevalence))["pr_auc"],
                      n=bootstrap, seed=seed)
    return {
        "method": f"negatives of the pooled out-of-fold predictions reweighted by (1 − π)/π · n_pos/n_neg = {w:.3f} "
                  f"to prevalence π = {prevalence:.0%} (the expectation of resampling the negatives; every case "
                  "kept); sensitivity and specificity do not depend on prevalence",
        "target_prevalence": prevalence,
        "observed_prevalence": observed,
        "negative_weight": w,
        "pr_observed": pr_curve(y, p),
        "pr_target": {**at_target, "pr_auc_ci95": list(ci)},
        "sensitivity_at_specificity": {f"{s:.2f}": sensitivity_at_specificity(y, p, s) for s in FIXED_SPECIFICITIES},
        "operating_point": {"sensitivity": d["sensitivity"], "specificity": d["specificity"],
                            "observed": predictive_values(d["sensitivity"], d["specificity"], observed),
                            "target": predictive_values(d["sensitivity"], d["specificity"], prevalence)},
    }


def calibration_comparison(y: np.ndarray, p_raw: np.ndarray, p: np.ndarray,
                           fold_cal: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """ECE and Brier of the out-of-fold probabilities before and after each fold's calibration, and the folds'
    temperatures and validation ECEs."""
    temps = [c.get("temperature") for c in fold_cal if c]
    return {
        "method": "temperature scaling per fold, fitted on that fold's inner validation split" if temps else "none",
        "ece_before": ece(y, p_raw), "ece_after": ece(y, p),
        "brier_before": stats.brier(y, p_raw), "brier_after": stats.brier(y, p),
        "fold_temperatures": temps,
        "fold_validation_ece": [[c.get("validation_ece_before"), c.get("validation_ece_after")]
                                for c in fold_cal if c],
    }


def _paired_auc(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap of AUC(a) − AUC(b): the same case resamples for both arms; two-sided p from the share of
    resampled differences on the far side of 0, with ``p_at_floor`` when none is (p is then only known to lie
    below ``p_floor`` = 2/(B + 1))."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(stats.roc_auc(y[i], a[i]) - stats.roc_auc(y[i], b[i]))
    d = np.array(diffs)
    if not len(d):
        return {"difference": float("nan"), "ci95": [float("nan")] * 2, "p_value": float("nan"),
                "p_floor": float("nan"), "p_at_floor": False, "resamples": 0}
    # (k + 1) / (B + 1): with B resamples no p below 2 / (B + 1) is resolved (all on one side is not p = 0), so a
    # p at that floor is an upper bound ("p < 2/(B + 1)"), not a measured value
    far = min(int((d <= 0).sum()), int((d >= 0).sum()))
    floor = 2 / (len(d) + 1)
    return {"difference": stats.roc_auc(y, a) - stats.roc_auc(y, b),
            "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "p_value": min(1.0, 2 * (far + 1) / (len(d) + 1)), "p_floor": floor, "p_at_floor": far == 0,
            "resamples": int(len(d))}


def _arm(y: np.ndarray, p: np.ndarray, thr: np.ndarray, fold_of: np.ndarray, *, bootstrap: int,
         seed: int) -> dict[str, Any]:
    """One arm's pooled metrics with their bootstrap 95 % CIs (``ci95``, the headline's method), ROC AUC and the
    accuracy of each fold."""
    from training.crossval.metrics import ci_block

    pred = (p >= thr).astype(np.int64)
    folds = [stats.decision_metrics(y[fold_of == k], pred[fold_of == k])["accuracy"] for k in np.unique(fold_of)]
    return {**stats.decision_metrics(y, pred), "roc_auc": stats.roc_auc(y, p), "brier": stats.brier(y, p),
            "accuracy_over_folds": stats.mean_sd(folds), "fold_accuracy": folds,
            "ci95": ci_block(y, pred, p, bootstrap, seed)}


def paired_arms(y: np.ndarray, fold_of: np.ndarray, a: tuple[str, np.ndarray, np.ndarray],
                b: tuple[str, np.ndarray, np.ndarray], *, bootstrap: int, seed: int) -> dict[str, Any]:
    """Two arms on the same cases and folds, each (name, probabilities, thresholds): both arms' metrics with
    bootstrap CIs, the paired bootstrap of AUC(a) − AUC(b) and McNemar on the decisions (a's correct-only count
    first)."""
    (na, pa, ta), (nb, pb, tb) = a, b
    return {
        "arms": {na: _arm(y, pa, ta, fold_of, bootstrap=bootstrap, seed=seed),
                 nb: _arm(y, pb, tb, fold_of, bootstrap=bootstrap, seed=seed)},
        "auc_paired_bootstrap": _paired_auc(y, pa, pb, bootstrap, seed),
        "mcnemar": stats.mcnemar((pa >= ta) == (y == 1), (pb >= tb) == (y == 1)),
    }


def ablation_block(y: np.ndarray, fold_of: np.ndarray, fused: tuple[np.ndarray, np.ndarray],
                   image_only: tuple[np.ndarray, np.ndarray], *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Image + clinical (``fused``: probabilities, thresholds) against image only on the same folds, seeds and
    inner splits: both arms' metrics, the paired bootstrap of the AUC difference and McNemar on the decisions."""
    return {
        **paired_arms(y, fold_of, ("image_clinical", *fused), ("image_only", *image_only), bootstrap=bootstrap,
                      seed=seed),
        "explanation": "Both arms train on the same folds, inner splits and seeds; the image-only arm sees every "
        "clinical input as missing. The paired bootstrap resamples cases and recomputes both AUCs on each "
        "resample (difference image + clinical − image only); McNemar counts the cases one arm gets right "
        "and the other wrong.",
    }
