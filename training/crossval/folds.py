"""Running the folds: train each fold's classifier on prepared cases (or reuse a finished one), predict its test
cases, and collect the out-of-fold results."""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.clinical import INPUTS
from models.preprocess import PreprocessConfig
from models.registry import apply_temperature, temperature_of
from training.common import GridCase, TrainingError
from training.crossval import claims
from training.crossval.outputs import write_json
from training.crossval.settings import EvaluateSettings, settings_dict
from training.crossval.splits import inner_split, outer_folds
from training.dataset import Dataset
from training.prepared import Prepared
from training.train import ClassifierSettings, clinical_features, train_classifier_cases

FOLD_MANIFEST = "fold.json"
CLAIM_WAIT_SECONDS = 30  # how often a report run looks again at a fold another process is training


def set_determinism(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and ask TensorFlow for deterministic kernels (process-wide)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def describe_part(ds: Dataset, idx: np.ndarray, role: str) -> dict[str, Any]:
    """The model card's description of the cases ``idx`` of ``ds`` (counts only)."""
    y = ds.labels[idx]
    return {"dataset": ds.summary()["root"], "role": role, "cases": int(len(idx)), "pneumonia_cases": int(y.sum()),
            "patients": len(set(ds.groups[idx].tolist()))}


@dataclass
class Fitted:
    """A trained (or reloaded) fold model with its card, training history and training time."""

    model: Any
    card: dict[str, Any]
    history: dict[str, list[float]]
    seconds: float


def fit(
    train: list[GridCase],
    val: list[GridCase],
    settings: ClassifierSettings,
    out: Path,
    *,
    describe_train: dict[str, Any],
    describe_val: dict[str, Any] | None = None,
    version: str = "0.0.0-dev",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Fitted:
    """Train with :func:`training.train.train_classifier_cases` on prepared cases; its outputs land in ``out``.

    Raises TrainingError when the cases are on another grid than ``settings.grid``.
    """
    import keras

    import models.classifier  # noqa: F401  (registers the custom layers for loading)
    from models.registry import MODEL_FILE

    t0 = time.perf_counter()
    for cases in (train, val):
        if cases and cases[0].hu.shape[-1] != settings.grid:
            raise TrainingError(f"prepared cases are on a {cases[0].hu.shape[-1]} grid, the settings want "
                                f"{settings.grid}")
    # The cases are already in memory; the line is the one train_classifier logs after loading from disk.
    log(f"loaded {len(train)} training and {len(val)} validation cases in 0 s")
    card = train_classifier_cases(train, val, out, settings=settings, version=version, progress=progress, log=log,
                                  train_description=describe_train,
                                  val_description=(describe_val or {}) if val else None)
    model = keras.saving.load_model(out / MODEL_FILE, compile=False)
    history = json.loads((out / "history.json").read_text())
    return Fitted(model, card, history, time.perf_counter() - t0)


def load_finished(fold_dir: Path, manifest: dict[str, Any]) -> Fitted | None:
    """The fold's finished model when its manifest matches (same cache key, settings and case split), else None."""
    import keras

    import models.classifier  # noqa: F401  (registers the custom layers for loading)
    from models.registry import CARD_FILE, MODEL_FILE

    try:
        saved = json.loads((fold_dir / FOLD_MANIFEST).read_text())
        seconds = float(saved.pop("train_seconds"))
        if saved != json.loads(json.dumps(manifest)):
            return None
        card = json.loads((fold_dir / CARD_FILE).read_text())
        history = json.loads((fold_dir / "history.json").read_text())
        model = keras.saving.load_model(fold_dir / MODEL_FILE, compile=False)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return Fitted(model, card, history, seconds)


def predict(model: Any, cases: list[GridCase], cfg: PreprocessConfig,
            used: Sequence[str] = INPUTS) -> tuple[np.ndarray, list[np.ndarray]]:
    """Uncalibrated P(pneumonia) and per-slice attention of whole series, one series per call (as the node runs
    them); the clinical inputs outside ``used`` are fed as missing."""
    import tensorflow as tf

    from models.preprocess import window

    n = len(clinical_features(cases[0])) if cases else 0
    fn = tf.function(
        lambda x, c: model({"slices": x, "clinical": c}, training=False),
        input_signature=[tf.TensorSpec((1, None, cfg.grid, cfg.grid, cfg.channels), tf.float32),
                         tf.TensorSpec((1, n), tf.float32)],
    )
    probs, atts = [], []
    for c in cases:
        out = fn(window(c.hu.astype(np.float32), cfg)[None], clinical_features(c, tuple(used))[None])
        probs.append(float(np.asarray(out["probability"]).reshape(-1)[0]))
        atts.append(np.asarray(out["attention"], dtype=np.float32).reshape(-1))
    return np.array(probs), atts


@dataclass(frozen=True)
class FoldPlan:
    """One fold: its number, the (fit, validation, test) cases, its classifier settings, folder and manifest."""

    k: int
    train_idx: np.ndarray
    fit_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    settings: ClassifierSettings
    fold_dir: Path
    manifest: dict[str, Any]


@dataclass
class FoldResults:
    """The out-of-fold results, filled fold by fold: per-case probability (calibrated with the fold's temperature;
    ``p_raw`` before), threshold (on ``p``'s scale), fold and attention."""

    p: np.ndarray
    thr: np.ndarray
    fold_of: np.ndarray
    attention: list[np.ndarray | None]
    order: list[int]
    histories: list[dict[str, list[float]]] = field(default_factory=list)
    fold_info: list[dict[str, Any]] = field(default_factory=list)
    fold_seconds: list[float] = field(default_factory=list)
    n_train: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    p_raw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calibration: list[dict[str, Any] | None] = field(default_factory=list)
    # fold → (its validation cases, the fold model's calibrated probabilities on them): the lesion-evidence arm
    validation: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int, order: list[int]) -> FoldResults:
        return cls(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=np.int64), [None] * n, order,
                   p_raw=np.full(n, np.nan))


