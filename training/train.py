"""Training of the classifier on a phantom dataset, through the node's own preprocessing.

``train_classifier(data, out, ...)`` (like ``training.segmenter.train_segmenter``) reads a dataset written by
:mod:`training.phantom` through :func:`training.common.load_grid_cases` (exactly what the node runs), trains with a
tqdm bar per epoch, keeps the weights of the best validation epoch, and writes ``out/model.keras``,
``out/model_card.json`` (data, settings, validation metrics, timing, intended use, sha256),
``out/history.json`` and ``out/curves.png`` (:func:`training.common.save_run`). Raises
:class:`training.common.TrainingError` for a missing or unusable dataset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.clinical import AGE_SEX_SYMPTOMS, INPUTS, encode
from models.preprocess import PreprocessConfig, augment, window
from training.calibration import calibration_block
from training.common import (
    NOT_FOR_CLINICAL_USE,
    GridCase,
    TrainingError,
    describe_data,
    epoch_bar,
    load_grid_cases,
    roc_auc,
    save_run,
    training_environment,
    youden_threshold,
)


@dataclass(frozen=True)
class ClassifierSettings:
    epochs: int = 8
    seed: int = 0
    grid: int = 128
    max_slices: int = 48
    series_per_step: int = 2
    learning_rate: float = 1e-3  # slice warm-up
    mil_learning_rate: float = 3e-4  # series (attention) stage: gentler, so it refines the warmed-up encoder
    slice_loss_weight: float = 0.5
    loss: str = "weighted_bce"  # or "focal"
    min_lesion_px: float = 2.0  # a slice is "lesion" when the lesion covers this many grid pixels
    pretrain_steps: int = 1000  # slice-level warm-up of the encoder on balanced random slices
    pretrain_batch: int = 32
    clinical_dropout: float = 0.3  # share of training series whose clinical inputs are all hidden (missing)
    input_dropout: float = 0.15  # else each clinical input is hidden on its own with this probability
    clinical_inputs: tuple[str, ...] = INPUTS  # fed to the fusion (age-sex-symptoms schema); () = image only
    class_weighting: bool = True  # series loss weighted by the inverse class frequency of the training part
    calibration: str = "temperature"  # post-hoc, fitted on the validation split; "none" to skip
    widths: tuple[int, ...] = (16, 32, 48, 64)
    features: int = 64


def _classifier_batches(
    cases: list[GridCase], s: ClassifierSettings, cfg: PreprocessConfig, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Augmented training batches: (slices (B,K,g,g,C), clinical (B,F), label (B,), slice labels (B,K))."""
    order = rng.permutation(len(cases))
    for a in range(0, len(order) - s.series_per_step + 1, s.series_per_step):
        batch = [cases[i] for i in order[a : a + s.series_per_step]]
        # Thicker slices now and then: every second slice.
        strides = [2 if (len(c.hu) >= 2 * 24 and rng.random() < 0.3) else 1 for c in batch]
        k = min(s.max_slices, *[len(c.hu[::st]) for c, st in zip(batch, strides, strict=True)])
        xs, clin, ys, sl = [], [], [], []
        for c, st in zip(batch, strides, strict=True):
            hu, les = c.hu[::st].astype(np.float32), c.slice_lesion[::st]
            start = int(rng.integers(0, len(hu) - k + 1))
            hu, les = hu[start : start + k], les[start : start + k]
            hu, _ = augment(hu, rng)
            xs.append(window(hu, cfg))
            slice_y = (les >= s.min_lesion_px).astype(np.float32) * c.label
            sl.append(slice_y)
            ys.append(float(slice_y.max()))
            clin.append(_training_clinical(c, s, rng))
        yield np.stack(xs), np.stack(clin), np.array(ys, np.float32), np.stack(sl)


def clinical_features(case: GridCase, used: tuple[str, ...] | list[str] = INPUTS) -> np.ndarray:
    """The case's fusion input (``age-sex-symptoms`` schema), inputs outside ``used`` encoded as missing."""
    return encode(case.clinical(), AGE_SEX_SYMPTOMS, tuple(used))


def _training_clinical(case: GridCase, s: ClassifierSettings, rng: np.random.Generator) -> np.ndarray:
    """The fusion input with dropout: all inputs hidden (``clinical_dropout``), else each on its own
    (``input_dropout``), so the model learns to work with any of them missing, as in the node."""
    if rng.random() < s.clinical_dropout:
        return clinical_features(case, ())
    keep = [n for n in s.clinical_inputs if rng.random() >= s.input_dropout]
    return clinical_features(case, keep)


