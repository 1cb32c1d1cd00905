"""Training of the lung/lesion U-Net on a phantom dataset (``pacsnode train segmenter``).

``train_segmenter(data, out, ...)`` reads the dataset through :func:`training.train.load_grid_cases` (the node's own
preprocessing), trains on sampled slices (`SegmenterSettings`: how many carry lesion, drawn per slice or per lesion
case — `lesion_picks`), keeps the weights of the best validation epoch (lung + lesion Dice) and writes the run like
the classifier's trainer (:func:`training.train.save_run`). Raises :class:`training.train.TrainingError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.preprocess import PreprocessConfig, augment, window
from training.train import (
    NOT_FOR_CLINICAL_USE,
    GridCase,
    TrainingError,
    describe_data,
    epoch_bar,
    load_grid_cases,
    save_run,
    training_environment,
)


@dataclass(frozen=True)
class SegmenterSettings:
    epochs: int = 14
    seed: int = 0
    grid: int = 128
    base: int = 12
    depth: int = 3
    batch_size: int = 24
    steps_per_epoch: int = 120
    lesion_fraction: float = 0.5  # share of sampled slices that contain lesion
    learning_rate: float = 2e-3
    dice_weight: float = 1.0
    # How the lesion share is drawn: "slice" — every lesion slice equally likely, so a case with large lesions on
    # 40 slices is drawn 20 times as often as one faint lesion on two; "case" — a lesion case first (each equally
    # likely), then one of its lesion slices, so small single lesions get the same share of training as extensive
    # disease (the classifier's and the segmenter's misses are those).
    lesion_sampling: str = "slice"

    def __post_init__(self) -> None:
        if self.lesion_sampling not in LESION_SAMPLING:
            raise TrainingError(f"lesion_sampling must be one of {', '.join(LESION_SAMPLING)}, not {self.lesion_sampling!r}")
        if not 0.0 < self.lesion_fraction < 1.0:
            raise TrainingError(f"lesion_fraction must lie strictly between 0 and 1, not {self.lesion_fraction}")


LESION_SAMPLING = ("slice", "case")


def _slice_index(cases: list[GridCase]) -> tuple[np.ndarray, np.ndarray]:
    """(case, slice) pairs of slices with lung, split into those with and without lesion."""
    with_les, without = [], []
    for ci, c in enumerate(cases):
        assert c.target is not None
        lung_px = (c.target > 0).sum(axis=(1, 2))
        les_px = (c.target == 2).sum(axis=(1, 2))
        for k in range(len(c.target)):
            if les_px[k] > 0:
                with_les.append((ci, k))
            elif lung_px[k] > 0 or k % 4 == 0:  # a few lung-free slices so the net learns "nothing here"
                without.append((ci, k))
    return np.array(with_les, dtype=np.int64).reshape(-1, 2), np.array(without, dtype=np.int64).reshape(-1, 2)


def lesion_picks(with_les: np.ndarray, n: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """``n`` (case, slice) rows of ``with_les`` drawn with replacement, ``how`` as `SegmenterSettings.lesion_sampling`
    says: uniformly over the rows ("slice"), or a case uniformly among the cases present, then a row of it ("case").
    The rows of one case must be adjacent, as `_slice_index` lists them."""
    if how == "slice":
        return with_les[rng.integers(0, len(with_les), n)]
    cases, start, count = np.unique(with_les[:, 0], return_index=True, return_counts=True)  # rows sorted by case
    which = rng.integers(0, len(cases), n)
    return with_les[start[which] + (rng.random(n) * count[which]).astype(np.int64)]


def _seg_batch(
    cases: list[GridCase], picks: np.ndarray, cfg: PreprocessConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for ci, k in picks:
        c = cases[int(ci)]
        assert c.target is not None
        hu, (t,) = augment(c.hu[k : k + 1].astype(np.float32), rng, [c.target[k : k + 1]])
        xs.append(window(hu[0], cfg))
        ys.append(t[0])
    return np.stack(xs), np.stack(ys).astype(np.int32)


def predict_segmenter_grid(model: Any, cases: list[GridCase], cfg: PreprocessConfig, batch: int = 32) -> list[np.ndarray]:
    """Softmax maps on the grid for each case (no augmentation)."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False), autograph=False,
                     input_signature=[tf.TensorSpec((None, cfg.grid, cfg.grid, cfg.channels), tf.float32)])
    outs = []
    for c in cases:
        x = window(c.hu.astype(np.float32), cfg)
        outs.append(np.concatenate([np.asarray(fn(x[a : a + batch])) for a in range(0, len(x), batch)]))
    return outs