def fold_order(folds: int, only_folds: Sequence[int] | None) -> list[int]:
    """The folds to run, in order: all of them, or ``only_folds`` (duplicates dropped). Raises ValueError."""
    if only_folds is None:
        return list(range(1, folds + 1))
    bad = [k for k in only_folds if not 1 <= k <= folds]
    if bad:
        raise ValueError(f"only_folds must be fold numbers 1..{folds}, got {bad}")
    return list(dict.fromkeys(only_folds))


def plan_fold(k: int, split: tuple[np.ndarray, np.ndarray], st: EvaluateSettings, ds: Dataset, prep: Prepared,
              s0: ClassifierSettings, variant: str = "") -> FoldPlan:
    """Fold ``k``'s inner split (seed + k), settings (seed + k), folder (``fold-NN`` or ``fold-NN-<variant>``) and
    the manifest that identifies it. A variant (the ablation's image-only arm) shares the splits and seeds."""
    train_idx, test_idx = split
    fit_idx, val_idx = inner_split(ds.labels, ds.groups, train_idx, st.val_fraction, st.seed + k)
    s = replace(s0, seed=st.seed + k)
    manifest = {"cache_key": prep.key, "settings": settings_dict(s), "val_fraction": st.val_fraction,
                **{name: [ds.cases[i].case_id for i in idx]
                   for name, idx in (("fit", fit_idx), ("validation", val_idx), ("test", test_idx))}}
    name = f"fold-{k:02d}" + (f"-{variant}" if variant else "")
    return FoldPlan(k, train_idx, fit_idx, val_idx, test_idx, s, Path(st.out) / "folds" / name, manifest)


def _reuse(plan: FoldPlan, *, wait: bool) -> Fitted | None:
    """The fold's finished model; with ``wait``, while another live process holds the fold, wait for its model."""
    while True:
        fitted = load_finished(plan.fold_dir, plan.manifest)
        if fitted is not None or not (wait and claims.claimed_by_other(plan.fold_dir)):
            return fitted
        time.sleep(CLAIM_WAIT_SECONDS)  # another process (--only-folds) is training this fold


def _train(plan: FoldPlan, ds: Dataset, prep: Prepared, st: EvaluateSettings, log: Callable[[str], None]) -> Fitted:
    """Train the fold (its claim held by the caller) and write its manifest once the model is complete."""
    k, fold_dir = plan.k, plan.fold_dir
    (fold_dir / FOLD_MANIFEST).unlink(missing_ok=True)
    fitted = fit([prep.cases[i] for i in plan.fit_idx], [prep.cases[i] for i in plan.val_idx], plan.settings,
                 fold_dir, describe_train=describe_part(ds, plan.fit_idx, f"fold {k} training"),
                 describe_val=describe_part(ds, plan.val_idx, f"fold {k} validation"),
                 version=f"cv-fold-{k}", progress=st.progress, log=log)
    write_json(fold_dir / FOLD_MANIFEST, {**plan.manifest, "train_seconds": round(fitted.seconds, 1)})
    return fitted


