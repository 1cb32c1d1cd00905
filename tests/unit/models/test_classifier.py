"""models.classifier: shapes, attention, save/load with the custom layers, a tiny model learning on phantoms."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import CLINICAL_FEATURES, build_classifier, clinical_vector, focal_bce
from models.clinical import AGE_SEX_SYMPTOMS, ClinicalInputs, encode
from models.preprocess import PreprocessConfig, load_series, to_model_input

from .util import case_files, case_masks

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras saving TF variables under numpy 2


def _tiny() -> keras.Model:
    return build_classifier(grid=32, channels=2, widths=(8, 16), features=16, attention_units=8)


def test_outputs_and_attention() -> None:
    keras.utils.set_random_seed(0)
    model = _tiny()
    x = np.random.default_rng(0).random((2, 5, 32, 32, 2), dtype=np.float32)
    out = model({"slices": x, "clinical": np.zeros((2, CLINICAL_FEATURES), np.float32)}, training=False)
    assert tuple(out["probability"].shape) == (2, 1)
    assert tuple(out["attention"].shape) == (2, 5) and tuple(out["slice_logit"].shape) == (2, 5)
    p = np.asarray(out["probability"])
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(np.asarray(out["attention"]).sum(axis=1), 1.0, rtol=1e-5)
    # Any number of slices: the same model takes a 9-slice series.
    out9 = model({"slices": x[:1, :3].repeat(3, axis=1), "clinical": np.zeros((1, CLINICAL_FEATURES), np.float32)}, training=False)
    assert tuple(out9["attention"].shape) == (1, 9)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    model = _tiny()
    x = np.random.default_rng(1).random((1, 4, 32, 32, 2), dtype=np.float32)
    c = encode(ClinicalInputs(age=60, sex="F", cough=1.0), AGE_SEX_SYMPTOMS)[None]
    before = model({"slices": x, "clinical": c}, training=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    after = loaded({"slices": x, "clinical": c}, training=False)
    for k in ("probability", "attention", "slice_logit"):
        np.testing.assert_allclose(np.asarray(before[k]), np.asarray(after[k]), rtol=1e-5, atol=1e-6)


def test_clinical_vector_encodes_missing_values() -> None:
    np.testing.assert_array_equal(clinical_vector(None, None), [0, 1, 0, 0])
    np.testing.assert_allclose(clinical_vector(75, "m"), [1.0, 0, 1, 0])
    np.testing.assert_allclose(clinical_vector(35, "F"), [-1.0, 0, 0, 1])


def test_focal_loss_matches_formula() -> None:
    y = np.array([1.0, 0.0, 1.0], np.float32)
    p = np.array([0.9, 0.2, 0.3], np.float32)
    pt = np.where(y == 1, p, 1 - p)
    expected = np.mean(-0.25 ** (1 - y) * 0.75**y * (1 - pt) ** 2 * np.log(pt))
    got = float(focal_bce(y, p, gamma=2.0, alpha=0.75))
    assert got == pytest.approx(expected, rel=1e-5)
    # gamma = 0 is weighted cross-entropy; confident right answers cost less than wrong ones.
    assert float(focal_bce(np.ones(1), np.array([0.99]), gamma=0)) < float(focal_bce(np.ones(1), np.array([0.01]), gamma=0))


def test_tiny_classifier_loss_goes_down_on_phantoms(small_phantom: Path, tiny_phantom: Path) -> None:
    keras.utils.set_random_seed(2)
    cfg = PreprocessConfig(grid=32)
    xs, slice_y, ys = [], [], []
    # Two pneumonia series (slice labels from the masks) and one normal one, 12 slices each.
    for data, i in ((small_phantom, 0), (small_phantom, 1), (tiny_phantom, 2)):
        vol = load_series(case_files(data, i))
        les = case_masks(data, i)["lesion"].any(axis=(1, 2))
        idx = np.linspace(0, vol.shape[0] - 1, 12).astype(int)
        xs.append(to_model_input(vol.hu[idx], cfg))
        slice_y.append(les[idx].astype(np.float32))
        ys.append(float(les.any()))
    assert ys == [1.0, 1.0, 0.0]
    x, sl, y = np.stack(xs), np.stack(slice_y), np.array(ys, np.float32)
    clin = np.zeros((3, CLINICAL_FEATURES), np.float32)
    model = _tiny()
    opt = keras.optimizers.Adam(3e-3)

    def loss_fn() -> tf.Tensor:
        out = model({"slices": x, "clinical": clin}, training=True)
        p = tf.clip_by_value(tf.reshape(out["probability"], (-1,)), 1e-6, 1 - 1e-6)
        series = -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
        return series + 0.5 * tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(sl, out["slice_logit"]))

    losses = []
    for _ in range(25):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