def grid_dice(cases: list[GridCase], probs: list[np.ndarray]) -> dict[str, float]:
    """Mean per-case lung Dice, mean lesion Dice over cases with lesion, on the model grid."""
    from models.preprocess import dice

    lung, les = [], []
    for c, p in zip(cases, probs, strict=True):
        assert c.target is not None
        cls = p.argmax(-1)
        lung.append(dice(cls > 0, c.target > 0))
        if (c.target == 2).any():
            les.append(dice(cls == 2, c.target == 2))
    return {"lung_dice": float(np.mean(lung)), "lesion_dice": float(np.mean(les)) if les else float("nan")}


def train_segmenter(
    data: Path,
    out: Path,
    *,
    val_data: Path | None = None,
    settings: SegmenterSettings | None = None,
    version: str = "0.0.0-dev",
    progress: bool = True,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the lung/lesion U-Net; returns the model card (also written to ``out``)."""
    import keras

    from models.unet import build_unet

    s = settings or SegmenterSettings()
    t0 = time.perf_counter()
    keras.utils.set_random_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    cfg = PreprocessConfig(grid=s.grid)
    train = load_grid_cases(data, s.grid, with_targets=True, limit=limit, progress=progress)
    val = load_grid_cases(val_data, s.grid, with_targets=True, progress=progress) if val_data else []
    t_loaded = time.perf_counter()
    log(f"loaded {len(train)} training and {len(val)} validation cases in {t_loaded - t0:.0f} s")
    with_les, without = _slice_index(train)
    if len(with_les) + len(without) == 0:
        raise TrainingError(f"dataset {data} has no slices with lung")

    model = build_unet(grid=s.grid, channels=cfg.channels, base=s.base, depth=s.depth)
    train_step = _segmenter_train_step(model, s)
    history, best_epoch = _fit_segmenter(model, train_step, train, val, with_les, without, s, cfg, rng, progress, log)
    t_trained = time.perf_counter()
    val_metrics: dict[str, Any] = {}
    if val:
        val_metrics = {
            "dataset": describe_data(Path(val_data)) if val_data else None,
            **grid_dice(val, predict_segmenter_grid(model, val, cfg)),
            "grid": "model grid (the test metrics in 'test' are on the source grid)",
        }
    history = {k: v for k, v in history.items() if v}
    card = _segmenter_card(model, s, cfg, version=version, val_metrics=val_metrics, data=data, best_epoch=best_epoch,
                           load_seconds=t_loaded - t0, train_seconds=t_trained - t_loaded)
    save_run(model, Path(out), card, history, "segmenter")
    return card


def _segmenter_train_step(model: Any, s: SegmenterSettings) -> Any:
    """The U-Net's optimiser and compiled training step ``(x, y) -> (loss, pixel accuracy)``."""
    import keras
    import tensorflow as tf

    from models.unet import seg_loss

    schedule = keras.optimizers.schedules.CosineDecay(
        s.learning_rate, decay_steps=max(1, s.steps_per_epoch * s.epochs), alpha=0.05
    )
    opt = keras.optimizers.Adam(schedule)

    @tf.function(reduce_retracing=True, autograph=False)
    def train_step(x: Any, y: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = seg_loss(y, probs, dice_weight=s.dice_weight)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return loss, acc

    return train_step


def _fit_segmenter(
    model: Any, train_step: Any, train: list[GridCase], val: list[GridCase], with_les: np.ndarray,
    without: np.ndarray, s: SegmenterSettings, cfg: PreprocessConfig, rng: np.random.Generator, progress: bool,
    log: Callable[[str], None],
) -> tuple[dict[str, list[float]], int]:
    """``s.epochs`` epochs of sampled slices (``s.lesion_fraction`` of them from ``with_les``); leaves the model with
    the best epoch's weights (by validation lung + lesion Dice) and returns the history and that epoch (the last
    one without ``val``)."""
    history: dict[str, list[float]] = {"loss": [], "pixel_accuracy": [], "val_lung_dice": [], "val_lesion_dice": []}
    best_score, best_weights, best_epoch = -1.0, model.get_weights(), 0
    n_les = int(round(s.batch_size * s.lesion_fraction)) if len(with_les) else 0
    for epoch in range(1, s.epochs + 1):
        tot, acc_sum = 0.0, 0.0
        with epoch_bar(s.steps_per_epoch, epoch, s.epochs, progress) as bar:
            for step in range(s.steps_per_epoch):
                picks = []
                if n_les:
                    picks.append(lesion_picks(with_les, n_les, s.lesion_sampling, rng))
                if len(without):
                    picks.append(without[rng.integers(0, len(without), s.batch_size - n_les)])
                x, y = _seg_batch(train, np.concatenate(picks), cfg, rng)
                loss, acc = train_step(x, y)
                tot += float(loss)
                acc_sum += float(acc)
                bar.update(1)
                bar.set_postfix(loss=f"{tot / (step + 1):.3f}", acc=f"{acc_sum / (step + 1):.3f}")
        history["loss"].append(tot / s.steps_per_epoch)
        history["pixel_accuracy"].append(acc_sum / s.steps_per_epoch)
        if val:
            d = grid_dice(val, predict_segmenter_grid(model, val, cfg))
            history["val_lung_dice"].append(d["lung_dice"])
            history["val_lesion_dice"].append(d["lesion_dice"])
            log(f"epoch {epoch}: loss {history['loss'][-1]:.3f} val lung Dice {d['lung_dice']:.3f} "
                f"val lesion Dice {d['lesion_dice']:.3f}")
            score = d["lung_dice"] + d["lesion_dice"]
            if score > best_score:
                best_score, best_weights, best_epoch = score, model.get_weights(), epoch
        else:
            best_weights, best_epoch = model.get_weights(), epoch
    model.set_weights(best_weights)
    return history, best_epoch


def _segmenter_card(
    model: Any, s: SegmenterSettings, cfg: PreprocessConfig, *, version: str, val_metrics: dict[str, Any],
    data: Path, best_epoch: int, load_seconds: float, train_seconds: float,
) -> dict[str, Any]:
    """The U-Net's model card (`write_model` adds the weights' checksum)."""
    return {
        "name": "pacsnode-lung-lesion-unet",
        "version": version,
        "kind": "segmenter",
        "task": "slice-wise segmentation of lungs and pneumonia lesions on chest CT",
        "intended_use": "Demonstration and testing of the pacs-ai-node pipeline. " + NOT_FOR_CLINICAL_USE,
        "not_for_clinical_use": True,
        "limitations": [
            "Trained only on synthetic phantoms from training.phantom; says nothing about real patients.",
            f"Runs on a {s.grid}² grid; masks are resampled to the source grid, so lesions of a few source "
            "pixels are lost.",
        ],
        "architecture": {
            "type": "2-D U-Net",
            "base_filters": s.base,
            "depth": s.depth,
            "classes": ["background", "lung", "lesion"],
            "parameters": int(model.count_params()),
        },
        "preprocessing": cfg.to_dict(),
        "training": {
            "data": describe_data(Path(data)),
            "settings": s.__dict__,
            "loss": "pixel cross-entropy + soft Dice (lungs, lesion)",
            "augmentation": "left-right flip, rotation ±12°, Gaussian noise ≤25 HU, HU shift ±30; "
            f"{int(s.lesion_fraction * 100)} % of sampled slices contain lesion"
            + (", drawn case first (each lesion case equally likely)" if s.lesion_sampling == "case" else ""),
            "best_epoch": best_epoch,
            "load_seconds": round(load_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "environment": training_environment(),
        },
        "metrics": {"validation": val_metrics},
    }