def clinical_card(s: ClassifierSettings) -> dict[str, Any]:
    """The card's ``clinical_inputs``: the schema (vector layout) this version expects and the inputs it reads."""
    from models.clinical import FEATURE_NAMES

    return {"schema": AGE_SEX_SYMPTOMS, "features": list(FEATURE_NAMES[AGE_SEX_SYMPTOMS]),
            "used": list(s.clinical_inputs),
            "missing_values": "value 0 + missing indicator 1; never imputed",
            "training_dropout": {"all": s.clinical_dropout, "each": s.input_dropout}}


def _pretrain_batches(
    cases: list[GridCase], s: ClassifierSettings, cfg: PreprocessConfig, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Balanced random slices (half with lesion), each augmented on its own.

    Negatives come from slices with as much lung as the lesion slices have, so "lesion" cannot be learnt as
    "a slice through the middle of the lungs" (a shortcut that does not survive max-pooling over a series).
    """
    pos = [(ci, k) for ci, c in enumerate(cases) for k in np.flatnonzero(c.slice_lesion >= s.min_lesion_px)]
    if not pos:
        return
    min_lung = float(np.percentile([cases[ci].slice_lung[k] for ci, k in pos], 10))
    neg = [
        (ci, k) for ci, c in enumerate(cases) for k in np.flatnonzero((c.slice_lesion == 0) & (c.slice_lung >= min_lung))
    ]
    if not pos or not neg:
        return
    half = s.pretrain_batch // 2
    for _ in range(s.pretrain_steps):
        picks = [pos[i] for i in rng.integers(0, len(pos), half)] + [neg[i] for i in rng.integers(0, len(neg), half)]
        xs = [window(augment(cases[ci].hu[k : k + 1].astype(np.float32), rng)[0][0], cfg) for ci, k in picks]
        yield np.stack(xs), np.array([1.0] * half + [0.0] * half, np.float32)


def predict_classifier(model: Any, cases: list[GridCase], cfg: PreprocessConfig,
                       used: tuple[str, ...] = INPUTS) -> np.ndarray:
    """P(pneumonia) of whole series (no augmentation, uncalibrated), the node's way (one series per call)."""
    import tensorflow as tf

    n = int(model.input["clinical"].shape[-1]) if isinstance(model.input, dict) else len(clinical_features(cases[0]))
    fn = tf.function(
        lambda x, c: model({"slices": x, "clinical": c}, training=False)["probability"],
        autograph=False,
        input_signature=[
            tf.TensorSpec((1, None, cfg.grid, cfg.grid, cfg.channels), tf.float32),
            tf.TensorSpec((1, n), tf.float32),
        ],
    )
    out = []
    for c in cases:
        x = window(c.hu.astype(np.float32), cfg)[None]
        out.append(float(np.asarray(fn(x, clinical_features(c, used)[None])).reshape(-1)[0]))
    return np.array(out)


def train_classifier(
    data: Path,
    out: Path,
    *,
    val_data: Path | None = None,
    settings: ClassifierSettings | None = None,
    version: str = "0.0.0-dev",
    progress: bool = True,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the series classifier on phantom folders; returns the model card (also written to ``out``)."""
    s = settings or ClassifierSettings()
    t0 = time.perf_counter()
    train = load_grid_cases(data, s.grid, with_targets=False, limit=limit, progress=progress, log=log)
    val = load_grid_cases(val_data, s.grid, with_targets=False, progress=progress, log=log) if val_data else []
    load_seconds = time.perf_counter() - t0
    log(f"loaded {len(train)} training and {len(val)} validation cases in {load_seconds:.0f} s")
    return train_classifier_cases(
        train, val, out, settings=s, version=version, progress=progress, log=log,
        train_description=describe_data(Path(data)),
        val_description=describe_data(Path(val_data)) if val_data else None,
        load_seconds=load_seconds,
    )


def train_classifier_cases(
    train: list[GridCase],
    val: list[GridCase],
    out: Path,
    *,
    settings: ClassifierSettings | None = None,
    version: str = "0.0.0-dev",
    progress: bool = True,
    log: Callable[[str], None] = print,
    train_description: dict[str, Any] | None = None,
    val_description: dict[str, Any] | None = None,
    load_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train the series classifier on cases already on the grid (``settings.grid``); returns the model card.

    ``train_description`` / ``val_description`` describe the data in the card. ``val`` may be empty (then the
    last epoch is kept and the threshold is 0.5).
    """
    import keras

    from models.classifier import build_classifier

    s = settings or ClassifierSettings()
    if not train:
        raise TrainingError("no training cases")
    keras.utils.set_random_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    cfg = PreprocessConfig(grid=s.grid)
    t_loaded = time.perf_counter()

    model = build_classifier(grid=s.grid, channels=cfg.channels, widths=s.widths, features=s.features)
    steps = max(1, len(train) // s.series_per_step)
    train_step = _classifier_train_step(model, train, s, steps)
    pre_losses = _slice_warmup(model, train, s, cfg, rng, progress, log)
    history, best_epoch = _fit_classifier(model, train_step, train, val, s, cfg, rng, steps, progress, log)
    t_trained = time.perf_counter()

    threshold, val_metrics, calibration = _classifier_validation(model, val, cfg, val_description, s, log)
    history = {k: v for k, v in history.items() if v}
    card = _classifier_card(
        model, s, cfg, version=version, threshold=threshold, val_metrics=val_metrics, calibration=calibration,
        train_description=train_description, best_epoch=best_epoch, pre_losses=pre_losses,
        load_seconds=load_seconds, train_seconds=t_trained - t_loaded,
    )
    save_run(model, Path(out), card, history, "classifier")
    return card


def _classifier_train_step(model: Any, train: list[GridCase], s: ClassifierSettings, steps: int) -> Any:
    """The series stage's optimiser, losses and compiled training step ``(x, clin, y, sl) -> (loss, p)``."""
    import keras
    import tensorflow as tf

    from models.classifier import focal_bce

    schedule = keras.optimizers.schedules.CosineDecay(
        s.mil_learning_rate, decay_steps=max(1, steps * s.epochs), alpha=0.05
    )
    opt = keras.optimizers.Adam(schedule)
    # Class weight from the share of positive windows the sampler produces (close to the case prevalence).
    pos_rate = float(np.mean([c.label for c in train])) if train else 0.5
    pos_rate = float(np.clip(pos_rate, 0.05, 0.95))
    w_pos, w_neg = (0.5 / pos_rate, 0.5 / (1.0 - pos_rate)) if s.class_weighting else (1.0, 1.0)
    # Lesion slices are rare (~10 %): weight them so the slice head keeps the balanced calibration of the warm-up.
    slice_rate = float(np.mean(np.concatenate([c.slice_lesion >= s.min_lesion_px for c in train])))
    slice_pos_weight = float(np.clip((1.0 - slice_rate) / max(slice_rate, 1e-3), 1.0, 20.0))

    def losses(x: Any, clin: Any, y: Any, sl: Any, training: bool) -> tuple[Any, Any, Any]:
        out_ = model({"slices": x, "clinical": clin}, training=training)
        p = tf.reshape(out_["probability"], (-1,))
        if s.loss == "focal":
            series = focal_bce(y, p, gamma=2.0, alpha=1.0 - pos_rate if s.class_weighting else 0.5)
        else:
            pc = tf.clip_by_value(p, 1e-6, 1 - 1e-6)
            series = tf.reduce_mean(-(w_pos * y * tf.math.log(pc) + w_neg * (1 - y) * tf.math.log(1 - pc)))
        slice_l = tf.reduce_mean(
            tf.nn.weighted_cross_entropy_with_logits(labels=sl, logits=out_["slice_logit"], pos_weight=slice_pos_weight)
        ) / (0.5 * (1.0 + slice_pos_weight))
        return series + s.slice_loss_weight * slice_l, series, p

    @tf.function(reduce_retracing=True, autograph=False)
    def train_step(x: Any, clin: Any, y: Any, sl: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            total, _, p = losses(x, clin, y, sl, True)
        grads = tape.gradient(total, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return total, p

    return train_step


def _slice_warmup(
    model: Any, train: list[GridCase], s: ClassifierSettings, cfg: PreprocessConfig, rng: np.random.Generator,
    progress: bool, log: Callable[[str], None],
) -> list[float]:
    """Stage 1: the slice encoder and the slice head learn "lesion in this slice" on balanced slices, so the
    attention-pooled (multiple-instance) stage starts from informative features; from series batches alone
    (one or two patients per step, ~10 % lesion slices) it learns very slowly. Returns the step losses."""
    import keras
    import tensorflow as tf

    slice_model = keras.Model(
        model.get_layer("slice_encoder").input,
        model.get_layer("slice_head")(model.get_layer("slice_encoder").output),
    )
    pre_opt = keras.optimizers.Adam(s.learning_rate)

    @tf.function(reduce_retracing=True, autograph=False)
    def pretrain_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            logit = tf.reshape(slice_model(x, training=True), (-1,))
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logit))
        grads = tape.gradient(loss, slice_model.trainable_variables)
        pre_opt.apply_gradients(zip(grads, slice_model.trainable_variables, strict=True))
        return loss

    pre_losses: list[float] = []
    with epoch_bar(s.pretrain_steps, 0, s.epochs, progress) as bar:
        bar.set_description("slice warm-up")
        for x, y in _pretrain_batches(train, s, cfg, rng):
            pre_losses.append(float(pretrain_step(x, y)))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(pre_losses[-50:]):.3f}")
    if pre_losses:
        log(f"slice warm-up: {len(pre_losses)} steps, loss {np.mean(pre_losses[:20]):.3f} → {np.mean(pre_losses[-20:]):.3f}")
    return pre_losses


def _val_loss(yv: np.ndarray, pv: np.ndarray) -> float:
    """Mean binary cross-entropy of series probabilities ``pv`` against labels ``yv``."""
    pc = np.clip(pv, 1e-6, 1 - 1e-6)
    return float(np.mean(-(yv * np.log(pc) + (1 - yv) * np.log(1 - pc))))


def _fit_classifier(
    model: Any, train_step: Any, train: list[GridCase], val: list[GridCase], s: ClassifierSettings,
    cfg: PreprocessConfig, rng: np.random.Generator, steps: int, progress: bool, log: Callable[[str], None],
) -> tuple[dict[str, list[float]], int]:
    """Stage 2: ``s.epochs`` epochs of series batches; leaves the model with the best epoch's weights (by
    validation ROC AUC, then loss; the warmed-up model is epoch 0's candidate) and returns the history and that
    epoch (the last one without ``val``)."""
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "val_auc": []}
    best: tuple[float, float] = (-1.0, -math.inf)
    best_weights = model.get_weights()
    best_epoch = 0
    if val:  # the warmed-up model (series score = attention over slice evidence) is epoch 0's candidate
        yv = np.array([c.label for c in val])
        pv = predict_classifier(model, val, cfg, s.clinical_inputs)
        best = (roc_auc(yv.tolist(), pv.tolist()), -_val_loss(yv, pv))
        log(f"after warm-up: val_auc {best[0]:.3f}")
    for epoch in range(1, s.epochs + 1):
        tot, correct, n = 0.0, 0, 0
        with epoch_bar(steps, epoch, s.epochs, progress) as bar:
            for x, clin, y, sl in _classifier_batches(train, s, cfg, rng):
                loss, p = train_step(x, clin, y, sl)
                tot += float(loss) * len(y)
                correct += int(np.sum((np.asarray(p) >= 0.5) == (y >= 0.5)))
                n += len(y)
                bar.update(1)
                bar.set_postfix(loss=f"{tot / n:.3f}", acc=f"{correct / n:.3f}")
        history["loss"].append(tot / max(n, 1))
        history["accuracy"].append(correct / max(n, 1))
        if val:
            yv = np.array([c.label for c in val])
            pv = predict_classifier(model, val, cfg, s.clinical_inputs)
            history["val_loss"].append(_val_loss(yv, pv))
            history["val_accuracy"].append(float(np.mean((pv >= 0.5) == yv)))
            history["val_auc"].append(roc_auc(yv.tolist(), pv.tolist()))
            score = (history["val_auc"][-1], -history["val_loss"][-1])
            log(f"epoch {epoch}: loss {history['loss'][-1]:.3f} acc {history['accuracy'][-1]:.3f} "
                f"val_loss {history['val_loss'][-1]:.3f} val_auc {history['val_auc'][-1]:.3f}")
            if score > best:
                best, best_weights, best_epoch = score, model.get_weights(), epoch
        else:
            best_weights, best_epoch = model.get_weights(), epoch
    model.set_weights(best_weights)
    return history, best_epoch



def _classifier_validation(
    model: Any, val: list[GridCase], cfg: PreprocessConfig, val_description: dict[str, Any] | None,
    s: ClassifierSettings, log: Callable[[str], None],
) -> tuple[float, dict[str, Any], dict[str, Any] | None]:
    """The operating threshold (Youden J on ``val``; 0.5 without), the validation metrics for the card and the
    post-hoc calibration fitted on ``val`` (None without it or with ``s.calibration == "none"``); with calibration
    the threshold is returned on the calibrated scale (same decisions)."""
    threshold, val_metrics, calibration = 0.5, {}, None
    if val:
        yv = np.array([c.label for c in val])
        pv = predict_classifier(model, val, cfg, s.clinical_inputs)
        threshold = youden_threshold(yv.tolist(), pv.tolist())
        pred = pv >= threshold
        val_metrics = {
            "dataset": val_description,
            "roc_auc": roc_auc(yv.tolist(), pv.tolist()),
            "sensitivity": float(pred[yv == 1].mean()) if (yv == 1).any() else None,
            "specificity": float((~pred[yv == 0]).mean()) if (yv == 0).any() else None,
            "threshold_rule": "Youden J on the validation set",
        }
        if s.calibration == "temperature":
            calibration = calibration_block(yv, pv, threshold, fitted_on="the validation set (in cross-validation: "
                                            "the fold's inner split)")
            threshold = calibration["threshold"]
            log(f"calibration: temperature {calibration['temperature']:.3f}, validation ECE "
                f"{calibration['validation_ece_before']:.3f} → {calibration['validation_ece_after']:.3f}")
    return threshold, val_metrics, calibration


def _classifier_card(
    model: Any, s: ClassifierSettings, cfg: PreprocessConfig, *, version: str, threshold: float,
    val_metrics: dict[str, Any], calibration: dict[str, Any] | None, train_description: dict[str, Any] | None,
    best_epoch: int, pre_losses: list[float], load_seconds: float, train_seconds: float,
) -> dict[str, Any]:
    """The classifier's model card (`write_model` adds the weights' checksum)."""
    return {
        "name": "pacsnode-pneumonia-classifier",
        "version": version,
        "kind": "classifier",
        "task": "series-level pneumonia vs normal on chest CT, with per-slice attention",
        "intended_use": "Demonstration and testing of the pacs-ai-node pipeline. " + NOT_FOR_CLINICAL_USE,
        "not_for_clinical_use": True,
        "limitations": [
            "Trained only on synthetic phantoms from training.phantom; says nothing about real patients.",
            "The phantoms' lesions are blobs of ground glass or consolidation; real pneumonia, other diseases, "
            "contrast, artefacts and other anatomy are absent.",
            "Clinical fusion (age, sex, fever, cough, dyspnoea) learnt from simulated correlations; in the node "
            "symptoms come only from request free text in the header and are usually missing.",
        ],
        "clinical_inputs": clinical_card(s),
        "architecture": {
            "slice_encoder": f"CNN, widths {list(s.widths)}, stride-2 blocks, GAP+GMP, {s.features} features",
            "pooling": "gated attention over slices (Ilse et al. 2018)",
            "series_score": "sigmoid(attention-weighted sum of per-slice lesion logits + a correction from the "
            "attention-pooled features and the clinical inputs)",
            "fusion": "late fusion of the clinical inputs, value + missing indicator each (models.clinical)",
            "slice_head": "per-slice lesion logit, supervised by the phantom masks (slice warm-up, then jointly)",
            "parameters": int(model.count_params()),
        },
        "preprocessing": cfg.to_dict(),
        "threshold": threshold,
        "threshold_rule": "Youden J on the validation set" + (", mapped to the calibrated scale" if calibration else ""),
        "calibration": calibration,
        "training": {
            "data": train_description,
            "settings": {**s.__dict__, "widths": list(s.widths)},
            "loss": ("BCE" if s.loss != "focal" else "focal loss (gamma 2)")
            + (", class-weighted (inverse class frequency)" if s.class_weighting else ", no class weighting")
            + " on the series + positive-weighted BCE on slices",
            "schedule": f"{s.pretrain_steps} slice warm-up steps (balanced, lung-matched negatives), then "
            f"{s.epochs} epochs of series batches; best epoch by validation ROC AUC",
            "augmentation": "left-right flip, rotation ±12°, Gaussian noise ≤25 HU, HU shift ±30, slice windows, "
            "every-second-slice subsampling",
            "best_epoch": best_epoch,
            "slice_warmup_loss": [round(float(np.mean(pre_losses[:20])), 4), round(float(np.mean(pre_losses[-20:])), 4)]
            if pre_losses else None,
            "load_seconds": round(load_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "environment": training_environment(),
        },
        "metrics": {"validation": val_metrics},
    }
