"""models.unet: shapes, targets, loss, a tiny U-Net learning lungs on phantom slices."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.preprocess import PreprocessConfig, load_series, masks_to_grid, to_model_input
from models.unet import build_unet, seg_loss, targets_from_fractions

from .util import case_files, case_masks


def test_shapes_and_softmax() -> None:
    model = build_unet(grid=32, channels=2, base=4, depth=2)
    out = np.asarray(model(np.zeros((3, 32, 32, 2), np.float32), training=False))
    assert out.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        build_unet(grid=30, depth=2)


def test_targets_from_fractions() -> None:
    lung = np.array([[0.0, 0.6, 1.0, 1.0]])
    lesion = np.array([[0.0, 0.0, 0.4, 0.7]])
    np.testing.assert_array_equal(targets_from_fractions(lung, lesion), [[0, 1, 1, 2]])


def test_seg_loss_prefers_the_right_answer() -> None:
    y = np.array([[[0, 1], [2, 2]]], np.int32)
    right = tf.one_hot(y, 3) * 0.98 + 0.01 / 1.5
    wrong = tf.one_hot((y + 1) % 3, 3) * 0.98 + 0.01 / 1.5
    assert float(seg_loss(y, right)) < 0.3 < float(seg_loss(y, wrong))


def test_tiny_unet_loss_goes_down_on_phantom_slices(small_phantom: Path) -> None:
    keras.utils.set_random_seed(3)
    cfg = PreprocessConfig(grid=32)
    vol = load_series(case_files(small_phantom, 0))
    m = case_masks(small_phantom, 0)
    idx = np.arange(4, 16, 2)
    x = to_model_input(vol.hu[idx], cfg)
    y = targets_from_fractions(masks_to_grid(m["lungs"][idx], 32), masks_to_grid(m["lesion"][idx], 32))
    assert (y == 1).any()
    model = build_unet(grid=32, channels=2, base=8, depth=2)
    opt = keras.optimizers.Adam(3e-3)
    losses = []
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = seg_loss(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
