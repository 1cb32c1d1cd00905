"""Stratified, patient-grouped k-fold cross-validation of the classifier, compared with the readers' diagnoses.

:func:`evaluate` loads a labelled dataset (:mod:`training.dataset`), preprocesses it once (cached), splits it with
``StratifiedGroupKFold`` (no patient in two folds), trains one classifier per fold with
:func:`training.train.train_classifier` (an inner, also patient-grouped, validation split of the training folds
picks the best epoch and the Youden threshold, so the test fold is touched only once), predicts the test fold and
writes ``out/``: ``metrics.json`` (deterministic for a seed), ``run.json`` (timings, environment),
``predictions.csv`` (out-of-fold), ``folds/fold-NN/`` (model, card, history), ``figures/*.png``, ``report.md`` and
``report.html``. :func:`train_final` trains the model to ship on all cases with the same settings.

``register(subparsers)`` adds the ``evaluate`` and ``train-final`` subcommands; ``python -m training.crossval``
runs them alone. Raises :class:`training.dataset.DatasetError` / :class:`training.train.TrainingError`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.preprocess import PreprocessConfig
from training import stats
from training.dataset import Dataset, DatasetError, Prepared, load_dataset, prepare
from training.train import NOT_FOR_CLINICAL_USE, ClassifierSettings, GridCase, TrainingError

REPORT_DIR = Path("reports") / "crossval"
BOOTSTRAP = 1000
VAL_FRACTION = 0.1
METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def classifier_settings(
    *,
    seed: int = 0,
    quick: bool = False,
    epochs: int | None = None,
    warmup_steps: int | None = None,
    max_slices: int | None = None,
    slice_labels: bool = True,
) -> ClassifierSettings:
    """The trainer's default settings; ``quick`` shrinks everything for tests; ``epochs``, ``warmup_steps`` (slice
    warm-up steps) and ``max_slices`` (slices per series per step) set the training budget; without slice labels
    (no lesion masks) the slice warm-up and the slice loss are off, so the series label alone supervises."""
    s = ClassifierSettings(seed=seed)
    if quick:
        s = replace(s, grid=32, epochs=2, max_slices=8, pretrain_steps=4, pretrain_batch=8, widths=(8, 16),
                    features=16)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        s = replace(s, epochs=epochs)
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warm-up steps must be >= 0, got {warmup_steps}")
        s = replace(s, pretrain_steps=warmup_steps)
    if max_slices is not None:
        if max_slices < 1:
            raise ValueError(f"max slices must be >= 1, got {max_slices}")
        s = replace(s, max_slices=max_slices)
    if not slice_labels:
        s = replace(s, pretrain_steps=0, slice_loss_weight=0.0)
    return s


def _settings_dict(s: ClassifierSettings) -> dict[str, Any]:
    d = asdict(s)
    d["widths"] = list(s.widths)
    return d


def set_determinism(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and ask TensorFlow for deterministic kernels (process-wide)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------


def outer_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: stratified by label, no group (patient) in two folds. Raises DatasetError."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise DatasetError(f"folds must be >= 2, got {folds}")
    per_class = {int(k): len({g for g, yy in zip(groups, y, strict=True) if yy == k}) for k in (0, 1)}
    if min(per_class.values()) < folds:
        raise DatasetError(f"{folds} folds need at least {folds} patients of each class",
                           [f"patients with label {k}: {n}" for k, n in per_class.items()])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(y)), y, groups)]


def inner_split(
    y: np.ndarray, groups: np.ndarray, train_idx: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (fit, validation), about ``fraction`` for validation, patient-grouped and
    stratified; no validation (empty) when ``fraction`` is 0 or a class has fewer than two patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    empty = np.array([], dtype=np.int64)
    if fraction <= 0:
        return train_idx, empty
    yt, gt = y[train_idx], groups[train_idx]
    smallest = min(len(set(gt[yt == k].tolist())) for k in (0, 1))
    n_splits = min(max(2, round(1.0 / fraction)), smallest)
    if n_splits < 2:
        return train_idx, empty
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fit, val = next(iter(splitter.split(np.zeros(len(yt)), yt, gt)))
    return np.sort(train_idx[fit]), np.sort(train_idx[val])


# ---------------------------------------------------------------------------------------------------------
# Training one model on in-memory cases through training.train
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cases_as_data(sets: dict[str, tuple[list[GridCase], dict[str, Any]]]) -> Iterator[None]:
    """Let ``train_classifier`` take already-prepared cases: its dataset loader and description are swapped for
    look-ups in ``sets`` (keyed by the pseudo data path) while the block runs.

    train_classifier takes a phantom folder and re-reads DICOM; the fold loop must not (and folds are subsets).
    A ``train_classifier_cases(train, val, ...)`` entry point in training.train would make this unnecessary.
    """
    import training.train as trainer

    def load(data: Any, grid: int, *, with_targets: bool, limit: int | None = None, progress: bool = True) -> list[GridCase]:
        cases = sets[str(data)][0]
        if with_targets:
            raise TrainingError("prepared cases carry no segmentation targets")
        if cases and cases[0].hu.shape[-1] != grid:
            raise TrainingError(f"prepared cases are on a {cases[0].hu.shape[-1]} grid, the settings want {grid}")
        return cases[:limit] if limit is not None else cases

    def describe(data: Any) -> dict[str, Any]:
        return sets[str(data)][1]

    saved = trainer.load_grid_cases, trainer.describe_data
    trainer.load_grid_cases, trainer.describe_data = load, describe  # type: ignore[assignment]
    try:
        yield
    finally:
        trainer.load_grid_cases, trainer.describe_data = saved


@dataclass
class Fitted:
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
    """Train with :func:`training.train.train_classifier` on prepared cases; its outputs land in ``out``."""
    import keras

    import models.classifier  # noqa: F401  (registers the custom layers for loading)
    from models.registry import MODEL_FILE
    from training.train import train_classifier

    t0 = time.perf_counter()
    sets = {"<train>": (train, describe_train), "<validation>": (val, describe_val or {})}
    with _cases_as_data(sets):
        card = train_classifier(Path("<train>"), out, val_data=Path("<validation>") if val else None,
                                settings=settings, version=version, progress=progress, log=log)
    model = keras.saving.load_model(out / MODEL_FILE, compile=False)
    history = json.loads((out / "history.json").read_text())
    return Fitted(model, card, history, time.perf_counter() - t0)


FOLD_MANIFEST = "fold.json"
CLAIM = "claim"  # a fold being trained: holds the training process's pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimed_by_other(fold_dir: Path) -> bool:
    try:
        pid = int((fold_dir / CLAIM).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and pid > 0 and _pid_alive(pid)


def _claim(fold_dir: Path) -> bool:
    """Claim a fold for this process (False when a live process holds it; a dead holder's claim is taken over)."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _claimed_by_other(fold_dir):
                return False
            path.unlink(missing_ok=True)  # left by a process that died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _resume(fold_dir: Path, manifest: dict[str, Any]) -> Fitted | None:
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


def predict(model: Any, cases: list[GridCase], cfg: PreprocessConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """P(pneumonia) and per-slice attention of whole series, one series per call (as the node runs them)."""
    import tensorflow as tf

    from models.classifier import clinical_vector
    from models.preprocess import window

    fn = tf.function(
        lambda x, c: model({"slices": x, "clinical": c}, training=False),
        input_signature=[tf.TensorSpec((1, None, cfg.grid, cfg.grid, cfg.channels), tf.float32),
                         tf.TensorSpec((1, 4), tf.float32)],
    )
    probs, atts = [], []
    for c in cases:
        out = fn(window(c.hu.astype(np.float32), cfg)[None], clinical_vector(c.age, c.sex)[None])
        probs.append(float(np.asarray(out["probability"]).reshape(-1)[0]))
        atts.append(np.asarray(out["attention"], dtype=np.float32).reshape(-1))
    return np.array(probs), atts


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _decision_block(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    return {**stats.decision_metrics(y, pred), "confusion": stats.confusion(y, pred), "n": int(len(y))}


def _ci_block(y: np.ndarray, pred: np.ndarray, p: np.ndarray | None, n: int, seed: int) -> dict[str, list[float]]:
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
    folds = []
    for k in np.unique(fold_of):
        m = fold_of == k
        f: dict[str, Any] = {"fold": int(k), "n_test": int(m.sum()), "pneumonia_test": int(y[m].sum()),
                             "threshold": float(thr[m][0]), **stats.decision_metrics(y[m], pred[m]),
                             "roc_auc": stats.roc_auc(y[m], p[m]), "brier": stats.brier(y[m], p[m])}
        mr = m & has_r
        f["reader"] = stats.decision_metrics(y[mr], reader[mr]) if mr.any() else None
        folds.append(f)
    summary = {k: stats.mean_sd([f[k] for f in folds]) for k in (*METRICS, "roc_auc", "brier")}
    reader_summary = (
        {k: stats.mean_sd([f["reader"][k] for f in folds if f["reader"]]) for k in METRICS} if has_r.any() else None
    )
    pooled_model = {**_decision_block(y, pred), "roc_auc": stats.roc_auc(y, p), "brier": stats.brier(y, p),
                    "ci95": _ci_block(y, pred, p, bootstrap, seed)}
    out: dict[str, Any] = {
        "folds": folds,
        "summary": {"model": summary, "reader": reader_summary},
        "pooled": {"model": pooled_model, "reader": None},
        "calibration": {"brier": stats.brier(y, p), "reliability": stats.reliability(y, p, bins=10)},
        "comparison": None,
    }
    if has_r.any():
        yr, pr, rr = y[has_r], pred[has_r], reader[has_r]
        out["pooled"]["reader"] = {**_decision_block(yr, rr), "ci95": _ci_block(yr, rr, None, bootstrap, seed)}
        acc_m = [f["accuracy"] for f in folds if f["reader"]]
        acc_r = [f["reader"]["accuracy"] for f in folds if f["reader"]]
        n_test = float(np.mean([f["n_test"] for f in folds]))
        out["comparison"] = {
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
    return out


# ---------------------------------------------------------------------------------------------------------
# The cross-validation run
# ---------------------------------------------------------------------------------------------------------


def _logger(path: Path, progress: bool) -> Callable[[str], None]:
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with path.open("a") as f:
            f.write(msg + "\n")
        if progress:
            tqdm.write(msg)

    return log


def _describe(ds: Dataset, idx: np.ndarray, role: str) -> dict[str, Any]:
    y = ds.labels[idx]
    return {"dataset": ds.summary()["root"], "role": role, "cases": int(len(idx)), "pneumonia_cases": int(y.sum()),
            "patients": len(set(ds.groups[idx].tolist()))}


def _subgroups(ds: Dataset, y: np.ndarray, pred: np.ndarray, reader: np.ndarray) -> dict[str, Any]:
    """Sensitivity on the table's ``subtle`` pneumonia cases (phantoms mark them), model and reader."""
    flags = [str(c.row.get("subtle", "")).strip() for c in ds.cases]
    if not any(flags):
        return {}
    subtle = np.array([f in ("1", "1.0", "true", "True") for f in flags]) & (y == 1)
    if not subtle.any():
        return {}
    has_r = subtle & (reader >= 0)
    return {"subtle_pneumonia": {
        "cases": int(subtle.sum()),
        "model_sensitivity": float(pred[subtle].mean()),
        "reader_sensitivity": float((reader[has_r] == 1).mean()) if has_r.any() else None,
    }}


def _attention_hits(prep: Prepared, att: list[np.ndarray | None], s: ClassifierSettings, ds: Dataset) -> dict[str, Any]:
    """Share of pneumonia cases whose top-attention slice holds lesion (needs lesion masks)."""
    if not ds.has_masks:
        return {}
    hits = [bool(c.slice_lesion[int(np.argmax(a))] >= s.min_lesion_px)
            for c, a in zip(prep.cases, att, strict=True) if c.label == 1 and a is not None]
    return {"top_slice_has_lesion": float(np.mean(hits)) if hits else None, "pneumonia_cases": len(hits)}


def evaluate(
    data: str | Path,
    folds: int = 10,
    out: str | Path = REPORT_DIR,
    seed: int = 0,
    quick: bool = False,
    *,
    labels: str | Path | None = None,
    epochs: int | None = None,
    warmup_steps: int | None = None,
    max_slices: int | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = VAL_FRACTION,
    bootstrap: int = BOOTSTRAP,
    allow_unlabelled: bool = False,
    progress: bool = True,
    resume: bool = True,
    only_folds: list[int] | None = None,
    weights_dir: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Cross-validate the classifier on ``data`` and write the report to ``out`` (see the module docstring).

    With ``resume``, a fold whose model an earlier run finished in ``out`` for the same cases, split and
    settings is loaded instead of retrained (each fold reseeds, so the numbers are the same). The example-slice
    figure overlays the latest segmenter under ``weights_dir`` (default: the shipped weights). Returns the
    metrics (as written to metrics.json). With ``only_folds`` it trains just those folds (in that order, skipping
    any another process has claimed) and writes no report: several processes or machines sharing ``out`` can
    split the folds, and a final run without it waits for claimed folds and assembles the report. Raises
    DatasetError / TrainingError / ValueError.
    """
    from tqdm import tqdm

    from training import plots, report

    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out / "run.log", progress)
    set_determinism(seed)
    ds = load_dataset(data, labels, allow_unlabelled=allow_unlabelled, progress=progress)
    for note in ds.notes[:20]:
        log(f"note: {note}")
    for rel, why in ds.unreadable[:20]:
        log(f"unreadable: {rel}: {why}")
    s0 = classifier_settings(seed=seed, quick=quick, epochs=epochs, warmup_steps=warmup_steps,
                             max_slices=max_slices, slice_labels=ds.has_masks)
    cfg = PreprocessConfig(grid=s0.grid)
    prep = prepare(ds, s0.grid, Path(cache_dir) if cache_dir else out / "cache", progress=progress)
    log(f"{len(prep.cases)} cases on a {s0.grid}² grid {'from the cache' if prep.from_cache else 'preprocessed'} "
        f"in {prep.seconds:.0f} s ({prep.path.name})")

    y, groups = ds.labels, ds.groups
    reader = np.array([-1 if c.reader_label is None else c.reader_label for c in ds.cases], dtype=np.int64)
    splits = outer_folds(y, groups, folds, seed)
    p = np.full(len(y), np.nan)
    thr = np.full(len(y), np.nan)
    fold_of = np.zeros(len(y), dtype=np.int64)
    attention: list[np.ndarray | None] = [None] * len(y)
    histories, fold_info, fold_seconds, n_train = [], [], [], []
    resumed: list[int] = []
    order = list(range(1, folds + 1))
    if only_folds is not None:
        bad = [k for k in only_folds if not 1 <= k <= folds]
        if bad:
            raise ValueError(f"only_folds must be fold numbers 1..{folds}, got {bad}")
        order = list(dict.fromkeys(only_folds))
    for k in tqdm(order, desc="folds", unit="fold", disable=not progress):
        train_idx, test_idx = splits[k - 1]
        fit_idx, val_idx = inner_split(y, groups, train_idx, val_fraction, seed + k)
        s = replace(s0, seed=seed + k)
        fold_dir = out / "folds" / f"fold-{k:02d}"
        log(f"fold {k}/{folds}: {len(fit_idx)} training, {len(val_idx)} validation, {len(test_idx)} test cases")
        manifest = {"cache_key": prep.key, "settings": _settings_dict(s), "val_fraction": val_fraction,
                    **{name: [ds.cases[i].case_id for i in idx]
                       for name, idx in (("fit", fit_idx), ("validation", val_idx), ("test", test_idx))}}
        fitted = None
        while resume and fitted is None:
            fitted = _resume(fold_dir, manifest)
            if fitted is None and _claimed_by_other(fold_dir) and only_folds is None:
                time.sleep(30)  # another process (--only-folds) is training this fold: wait for its model
                continue
            break
        if fitted is not None:
            resumed.append(k)
            log(f"fold {k}: reusing the model trained earlier in {fold_dir}")
        else:
            if not _claim(fold_dir):
                log(f"fold {k}: another process is training it; skipped")
                continue
            try:
                (fold_dir / FOLD_MANIFEST).unlink(missing_ok=True)
                fitted = fit([prep.cases[i] for i in fit_idx], [prep.cases[i] for i in val_idx], s, fold_dir,
                             describe_train=_describe(ds, fit_idx, f"fold {k} training"),
                             describe_val=_describe(ds, val_idx, f"fold {k} validation"),
                             version=f"cv-fold-{k}", progress=progress, log=log)
                _write_json(fold_dir / FOLD_MANIFEST, {**manifest, "train_seconds": round(fitted.seconds, 1)})
            finally:
                (fold_dir / CLAIM).unlink(missing_ok=True)
        if only_folds is not None:
            log(f"fold {k}: finished in {fitted.seconds:.0f} s")
            continue
        probs, atts = predict(fitted.model, [prep.cases[i] for i in test_idx], cfg)
        p[test_idx], thr[test_idx], fold_of[test_idx] = probs, float(fitted.card["threshold"]), k
        for i, a in zip(test_idx, atts, strict=True):
            attention[i] = a
        histories.append(fitted.history)
        n_train.append(len(train_idx))
        fold_seconds.append(round(fitted.seconds, 1))
        fold_info.append({"fold": k, "seed": s.seed, "n_fit": int(len(fit_idx)), "n_validation": int(len(val_idx)),
                          "best_epoch": fitted.card["training"]["best_epoch"],
                          "validation": {kk: v for kk, v in fitted.card["metrics"]["validation"].items()
                                         if kk != "dataset"}})
        log(f"fold {k}: test accuracy {np.mean((probs >= thr[test_idx][0]) == y[test_idx]):.3f}, "
            f"threshold {thr[test_idx][0]:.3f}, {fitted.seconds:.0f} s")
        import keras

        keras.backend.clear_session()  # fold models are independent; keep memory flat

    if only_folds is not None:
        return {"only_folds": order, "reused": resumed}
    res = summarise(y, p, thr, fold_of, reader, bootstrap=bootstrap, seed=seed, n_train=n_train)
    for f, info in zip(res["folds"], fold_info, strict=True):
        f.update(info)
    pred = (p >= thr).astype(np.int64)
    metrics: dict[str, Any] = {
        "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
        "dataset": ds.summary(),
        "protocol": {
            "folds": folds,
            "seed": seed,
            "quick": quick,
            "split": "StratifiedGroupKFold (stratified by label, grouped by patient id), shuffled with the seed",
            "inner_validation": f"~{val_fraction:.0%} of each training part, patient-grouped, picks the best epoch "
            "and the decision threshold (Youden J); the test fold is predicted once",
            "decision_threshold": "per fold, from that fold's inner validation (0.5 without one)",
            "bootstrap": {"resamples": bootstrap, "seed": seed, "method": "percentile, case-level, pooled "
                          "out-of-fold predictions, the same resamples for every metric"},
            "fold_seeds": [seed + k for k in range(1, folds + 1)],
            "preprocessing": cfg.to_dict(),
        },
        "settings": _settings_dict(s0),
        **res,
        "subgroups": _subgroups(ds, y, pred, reader),
        "attention": _attention_hits(prep, attention, s0, ds),
    }
    metrics = json.loads(json.dumps(metrics, default=_json_default))  # plain floats, stable for comparisons
    _write_json(out / "metrics.json", metrics)
    _write_predictions(out / "predictions.csv", ds, p, thr, fold_of, attention)

    figures = plots.make_figures(out / "figures", ds=ds, prep=prep, p=p, thr=thr, fold_of=fold_of, reader=reader,
                                 attention=attention, histories=histories, metrics=metrics,
                                 weights_dir=Path(weights_dir) if weights_dir else None, log=log)
    run = {
        "started_utc": started,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "prepare_seconds": round(prep.seconds, 1),
        "prepare_from_cache": prep.from_cache,
        "fold_train_seconds": fold_seconds,
        "resumed_folds": resumed,
        "command": command or f"evaluate --data {data} --folds {folds} --out {out} --seed {seed}"
        + (f" --labels {labels}" if labels else "") + (" --quick" if quick else "")
        + (f" --epochs {epochs}" if epochs else "")
        + (f" --warmup-steps {warmup_steps}" if warmup_steps is not None else "")
        + (f" --max-slices {max_slices}" if max_slices is not None else "")
        + (f" --val-fraction {val_fraction}" if val_fraction != VAL_FRACTION else ""),
        "environment": _environment(),
        "dataset_notes": ds.notes,
        "unreadable_files": ds.unreadable,
    }
    _write_json(out / "run.json", run)
    report.write_report(out, metrics, run, figures)
    log(f"wrote {out / 'report.md'} in {run['wall_seconds']:.0f} s")
    return metrics


def _environment() -> dict[str, Any]:
    from training.train import _environment as trainer_environment

    return trainer_environment()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _write_predictions(path: Path, ds: Dataset, p: np.ndarray, thr: np.ndarray, fold_of: np.ndarray,
                       attention: list[np.ndarray | None]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case_id", "patient_id", "fold", "label", "probability", "threshold", "prediction",
                    "reader_label", "top_attention_slice"])
        for i, c in enumerate(ds.cases):
            a = attention[i]
            w.writerow([c.case_id, c.patient_id, int(fold_of[i]), c.label, f"{p[i]:.6f}", f"{thr[i]:.6f}",
                        int(p[i] >= thr[i]), "" if c.reader_label is None else c.reader_label,
                        "" if a is None else int(np.argmax(a))])


# ---------------------------------------------------------------------------------------------------------
# The final model
# ---------------------------------------------------------------------------------------------------------


def train_final(
    data: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    seed: int = 0,
    quick: bool = False,
    epochs: int | None = None,
    warmup_steps: int | None = None,
    max_slices: int | None = None,
    version: str = "0.0.0-dev",
    val_fraction: float = VAL_FRACTION,
    cache_dir: str | Path | None = None,
    cv_metrics: str | Path | None = None,
    allow_unlabelled: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the classifier to ship on every case with the cross-validation's settings (same inner validation
    share for the best epoch and threshold) and write it to ``out`` (model.keras + model_card.json via
    :func:`training.train.write_model`). With ``cv_metrics`` (a metrics.json from :func:`evaluate`) the card's
    ``metrics.cross_validation`` is filled from it. Returns the card."""
    from training.report import update_model_card

    out = Path(out)
    set_determinism(seed)
    ds = load_dataset(data, labels, allow_unlabelled=allow_unlabelled, progress=progress)
    s = classifier_settings(seed=seed, quick=quick, epochs=epochs, warmup_steps=warmup_steps,
                             max_slices=max_slices, slice_labels=ds.has_masks)
    prep = prepare(ds, s.grid, Path(cache_dir) if cache_dir else REPORT_DIR / "cache", progress=progress)
    y, groups = ds.labels, ds.groups
    fit_idx, val_idx = inner_split(y, groups, np.arange(len(y)), val_fraction, seed)
    fitted = fit([prep.cases[i] for i in fit_idx], [prep.cases[i] for i in val_idx], s, out,
                 describe_train=_describe(ds, fit_idx, "training"), describe_val=_describe(ds, val_idx, "validation"),
                 version=version, progress=progress, log=_logger(out / "train.log", progress))
    card = fitted.card
    if cv_metrics is not None:
        from models.registry import CARD_FILE

        card = update_model_card(out / CARD_FILE, Path(cv_metrics))
    return card


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.errors import ModelError
    from training.report import headline_table

    try:
        m = evaluate(args.data, folds=args.folds, out=args.out, seed=args.seed, quick=args.quick, labels=args.labels,
                     epochs=args.epochs, warmup_steps=args.warmup_steps, max_slices=args.max_slices,
                     cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                     bootstrap=args.bootstrap, allow_unlabelled=args.allow_unlabelled, progress=not args.quiet,
                     resume=args.resume, only_folds=args.only_folds, weights_dir=args.weights_dir)
    except (TrainingError, ModelError, ValueError) as exc:
        _err(str(exc))
        return 1
    if args.only_folds is not None:
        print(f"folds {m['only_folds']} done (reused {m['reused']}); run without --only-folds for the report")
        return 0
    print(headline_table(m))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_train_final(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.errors import ModelError

    try:
        card = train_final(args.data, args.out, labels=args.labels, seed=args.seed, quick=args.quick,
                           epochs=args.epochs, warmup_steps=args.warmup_steps, max_slices=args.max_slices,
                           version=args.version, val_fraction=args.val_fraction,
                           cache_dir=args.cache_dir, cv_metrics=args.cv_metrics,
                           allow_unlabelled=args.allow_unlabelled, progress=not args.quiet)
    except (TrainingError, ModelError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    t = card["training"]
    print(f"wrote {card['name']} {card['version']} to {args.out} (training {t['train_seconds']:.0f} s, "
          f"best epoch {t['best_epoch']}, threshold {card['threshold']:.3f})")
    return 0


def _fold_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 7,8,9, got {text!r}") from exc


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder: DICOM series in any layout + a label table")
    p.add_argument("--labels", help="label table CSV (default: clinical.csv or labels.csv in --data)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, training and bootstrap (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny model and epochs (tests, smoke runs)")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the trainer's)")
    p.add_argument("--warmup-steps", type=int, help="slice warm-up steps per model (default: the trainer's)")
    p.add_argument("--max-slices", type=int, help="slices per series in a training step (default: the trainer's)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help=f"inner validation share for best epoch and threshold (default {VAL_FRACTION})")
    p.add_argument("--cache-dir", help="preprocessed-array cache (default: evaluate: OUT/cache, "
                   f"train-final: {REPORT_DIR / 'cache'})")
    p.add_argument("--allow-unlabelled", action="store_true", help="ignore series the table does not label")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    """Add ``evaluate`` (cross-validation report) and ``train-final`` to an argparse subparsers object."""
    e = subparsers.add_parser("evaluate", help="k-fold cross-validation of the classifier with a full report")
    _common(e)
    e.add_argument("--folds", type=int, default=10, help="number of folds (default 10)")
    e.add_argument("--out", default=str(REPORT_DIR), help=f"report folder (default {REPORT_DIR})")
    e.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help=f"bootstrap resamples (default {BOOTSTRAP})")
    e.add_argument("--no-resume", dest="resume", action="store_false",
                   help="retrain every fold even where --out holds a finished fold with the same split and settings")
    e.add_argument("--only-folds", type=_fold_list, metavar="K[,K...]",
                   help="train only these folds (no report); a later run without it assembles the report")
    e.add_argument("--weights-dir", help="weights folder whose segmenter draws the example overlays (default: shipped)")
    e.set_defaults(func=cmd_evaluate)

    t = subparsers.add_parser("train-final", help="train the classifier to ship on all cases (CV settings)")
    _common(t)
    t.add_argument("--out", required=True, help="model folder (model.keras, model_card.json)")
    t.add_argument("--version", default="0.0.0-dev", help="version recorded in the model card")
    t.add_argument("--cv-metrics", help="metrics.json of the cross-validation, recorded in the card")
    t.set_defaults(func=cmd_train_final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.crossval", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
