"""Training of the lung/lesion U-Net on a phantom dataset (``pacsnode train segmenter``).

``train_segmenter(data, out, ...)`` reads the dataset through :func:`training.common.load_grid_cases` (the node's own
preprocessing), trains on sampled slices (`SegmenterSettings`: how many carry lesion, drawn per slice or per lesion
case — `lesion_picks` — and what share of them are the model's own misses and false positives, re-mined every
epoch — `hard_positives`, `hard_negatives`), keeps the weights of the best validation epoch (lung + lesion Dice) and
writes the run like the classifier's trainer (:func:`training.common.save_run`). Raises
:class:`training.common.TrainingError`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.preprocess import PreprocessConfig, augment, window
from training.common import (
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
    # Share of the lesion-free part of each batch drawn from *hard negatives*: lesion-free slices on which the model,
    # as it stands at the start of the epoch, marks lesion somewhere (p >= HARD_NEGATIVE_P) — its own false
    # positives, re-mined every epoch. 0 draws every lesion-free slice alike.
    hard_negative_fraction: float = 0.0
    # Share of the lesion part of each batch drawn from *hard positives*: lesion slices on which the model, at the
    # start of the epoch, finds less than HARD_POSITIVE_RECALL of the lesion (p >= 0.5) — e.g. a dense consolidation
    # against the chest wall or the mediastinum that it takes for soft tissue. 0 draws lesion slices as
    # ``lesion_sampling`` says.
    hard_positive_fraction: float = 0.0
    # Which misses count as hard positives: "any" (lesion found on less than half its pixels), or "background" (of
    # those, the ones whose missed pixels the model mostly calls background rather than lung: a dense lesion taken
    # for the wall or the mediastinum, not a faint one taken for lung).
    hard_positive_kind: str = "any"

    def __post_init__(self) -> None:
        if self.lesion_sampling not in LESION_SAMPLING:
            raise TrainingError(f"lesion_sampling must be one of {', '.join(LESION_SAMPLING)}, not {self.lesion_sampling!r}")
        if not 0.0 < self.lesion_fraction < 1.0:
            raise TrainingError(f"lesion_fraction must lie strictly between 0 and 1, not {self.lesion_fraction}")
        if not 0.0 <= self.hard_negative_fraction < 1.0:
            raise TrainingError(f"hard_negative_fraction must lie in [0, 1), not {self.hard_negative_fraction}")
        if not 0.0 <= self.hard_positive_fraction < 1.0:
            raise TrainingError(f"hard_positive_fraction must lie in [0, 1), not {self.hard_positive_fraction}")
        if self.hard_positive_kind not in HARD_POSITIVE_KINDS:
            raise TrainingError(f"hard_positive_kind must be one of {', '.join(HARD_POSITIVE_KINDS)}, "
                                f"not {self.hard_positive_kind!r}")


LESION_SAMPLING = ("slice", "case")
HARD_POSITIVE_KINDS = ("any", "background")
HARD_NEGATIVE_P = 0.5
HARD_POSITIVE_RECALL = 0.5
HARD_POSITIVE_MIN_PIXELS = 4  # a lesion's edge on 1–3 pixels of a slice (partial volume) is never "hard"


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


def hard_negatives(model: Any, cases: list[GridCase], without: np.ndarray, cfg: PreprocessConfig,
                   batch: int = 64) -> np.ndarray:
    """The rows of ``without`` (lesion-free (case, slice) pairs) on which ``model`` puts a lesion probability of at
    least `HARD_NEGATIVE_P` somewhere: its false positives, to be shown to it more often."""
    return _mine(model, cases, without, cfg, batch,
                 lambda p, t: p[..., 2].max(axis=(1, 2)) >= HARD_NEGATIVE_P)


def hard_positives(model: Any, cases: list[GridCase], with_les: np.ndarray, cfg: PreprocessConfig,
                   batch: int = 64, kind: str = "any") -> np.ndarray:
    """The rows of ``with_les`` (lesion (case, slice) pairs) whose lesion, at least `HARD_POSITIVE_MIN_PIXELS` pixels,
    ``model`` finds less than `HARD_POSITIVE_RECALL` of (lesion probability >= 0.5): its misses, to be shown to it
    more often. ``kind="background"`` keeps only those whose missed pixels it mostly calls background (the largest
    of the three probabilities) rather than lung."""

    def missed(p: np.ndarray, t: np.ndarray) -> np.ndarray:
        les = t == 2
        n = les.sum(axis=(1, 2))
        found = (les & (p[..., 2] >= 0.5)).sum(axis=(1, 2))
        hard = (n >= HARD_POSITIVE_MIN_PIXELS) & (found < HARD_POSITIVE_RECALL * n)
        if kind == "background":
            cls = p.argmax(-1)
            hard &= (les & (cls == 0)).sum(axis=(1, 2)) > (les & (cls == 1)).sum(axis=(1, 2))
        return hard

    return _mine(model, cases, with_les, cfg, batch, missed)


def _mine(model: Any, cases: list[GridCase], rows: np.ndarray, cfg: PreprocessConfig, batch: int,
          keep_slices: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """The rows of ``rows`` ((case, slice) pairs) for which ``keep_slices(softmax, target)`` — both stacked over one
    case's listed slices — is true."""
    fn = _predict_fn(model, cfg)
    keep = np.zeros(len(rows), dtype=bool)
    for ci in np.unique(rows[:, 0]):
        sel = np.flatnonzero(rows[:, 0] == ci)
        c = cases[int(ci)]
        x = window(c.hu[rows[sel, 1]].astype(np.float32), cfg)
        target = c.target[rows[sel, 1]] if c.target is not None else np.zeros(x.shape[:3], dtype=np.uint8)
        keep[sel] = keep_slices(_batched(fn, x, batch), target)
    return rows[keep]


