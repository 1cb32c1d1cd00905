"""2-D U-Net for lungs and pneumonia lesions, run slice-wise on the model grid.

:func:`build_unet` returns a Keras 3 model (N, grid, grid, C) → (N, grid, grid, 3) softmax over
{background, lung, lesion} (lesion is inside the lung, so lungs = classes 1 ∪ 2). :func:`targets_from_fractions`
makes the training targets from mask area fractions on the grid, :func:`seg_loss` is cross-entropy + soft Dice.
Masks go back to the source grid with :func:`models.preprocess.masks_to_source`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

CLASSES = ("background", "lung", "lesion")


def _double_conv(x: Any, filters: int, name: str) -> Any:
    for i in range(2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        # Group norm: per-slice statistics, so a slice's mask does not depend on the rest of its batch and
        # training (lesion-enriched batches) and inference (whole series) normalise alike.
        x = layers.GroupNormalization(groups=max(1, min(8, filters // 4)), name=f"{name}_gn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(grid: int = 128, channels: int = 2, base: int = 12, depth: int = 4) -> keras.Model:
    """U-Net with ``depth`` poolings and ``base`` filters at full resolution (doubling per level)."""
    if grid % (2**depth):
        raise ValueError(f"build_unet: grid {grid} must be divisible by 2**depth = {2**depth}")
    inp = keras.Input((grid, grid, channels), name="slices")
    x = inp
    skips = []
    for d in range(depth):
        x = _double_conv(x, base * 2**d, f"down{d}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{d}")(x)
    x = _double_conv(x, base * 2**depth, "bottom")
    for d in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2**d, 2, strides=2, name=f"up{d}")(x)
        x = layers.Concatenate(name=f"skip{d}")([x, skips[d]])
        x = _double_conv(x, base * 2**d, f"dec{d}")
    out = layers.Conv2D(len(CLASSES), 1, activation="softmax", name="probabilities")(x)
    return keras.Model(inp, out, name="lung_lesion_unet")


def targets_from_fractions(lung_frac: np.ndarray, lesion_frac: np.ndarray) -> np.ndarray:
    """Area fractions on the grid (N, H, W) → int class map: lesion where its fraction ≥ ½, else lung, else 0."""
    y = np.zeros(lung_frac.shape, dtype=np.int32)
    y[lung_frac >= 0.5] = 1
    y[lesion_frac >= 0.5] = 2
    return y


def seg_loss(y_true: Any, probs: Any, *, dice_weight: float = 1.0, eps: float = 1.0) -> Any:
    """Pixel cross-entropy + soft Dice loss of the lung (1 ∪ 2) and lesion (2) foregrounds.

    ``y_true`` int (N, H, W); ``probs`` softmax (N, H, W, 3). Dice is computed over the whole batch, so
    slices without lesion do not dominate it.
    """
    onehot = ops.one_hot(ops.cast(y_true, "int32"), len(CLASSES))
    ce = ops.mean(-ops.sum(onehot * ops.log(ops.clip(probs, 1e-7, 1.0)), axis=-1))
    lung_t = onehot[..., 1] + onehot[..., 2]
    lung_p = probs[..., 1] + probs[..., 2]
    les_t, les_p = onehot[..., 2], probs[..., 2]

    def soft_dice(t: Any, p: Any) -> Any:
        return (2.0 * ops.sum(t * p) + eps) / (ops.sum(t) + ops.sum(p) + eps)

    return ce + dice_weight * (2.0 - soft_dice(lung_t, lung_p) - soft_dice(les_t, les_p))
