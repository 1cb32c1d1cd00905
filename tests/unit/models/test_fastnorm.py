"""models.fastnorm: the inference copy's GroupNormalization computes what Keras's does, on toy and shipped models."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from models.fastnorm import FastGroupNormalization, _layers, fast_norm_copy
from models.preprocess import load_series, volume_grid, window
from models.registry import Registry, _LoadedModel

from .util import case_files


def _toy(groups: int, channels: int, center: bool = True, scale: bool = True) -> keras.Model:
    inputs = keras.Input((9, 7, 3))
    x = keras.layers.Conv2D(channels, 3, padding="same")(inputs)
    x = keras.layers.GroupNormalization(groups=groups, center=center, scale=scale, epsilon=1e-3)(x)
    outputs = keras.layers.Conv2D(2, 1)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(groups * 10 + channels)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.mark.parametrize(("groups", "channels", "center", "scale"),
                         [(1, 4, True, True), (2, 8, True, True), (4, 4, True, True), (3, 12, False, True),
                          (2, 6, True, False)])
def test_the_fast_layer_computes_keras_group_normalization(groups: int, channels: int, center: bool,
                                                           scale: bool) -> None:
    model = _toy(groups, channels, center, scale)
    copy = fast_norm_copy(model)
    assert [type(layer) for layer in copy.layers].count(FastGroupNormalization) == 1
    rng = np.random.default_rng(0)
    for offset in (0.0, 300.0):  # a large common offset: the two-pass variance stays accurate
        x = (rng.normal(size=(5, 9, 7, 3)) * 40 + offset).astype(np.float32)
        expected, got = np.asarray(model(x, training=False)), np.asarray(copy(x, training=False))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_a_model_without_group_normalization_is_returned_as_it_is() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert fast_norm_copy(model) is model


def test_the_shipped_models_load_with_the_fast_layer_and_agree_with_the_saved_ones(small_phantom: Path) -> None:
    registry = Registry()
    volume = load_series(case_files(small_phantom, 0))
    seg_saved = _LoadedModel(registry.folder("segmenter", None), "segmenter").model
    seg_fast = registry.segmenter()._m.model
    assert any(type(layer) is FastGroupNormalization for layer in _layers(seg_fast))
    assert not any(type(layer) is FastGroupNormalization for layer in _layers(seg_saved))
    cfg = registry.segmenter().preprocess
    x = window(volume_grid(volume, cfg.grid), cfg).astype(np.float32)
    saved, fast = np.asarray(seg_saved(x, training=False)), np.asarray(seg_fast(x, training=False))
    assert np.abs(saved - fast).max() < 1e-3
    assert (saved.argmax(-1) == fast.argmax(-1)).mean() >= 0.9999
    assert (saved.argmax(-1) == 2).any(), "the phantom has lesion pixels: the check covers all three classes"

    cls_saved = _LoadedModel(registry.folder("classifier", None), "classifier").model
    cls_fast = registry.classifier()._m.model
    assert any(type(layer) is FastGroupNormalization for layer in _layers(cls_fast))  # inside the slice encoder
    cfg = registry.classifier().preprocess
    inputs = {"slices": window(volume_grid(volume, cfg.grid), cfg)[None].astype(np.float32),
              "clinical": registry.classifier().fusion_input()[1].astype(np.float32)}
    a, b = cls_saved(inputs, training=False), cls_fast(inputs, training=False)
    assert abs(float(np.asarray(a["probability"]).ravel()[0]) - float(np.asarray(b["probability"]).ravel()[0])) < 1e-4
    np.testing.assert_allclose(np.asarray(b["attention"]), np.asarray(a["attention"]), atol=1e-5)