def _predict_fn(model: Any, cfg: PreprocessConfig) -> Any:
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), autograph=False,
                       input_signature=[tf.TensorSpec((None, cfg.grid, cfg.grid, cfg.channels), tf.float32)])


def _batched(fn: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``x`` in batches of ``batch``, concatenated."""
    return np.concatenate([np.asarray(fn(x[a : a + batch])) for a in range(0, len(x), batch)])


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
    fn = _predict_fn(model, cfg)
    outs = []
    for c in cases:
        x = window(c.hu.astype(np.float32), cfg)
        outs.append(_batched(fn, x, batch))
    return outs


def grid_dice(cases: list[GridCase], probs: list[np.ndarray]) -> dict[str, float]:
    """Mean per-case lung Dice, mean lesion Dice over cases with lesion, and the share of lesion-free cases in which
    some pixel is called lesion (what a SEG of a normal study would wrongly show), on the model grid."""
    from models.preprocess import dice

    lung, les, false_lesion = [], [], []
    for c, p in zip(cases, probs, strict=True):
        assert c.target is not None
        cls = p.argmax(-1)
        lung.append(dice(cls > 0, c.target > 0))
        if (c.target == 2).any():
            les.append(dice(cls == 2, c.target == 2))
        else:
            false_lesion.append(bool((cls == 2).any()))
    return {"lung_dice": float(np.mean(lung)), "lesion_dice": float(np.mean(les)) if les else float("nan"),
            "normals_with_lesion": float(np.mean(false_lesion)) if false_lesion else float("nan")}


def train_segmenter(
    data: Path,
    out: Path,
    *,
    val_data: Path | None = None,
    settings: SegmenterSettings | None = None,
    version: str = "0.0.0-dev",
    progress: bool = True,
    limit: int | None = None,
    init: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the lung/lesion U-Net; returns the model card (also written to ``out``). ``init``: a model folder
    (model.keras + model_card.json, e.g. a shipped version's) whose weights training starts from, instead of
    random ones; its architecture must be the one ``settings`` describes."""
    import keras

    from models.unet import build_unet

    s = settings or SegmenterSettings()
    t0 = time.perf_counter()
    keras.utils.set_random_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    cfg = PreprocessConfig(grid=s.grid)
    model = build_unet(grid=s.grid, channels=cfg.channels, base=s.base, depth=s.depth)
    started_from = _initialise(model, Path(init), s) if init is not None else None  # refused before the slow load
    train = load_grid_cases(data, s.grid, with_targets=True, limit=limit, progress=progress, log=log)
    val = load_grid_cases(val_data, s.grid, with_targets=True, progress=progress, log=log) if val_data else []
    t_loaded = time.perf_counter()
    log(f"loaded {len(train)} training and {len(val)} validation cases in {t_loaded - t0:.0f} s")
    with_les, without = _slice_index(train)
    if len(with_les) + len(without) == 0:
        raise TrainingError(f"dataset {data} has no slices with lung")

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
    if started_from is not None:
        card["training"]["initialised_from"] = started_from
    save_run(model, Path(out), card, history, "segmenter")
    return card


def _initialise(model: Any, folder: Path, s: SegmenterSettings) -> dict[str, Any]:
    """Copy the weights of the U-Net in ``folder`` into ``model``; returns what the card records of it."""
    import keras

    from models.registry import CARD_FILE, MODEL_FILE, sha256_file

    try:
        card = json.loads((folder / CARD_FILE).read_text())
        source = keras.models.load_model(folder / MODEL_FILE, compile=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the U-Net to start from in {folder}: {exc}") from exc
    arch = card.get("architecture", {})
    if (arch.get("base_filters"), arch.get("depth"), card.get("preprocessing", {}).get("grid")) != (s.base, s.depth, s.grid):
        raise TrainingError(f"the U-Net in {folder} (base {arch.get('base_filters')}, depth {arch.get('depth')}, grid "
                            f"{card.get('preprocessing', {}).get('grid')}) is not the one to train (base {s.base}, "
                            f"depth {s.depth}, grid {s.grid})")
    model.set_weights(source.get_weights())
    return {"name": card.get("name"), "version": card.get("version"), "sha256": sha256_file(folder / MODEL_FILE)}


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
    history: dict[str, list[float]] = {"loss": [], "pixel_accuracy": [], "val_lung_dice": [], "val_lesion_dice": [],
                                       "val_normals_with_lesion": [], "hard_negatives": [], "hard_positives": []}
    best_score, best_weights, best_epoch = -1.0, model.get_weights(), 0
    n_les = int(round(s.batch_size * s.lesion_fraction)) if len(with_les) else 0
    for epoch in range(1, s.epochs + 1):
        tot, acc_sum = 0.0, 0.0
        hard, n_hard = np.empty((0, 2), dtype=np.int64), 0
        if s.hard_negative_fraction > 0 and len(without):
            hard = hard_negatives(model, train, without, cfg)
            n_hard = int(round((s.batch_size - n_les) * s.hard_negative_fraction)) if len(hard) else 0
            history["hard_negatives"].append(float(len(hard)))
            log(f"epoch {epoch}: {len(hard)} of {len(without)} lesion-free slices are hard negatives")
        missed, n_missed = np.empty((0, 2), dtype=np.int64), 0
        if s.hard_positive_fraction > 0 and n_les:
            missed = hard_positives(model, train, with_les, cfg, kind=s.hard_positive_kind)
            n_missed = int(round(n_les * s.hard_positive_fraction)) if len(missed) else 0
            history["hard_positives"].append(float(len(missed)))
            log(f"epoch {epoch}: {len(missed)} of {len(with_les)} lesion slices are hard positives")
        with epoch_bar(s.steps_per_epoch, epoch, s.epochs, progress) as bar:
            for step in range(s.steps_per_epoch):
                picks = []
                if n_missed:
                    picks.append(missed[rng.integers(0, len(missed), n_missed)])
                if n_les - n_missed:
                    picks.append(lesion_picks(with_les, n_les - n_missed, s.lesion_sampling, rng))
                if n_hard:
                    picks.append(hard[rng.integers(0, len(hard), n_hard)])
                if len(without):
                    picks.append(without[rng.integers(0, len(without), s.batch_size - n_les - n_hard)])
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
            history["val_normals_with_lesion"].append(d["normals_with_lesion"])
            log(f"epoch {epoch}: loss {history['loss'][-1]:.3f} val lung Dice {d['lung_dice']:.3f} "
                f"val lesion Dice {d['lesion_dice']:.3f} val normals with lesion {d['normals_with_lesion']:.2f}")
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
            + (", drawn case first (each lesion case equally likely)" if s.lesion_sampling == "case" else "")
            + (f"; {s.hard_negative_fraction:.0%} of the lesion-free ones are hard negatives (slices where the "
               "model, at each epoch's start, calls lesion)" if s.hard_negative_fraction else "")
            + (f"; {s.hard_positive_fraction:.0%} of the lesion ones are hard positives (slices where the model, at "
               "each epoch's start, finds less than half of the lesion"
               + (", calling most of the rest background" if s.hard_positive_kind == "background" else "") + ")"
               if s.hard_positive_fraction else ""),
            "best_epoch": best_epoch,
            "load_seconds": round(load_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "environment": training_environment(),
        },
        "metrics": {"validation": val_metrics},
    }
