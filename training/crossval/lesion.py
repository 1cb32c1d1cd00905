"""The lesion-evidence arm of the evaluation: the fold's classifier probability fused with what the segmenter sees.

The classifier misses small faint lesions (its 128² grid and attention pooling dilute a few pixels); the U-Net,
trained on pixel masks, still marks many of them. This arm asks how much a late fusion of the two would gain,
without retraining anything:

* **Features** (:func:`segmenter_features`, computed by `models.lesion_evidence` as the node computes them): the
  segmenter under ``weights_dir`` (the shipped one by default: trained on its own phantoms, never on the
  evaluation's cases — the report names its version and training data) runs over every case on the model grid and
  every feature of every set is pooled per series (`models.lesion_evidence.ALL_FEATURES`), and where
  ``weights_dir`` holds a candidate model trained over that segmenter (`models.candidates`, trained on other
  phantoms again), it scores each case's candidates. The arm uses the newest set the models allow: v3 (graded lesion
  probabilities — top-k means, pixels at p ≥ 0.3 and ≥ 0.1, summed probability, slices at p ≥ 0.3 — plus the
  largest candidate score and the count of candidates scoring ≥ 0.5), else v2 without a candidate model. Cached
  beside the array cache, keyed by the models' weights and the cases.
* **Fusion** (:func:`fuse_folds`), in two stages, because the segmenter's features may use more cases than the
  classifier's logit may: (1) a logistic regression (scikit-learn, C = 1) of the label on the segmenter's features
  over the fold's **fit cases** (the segmenter never saw them, so its features there are not optimistic; the
  fold's classifier trained on them, so its logit there would be); (2) a logistic regression (C = 1) on the fold's
  **validation split** over the fold model's calibrated logit and stage 1's score, and the threshold by Youden's J
  on the same split, as the classifier's own threshold is chosen. Both stages are linear, so the fold's fusion is
  one logistic regression over the logit and the features (its coefficients are recorded) — the form a shipped
  classifier version applies. The test fold is touched only to be scored. A fold whose validation split holds
  fewer than `MIN_PER_CLASS` cases of either class cannot be fitted; then the arm is skipped with that reason.

The fusion a shipped classifier version applies (`models.lesion_evidence.LesionFusion`, fitted by
`training.lesion_fusion`) has this form; the arm measures it under the cross-validation protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.lesion_evidence import (
    ALL_FEATURES,
    CANDIDATE_FEATURES,
    CLASSIFIER_TERM,
    FEATURE_SETS,
    FEATURES,
    WITHOUT_CANDIDATES,
    LesionEvidence,
    map_evidence,
    newest_set,
)
from models.lesion_evidence import logit as _logit
from training.prepared import Prepared

MIN_PER_CLASS = 5  # validation cases of each class a fold needs for the fusion to be fitted
WITHOUT_CANDIDATES_ARM = "lesion_evidence_without_candidates"  # the same fusion over feature set v2
COLUMNS = ALL_FEATURES + CANDIDATE_FEATURES  # the cached values' columns (candidate ones NaN without a model)


@dataclass(frozen=True)
class SegmenterFeatures:
    """Per-case features (cases, len(COLUMNS)), which segmenter made them (name, version, its training data) and
    which candidate model scored the candidates (None: none did), how long computing them took and whether this
    run read them from the cache."""

    values: np.ndarray
    segmenter: dict[str, Any]
    seconds: float
    from_cache: bool
    candidates: dict[str, Any] | None = None

    @property
    def feature_set(self) -> str:
        return newest_set(self.candidates is not None)

    @property
    def names(self) -> tuple[str, ...]:
        return FEATURE_SETS[self.feature_set]

    def of(self, names: tuple[str, ...] | None = None) -> np.ndarray:
        """The columns of ``names`` (default: the arm's set, `names`) (cases, len(names))."""
        return self.values[:, [COLUMNS.index(n) for n in (names or self.names)]]


def segmenter_features(prep: Prepared, weights_dir: str | Path | None, cache_dir: Path,
                       log: Callable[[str], None] = print, version: str | None = None) -> SegmenterFeatures | str:
    """Features of every prepared case, or the reason they cannot be made (no segmenter, another grid)."""
    import hashlib
    import json
    import time

    from models.candidates import lesion_in_lungs
    from models.preprocess import window
    from models.registry import Registry, RegistryError

    registry = Registry(Path(weights_dir) if weights_dir else None)
    try:
        seg = registry.segmenter(version)
    except RegistryError as exc:
        return f"no segmenter to run ({exc})"
    grid = prep.cases[0].hu.shape[-1] if prep.cases else 0
    if seg.preprocess.grid != grid:
        return f"the segmenter {seg.version} works on a {seg.preprocess.grid}² grid, the evaluation on {grid}²"
    card = seg.card
    about = {"name": card.get("name"), "version": seg.version,
             "training_data": (card.get("training") or {}).get("data")}
    cand = registry.candidates_over(seg)
    cand_about = ({"name": cand.name, "version": cand.version, "training_data": cand.card["training"].get("data")}
                  if cand is not None else None)
    key = hashlib.sha256(json.dumps([card.get("files"), prep.key, COLUMNS, cand.card.get("files") if cand else None],
                                    sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"lesion-{seg.version}-{key[:20]}.npz"  # the weights' sha256 and the cases
    t0 = time.perf_counter()
    if path.is_file():
        with np.load(path) as cached:
            if cached["values"].shape == (len(prep.cases), len(COLUMNS)):
                took = float(cached["seconds"]) if "seconds" in cached.files else time.perf_counter() - t0
                return SegmenterFeatures(cached["values"], about, took, True, cand_about)
    values = np.full((len(prep.cases), len(COLUMNS)), np.nan)
    names = COLUMNS if cand is not None else ALL_FEATURES  # COLUMNS begins with ALL_FEATURES
    for i, case in enumerate(prep.cases):
        x = window(case.hu.astype(np.float32), seg.preprocess)
        lp = lesion_in_lungs(seg.grid_probabilities(x))
        evidence = LesionEvidence(map_evidence(lp), (seg.name, seg.version), grid, seg.candidate_evidence(cand, x, lp))
        values[i, : len(names)] = evidence.features(names)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, values=values, seconds=np.float64(seconds))
    tmp.replace(path)
    log(f"lesion evidence: segmenter {seg.version}"
        + (f" and candidate model {cand.version}" if cand is not None else "")
        + f" over {len(prep.cases)} cases in {seconds:.0f} s")
    return SegmenterFeatures(values, about, seconds, False, cand_about)


@dataclass(frozen=True)
class Fused:
    """The arm's out-of-fold probabilities and thresholds, and each fold's fitted model (for the report)."""

    p: np.ndarray
    thr: np.ndarray
    folds: list[dict[str, Any]]


def fuse_folds(y: np.ndarray, fold_of: np.ndarray, p: np.ndarray, validation: dict[int, tuple[np.ndarray, np.ndarray]],
               features: np.ndarray, names: tuple[str, ...] = FEATURES) -> Fused | str:
    """Fit each fold's fusion (its fit cases, then its validation split) and score its test cases (see the module
    docstring).

    ``p``: the main arm's calibrated out-of-fold probabilities; ``validation[k]``: (case indices, the fold-k
    model's calibrated probabilities on them); ``features``: every case's columns of the feature set ``names``
    (`SegmenterFeatures.of`, `SegmenterFeatures.names`); a fold's fit cases are the cases outside fold k and its validation split. Returns the
    reason instead when a fold cannot be fitted."""
    from sklearn.linear_model import LogisticRegression

    from training.common import youden_threshold

    out_p, out_thr, folds = np.full(len(y), np.nan), np.full(len(y), np.nan), []
    for k in sorted(validation):
        idx, pv = validation[k]
        yv = y[idx]
        if min(int((yv == 1).sum()), int((yv == 0).sum())) < MIN_PER_CLASS:
            return (f"fold {k}'s validation split holds {int((yv == 1).sum())} pneumonia and {int((yv == 0).sum())} "
                    f"normal cases; the fusion needs at least {MIN_PER_CLASS} of each")
        fit_idx = np.setdiff1d(np.flatnonzero(fold_of != k), idx)
        if len(np.unique(y[fit_idx])) < 2:
            return f"fold {k}'s fit cases hold one class only"
        stage1 = LogisticRegression(C=1.0, max_iter=5000).fit(features[fit_idx], y[fit_idx])
        stage2 = LogisticRegression(C=1.0, max_iter=2000).fit(
            np.column_stack([_logit(pv), stage1.decision_function(features[idx])]), yv)
        (a, d), b2 = stage2.coef_[0], float(stage2.intercept_[0])
        coefficients = {CLASSIFIER_TERM: float(a), **{n: float(d * w) for n, w in zip(names, stage1.coef_[0],
                                                                                    strict=True)}}
        intercept = b2 + float(d * stage1.intercept_[0])

        def fused(pk: np.ndarray, fk: np.ndarray, c: dict[str, float] = coefficients, b: float = intercept) -> np.ndarray:
            z = b + c[CLASSIFIER_TERM] * _logit(pk) + fk @ np.array([c[n] for n in names])
            return np.asarray(1.0 / (1.0 + np.exp(-z)))

        thr = youden_threshold(yv.tolist(), fused(pv, features[idx]).tolist())
        test = np.flatnonzero(fold_of == k)
        out_p[test] = fused(p[test], features[test])
        out_thr[test] = thr
        folds.append({"fold": k, "fit_cases": int(len(fit_idx)), "validation_cases": int(len(idx)),
                      "threshold": float(thr), "intercept": intercept, "coefficients": coefficients,
                      "stage2": {"classifier_logit": float(a), "segmenter_score": float(d), "intercept": b2}})
    return Fused(out_p, out_thr, folds)


def lesion_block(ds: Any, y: np.ndarray, fold_of: np.ndarray, main: tuple[np.ndarray, np.ndarray], fused: Fused,
                 feats: SegmenterFeatures, *, bootstrap: int, seed: int,
                 without_candidates: Fused | None = None) -> dict[str, Any]:
    """``metrics.json``'s ``lesion_evidence``: both arms (bootstrap CIs), the paired tests, subtle-lesion
    sensitivity of each (``subtle``: counts and Wilson CI), the segmenter used and each fold's fitted fusion; the
    fused arm's own 10 % prevalence table and calibration (the report's headline model); and, with
    ``without_candidates`` (the same fusion over feature set v2), that arm and the paired tests of the candidate
    stage's gain."""
    from training import stats
    from training.calibration import ece
    from training.crossval.imbalance import paired_arms, prevalence_block
    from training.crossval.metrics import reader_labels, subgroups

    arms = {"lesion_evidence": (fused.p, fused.thr), "classifier": main}
    if without_candidates is not None:
        arms[WITHOUT_CANDIDATES_ARM] = (without_candidates.p, without_candidates.thr)
    reader = reader_labels(ds)
    sub_of = {name: (subgroups(ds, y, (p >= t).astype(np.int64), reader).get("subtle_pneumonia") or {})
              .get("model") for name, (p, t) in arms.items()}
    sub = {name: s["value"] if s else None for name, s in sub_of.items()}
    paired = paired_arms(y, fold_of, ("lesion_evidence", fused.p, fused.thr), ("classifier", *main),
                         bootstrap=bootstrap, seed=seed)
    extra: dict[str, Any] = {}
    if without_candidates is not None:
        gain = paired_arms(y, fold_of, ("lesion_evidence", fused.p, fused.thr),
                           (WITHOUT_CANDIDATES_ARM, without_candidates.p, without_candidates.thr),
                           bootstrap=bootstrap, seed=seed)
        extra["without_candidates"] = {
            "feature_set": WITHOUT_CANDIDATES, "arm": gain["arms"][WITHOUT_CANDIDATES_ARM],
            "subtle_sensitivity": sub[WITHOUT_CANDIDATES_ARM], "subtle": sub_of[WITHOUT_CANDIDATES_ARM],
            "auc_paired_bootstrap": gain["auc_paired_bootstrap"],
            "mcnemar": gain["mcnemar"], "folds": without_candidates.folds}
    return {
        "arms": {name: paired["arms"][name] for name in ("classifier", "lesion_evidence")},
        "subtle_sensitivity": {name: sub[name] for name in ("classifier", "lesion_evidence")},
        "subtle": {name: sub_of[name] for name in ("classifier", "lesion_evidence")},  # counts, Wilson 95 % CI
        "auc_paired_bootstrap": paired["auc_paired_bootstrap"],
        "mcnemar": paired["mcnemar"],
        **extra,
        "prevalence": prevalence_block(y, fused.p, fused.thr, bootstrap=bootstrap, seed=seed),
        "calibration": {"ece": ece(y, fused.p), "brier": stats.brier(y, fused.p),
                        "method": "none after the fusion: its logistic regression's probabilities, fitted on each "
                                  "fold's validation split"},
        "segmenter": feats.segmenter,
        "candidates": feats.candidates,
        "features": list(feats.names),
        "feature_set": feats.feature_set,
        "feature_seconds": round(feats.seconds, 1),
        "features_from_cache": feats.from_cache,
        "folds": fused.folds,
        "explanation": "Late fusion in two stages, fitted per fold without its test cases: a logistic regression "
        "(C = 1) of the label on the segmenter's lesion evidence over the fold's fit cases (the segmenter never saw "
        "them), then one (C = 1) over the fold classifier's calibrated logit and that score on the fold's validation "
        "split, threshold by Youden's J on the same split. The evidence is graded: the mean of the 10, 50 and 200 "
        "largest lesion probabilities in the lungs, pixels at p >= 0.3 and >= 0.1, the summed probability and the "
        "slices at p >= 0.3"
        + ("; and the candidate stage's largest score and count of candidates scoring >= 0.5 (a small CNN over a "
           "3-slice patch around each 3-D component of lesion probability >= 0.5, trained on yet other phantoms)"
           if feats.candidates is not None else "")
        + " (feature set " + feats.feature_set + "). The segmenter was trained on other phantoms (its card's "
        "training data, above) and is the same for every fold. Each fold's fusion is one logistic regression over "
        "the logit and the features, the form a shipped lesion-fusing classifier applies. "
        "Paired tests: lesion evidence − classifier.",
    }