def obtain(plan: FoldPlan, ds: Dataset, prep: Prepared, st: EvaluateSettings, res: FoldResults,
           log: Callable[[str], None]) -> Fitted | None:
    """The fold's model: reused when finished earlier, else trained under a claim; None when another process
    holds the claim."""
    fitted = _reuse(plan, wait=st.only_folds is None) if st.resume else None
    if fitted is not None:
        res.resumed.append(plan.k)
        log(f"fold {plan.k}: reusing the model trained earlier in {plan.fold_dir}")
        return fitted
    if not claims.claim(plan.fold_dir):
        log(f"fold {plan.k}: another process is training it; skipped")
        return None
    try:
        return _train(plan, ds, prep, st, log)
    finally:
        claims.release(plan.fold_dir)


def record(plan: FoldPlan, fitted: Fitted, ds: Dataset, prep: Prepared, res: FoldResults,
           log: Callable[[str], None], *, validation: bool = False) -> None:
    """Predict the fold's test cases and store the predictions, its history and its facts in ``res``; with
    ``validation``, its validation cases' predictions too (the lesion-evidence arm fits on them)."""
    k, test_idx, y = plan.k, plan.test_idx, ds.labels
    cfg = PreprocessConfig(grid=plan.settings.grid)
    probs, atts = predict(fitted.model, [prep.cases[i] for i in test_idx], cfg, plan.settings.clinical_inputs)
    res.p_raw[test_idx] = probs
    temperature = temperature_of(fitted.card)
    probs = np.asarray(apply_temperature(probs, temperature), dtype=np.float64).reshape(-1)
    if validation and len(plan.val_idx):
        pv, _ = predict(fitted.model, [prep.cases[i] for i in plan.val_idx], cfg, plan.settings.clinical_inputs)
        res.validation[k] = (plan.val_idx, np.asarray(apply_temperature(pv, temperature), dtype=np.float64).reshape(-1))
    res.p[test_idx], res.thr[test_idx], res.fold_of[test_idx] = probs, float(fitted.card["threshold"]), k
    res.calibration.append(fitted.card.get("calibration"))
    for i, a in zip(test_idx, atts, strict=True):
        res.attention[i] = a
    res.histories.append(fitted.history)
    res.n_train.append(len(plan.train_idx))
    res.fold_seconds.append(round(fitted.seconds, 1))
    res.fold_info.append({"fold": k, "seed": plan.settings.seed, "n_fit": int(len(plan.fit_idx)),
                          "n_validation": int(len(plan.val_idx)),
                          "best_epoch": fitted.card["training"]["best_epoch"],
                          "validation": {kk: v for kk, v in fitted.card["metrics"]["validation"].items()
                                         if kk != "dataset"}})
    log(f"fold {k}: test accuracy {np.mean((probs >= res.thr[test_idx][0]) == y[test_idx]):.3f}, "
        f"threshold {res.thr[test_idx][0]:.3f}, {fitted.seconds:.0f} s")


def run_folds(st: EvaluateSettings, ds: Dataset, prep: Prepared, s0: ClassifierSettings,
              log: Callable[[str], None], variant: str = "") -> FoldResults:
    """Every fold in turn (or ``only_folds``): reuse or train its model, then (for a report) predict its test
    cases; ``variant`` names another arm on the same folds (see :func:`plan_fold`). Raises DatasetError (too few
    patients for the folds) / TrainingError / ValueError."""
    import keras
    from tqdm import tqdm

    splits = outer_folds(ds.labels, ds.groups, st.folds, st.seed)
    res = FoldResults.empty(len(ds.cases), fold_order(st.folds, st.only_folds))
    for k in tqdm(res.order, desc="folds", unit="fold", disable=not st.progress):
        plan = plan_fold(k, splits[k - 1], st, ds, prep, s0, variant)
        log(f"fold {k}/{st.folds}{f' ({variant})' if variant else ''}: {len(plan.fit_idx)} training, {len(plan.val_idx)} validation, "
            f"{len(plan.test_idx)} test cases")
        fitted = obtain(plan, ds, prep, st, res, log)
        if fitted is None:
            continue
        if st.only_folds is not None:
            log(f"fold {k}: finished in {fitted.seconds:.0f} s")
            continue
        record(plan, fitted, ds, prep, res, log, validation=st.lesion_evidence and not variant)
        keras.backend.clear_session()  # fold models are independent; keep memory flat
    return res
