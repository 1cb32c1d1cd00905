"""The numbers of a cross-validation: per-fold, mean ± SD and pooled metrics with bootstrap CIs, the model-vs-reader
tests, subgroups and attention hits, assembled into ``metrics.json``'s content."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from models.preprocess import PreprocessConfig
from training import stats
from training.common import NOT_FOR_CLINICAL_USE
from training.crossval.folds import FoldResults
from training.crossval.imbalance import ablation_block, calibration_comparison, prevalence_block
from training.crossval.outputs import json_default
from training.crossval.settings import BOOTSTRAP, EvaluateSettings, settings_dict
from training.dataset import Dataset
from training.prepared import Prepared
from training.train import ClassifierSettings

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def reader_labels(ds: Dataset) -> np.ndarray:
    """The reader's 0/1 per case, -1 where the table has no reader diagnosis."""
    return np.array([-1 if c.reader_label is None else c.reader_label for c in ds.cases], dtype=np.int64)


def _decision_block(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    return {**stats.decision_metrics(y, pred), "confusion": stats.confusion(y, pred), "n": int(len(y))}


def ci_block(y: np.ndarray, pred: np.ndarray, p: np.ndarray | None, n: int, seed: int) -> dict[str, list[float]]:
    """Percentile bootstrap 95 % CIs (``n`` case resamples) of the decision metrics, and of ROC AUC and Brier
    with probabilities ``p``: the report's interval for every pooled arm."""
    from training.evaluate import bootstrap_ci

    def dm(k: str) -> Callable[..., float]:
        return lambda yy, dd, *_: stats.decision_metrics(yy, dd)[k]

    funcs: dict[str, Callable[..., float]] = {k: dm(k) for k in METRICS}
    arrays: tuple[np.ndarray, ...] = (y, pred.astype(np.int64))
    if p is not None:
        funcs["roc_auc"] = lambda yy, _dd, pp: stats.roc_auc(yy, pp)
        funcs["brier"] = lambda yy, _dd, pp: stats.brier(yy, pp)
        arrays = (*arrays, p)
    # Same seed for every statistic: the CIs come from the same case resamples.
    return {k: list(bootstrap_ci(arrays, f, n=n, seed=seed)) for k, f in funcs.items()}


def explanations(folds: int) -> dict[str, str]:
    """One sentence per test on what it does and does not show."""
    return {
        "mcnemar": "McNemar's test asks whether the model and the reader are wrong on different numbers of the same "
        "cases (only the discordant cases count); it does not say which errors matter clinically, and on pooled "
        f"out-of-fold predictions it treats the {folds} fold models as one model.",
        "kappa": "Cohen's kappa measures how far model and reader decisions agree beyond chance; high agreement "
        "does not mean either is right, and kappa depends on the prevalence.",
        "paired_ttest": "The paired t-test (the study's test) compares mean per-fold accuracies of model and "
        f"reader; the {folds} folds share most of their training data and each holds only 1/{folds} of the cases, "
        "so its p-value is too small (Dietterich 1998), and it ignores which cases each got right.",
        "corrected_ttest": "Nadeau and Bengio's corrected t-test inflates the fold variance by n_test/n_train for "
        "the overlap between training sets; it is the more honest version of the same fold-level comparison.",
    }


def _fold_rows(y: np.ndarray, p: np.ndarray, pred: np.ndarray, thr: np.ndarray, fold_of: np.ndarray,
               reader: np.ndarray) -> list[dict[str, Any]]:
    """One row of metrics per fold, the reader's beside the model's (None without reader labels in the fold)."""
    has_r = reader >= 0
    folds = []
    for k in np.unique(fold_of):
        m = fold_of == k
        f: dict[str, Any] = {"fold": int(k), "n_test": int(m.sum()), "pneumonia_test": int(y[m].sum()),
                             "threshold": float(thr[m][0]), **stats.decision_metrics(y[m], pred[m]),
                             "roc_auc": stats.roc_auc(y[m], p[m]), "brier": stats.brier(y[m], p[m])}
        mr = m & has_r
        f["reader"] = stats.decision_metrics(y[mr], reader[mr]) if mr.any() else None
        folds.append(f)
    return folds


def _comparison(y: np.ndarray, pred: np.ndarray, reader: np.ndarray, folds: list[dict[str, Any]],
                n_train: list[int] | None) -> dict[str, Any]:
    """The model-vs-reader tests on the cases with a reader label (pooled and per fold)."""
    has_r = reader >= 0
    yr, pr, rr = y[has_r], pred[has_r], reader[has_r]
    acc_m = [f["accuracy"] for f in folds if f["reader"]]
    acc_r = [f["reader"]["accuracy"] for f in folds if f["reader"]]
    n_test = float(np.mean([f["n_test"] for f in folds]))
    return {
        "cases": int(has_r.sum()),
        "mcnemar": stats.mcnemar(pr == yr, rr == yr),
        "kappa_model_reader": stats.cohen_kappa(pr, rr),
        "kappa_model_truth": stats.cohen_kappa(pr, yr),
        "kappa_reader_truth": stats.cohen_kappa(rr, yr),
        "paired_ttest_fold_accuracy": stats.paired_ttest(acc_m, acc_r),
        "corrected_ttest_fold_accuracy": stats.corrected_paired_ttest(
            acc_m, acc_r, n_train=float(np.mean(n_train)) if n_train else float(len(y) - n_test), n_test=n_test
        ),
        "explanations": explanations(len(folds)),
    }


def summarise(
    y: np.ndarray,
    p: np.ndarray,
    thr: np.ndarray,
    fold_of: np.ndarray,
    reader: np.ndarray,
    *,
    bootstrap: int = BOOTSTRAP,
    seed: int = 0,
    n_train: list[int] | None = None,
) -> dict[str, Any]:
    """Per-fold, mean ± SD and pooled metrics of out-of-fold predictions, and the model-vs-reader tests.

    ``thr`` is each case's decision threshold (its fold model's), ``reader`` the reader's 0/1 (-1 = none).
    """
    pred = (p >= thr).astype(np.int64)
    has_r = reader >= 0
    folds = _fold_rows(y, p, pred, thr, fold_of, reader)
    summary = {k: stats.mean_sd([f[k] for f in folds]) for k in (*METRICS, "roc_auc", "brier")}
    reader_summary = (
        {k: stats.mean_sd([f["reader"][k] for f in folds if f["reader"]]) for k in METRICS} if has_r.any() else None
    )
    pooled_model = {**_decision_block(y, pred), "roc_auc": stats.roc_auc(y, p), "brier": stats.brier(y, p),
                    "ci95": ci_block(y, pred, p, bootstrap, seed)}
    out: dict[str, Any] = {
        "folds": folds,
        "summary": {"model": summary, "reader": reader_summary},
        "pooled": {"model": pooled_model, "reader": None},
        "calibration": {"brier": stats.brier(y, p), "reliability": stats.reliability(y, p, bins=10)},
        "comparison": None,
    }
    if has_r.any():
        yr, rr = y[has_r], reader[has_r]
        out["pooled"]["reader"] = {**_decision_block(yr, rr), "ci95": ci_block(yr, rr, None, bootstrap, seed)}
        out["comparison"] = _comparison(y, pred, reader, folds, n_train)
    return out


def proportion(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` as the share, the counts and its Wilson 95 % interval (a subgroup's sensitivity)."""
    from training.evaluate import wilson

    return {"value": k / n if n else float("nan"), "k": int(k), "n": int(n), "ci95": list(wilson(k, n)),
            "ci_method": "Wilson"}


def subgroups(ds: Dataset, y: np.ndarray, pred: np.ndarray, reader: np.ndarray) -> dict[str, Any]:
    """Sensitivity on the table's ``subtle`` pneumonia cases (phantoms mark them), model and reader, each with
    its counts and Wilson 95 % interval (``model``, ``reader``: `proportion`)."""
    flags = [str(c.row.get("subtle", "")).strip() for c in ds.cases]
    if not any(flags):
        return {}
    subtle = np.array([f in ("1", "1.0", "true", "True") for f in flags]) & (y == 1)
    if not subtle.any():
        return {}
    has_r = subtle & (reader >= 0)
    model = proportion(int(pred[subtle].sum()), int(subtle.sum()))
    read = proportion(int((reader[has_r] == 1).sum()), int(has_r.sum())) if has_r.any() else None
    return {"subtle_pneumonia": {
        "cases": int(subtle.sum()),
        "model_sensitivity": model["value"],
        "reader_sensitivity": read["value"] if read else None,
        "model": model,
        "reader": read,
    }}


def attention_hits(prep: Prepared, att: list[np.ndarray | None], s: ClassifierSettings, ds: Dataset) -> dict[str, Any]:
    """Share of pneumonia cases whose top-attention slice holds lesion (needs lesion masks)."""
    if not ds.has_masks:
        return {}
    hits = [bool(c.slice_lesion[int(np.argmax(a))] >= s.min_lesion_px)
            for c, a in zip(prep.cases, att, strict=True) if c.label == 1 and a is not None]
    return {"top_slice_has_lesion": float(np.mean(hits)) if hits else None, "pneumonia_cases": len(hits)}


def protocol(st: EvaluateSettings, cfg: PreprocessConfig) -> dict[str, Any]:
    """How the run split, trained, chose thresholds and resampled, for ``metrics.json``."""
    return {
        "folds": st.folds,
        "seed": st.seed,
        "quick": st.quick,
        "split": "StratifiedGroupKFold (stratified by label, grouped by patient id), shuffled with the seed",
        "inner_validation": f"~{st.val_fraction:.0%} of each training part, patient-grouped, picks the best epoch "
        "and the decision threshold (Youden J); the test fold is predicted once",
        "decision_threshold": "per fold, from that fold's inner validation (0.5 without one)",
        "bootstrap": {"resamples": st.bootstrap, "seed": st.seed, "method": "percentile, case-level, pooled "
                      "out-of-fold predictions, the same resamples for every metric"},
        "fold_seeds": [st.seed + k for k in range(1, st.folds + 1)],
        "preprocessing": cfg.to_dict(),
    }


def build_metrics(st: EvaluateSettings, ds: Dataset, prep: Prepared, s0: ClassifierSettings,
                  res: FoldResults, image_only: FoldResults | None = None) -> dict[str, Any]:
    """``metrics.json``'s content (plain JSON values, deterministic for a seed) from the out-of-fold results, with
    the image-only arm's (``image_only``) for the ablation."""
    y, reader = ds.labels, reader_labels(ds)
    summary = summarise(y, res.p, res.thr, res.fold_of, reader, bootstrap=st.bootstrap, seed=st.seed,
                        n_train=res.n_train)
    for f, info in zip(summary["folds"], res.fold_info, strict=True):
        f.update(info)
    pred = (res.p >= res.thr).astype(np.int64)
    metrics: dict[str, Any] = {
        "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
        "dataset": ds.summary(),
        "protocol": protocol(st, PreprocessConfig(grid=s0.grid)),
        "settings": settings_dict(s0),
        **summary,
        "subgroups": subgroups(ds, y, pred, reader),
        "attention": attention_hits(prep, res.attention, s0, ds),
        "prevalence": prevalence_block(y, res.p, res.thr, prevalence=st.prevalence, bootstrap=st.bootstrap,
                                       seed=st.seed),
        "class_weighting": {"used": s0.class_weighting, "rule": "series loss weights 0.5/π_train for pneumonia and "
                            "0.5/(1 − π_train) for normal (π_train: the fold's training prevalence)"
                            if s0.class_weighting else "none (plain BCE)"},
        "ablation": ablation_block(y, res.fold_of, (res.p, res.thr), (image_only.p, image_only.thr),
                                   bootstrap=st.bootstrap, seed=st.seed) if image_only is not None else None,
    }
    metrics["calibration"]["before_after"] = calibration_comparison(y, res.p_raw, res.p, res.calibration)
    return dict(json.loads(json.dumps(metrics, default=json_default)))  # plain floats, stable for comparisons
