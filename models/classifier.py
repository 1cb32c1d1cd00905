"""Series classifier: a small slice CNN, gated attention pooling over the slices, clinical late fusion.

:func:`build_classifier` returns a Keras 3 model with inputs ``slices`` (B, S, H, W, C) — model-grid slices from
:func:`models.preprocess.to_model_input` — and ``clinical`` (B, F): F = 10 for the ``age-sex-symptoms`` schema
of :mod:`models.clinical` (classifier 2.x), 4 for ``age-sex`` (1.x, :func:`clinical_vector`); its outputs are
``probability`` (B, 1) P(pneumonia), ``attention`` (B, S) (softmax over the slices: which slices drove the
score) and ``slice_logit`` (B, S) (an auxiliary per-slice lesion score used as deep supervision in training).
The custom layers are registered with Keras, so importing this module is enough to load a saved model.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from models.clinical import AGE_SEX, AGE_SEX_SYMPTOMS, ClinicalInputs, encode, feature_count

PACKAGE = "pacsnode"
CLINICAL_FEATURES = feature_count(AGE_SEX_SYMPTOMS)  # the current schema's width (1.x models: 4, age-sex)


def clinical_vector(age: float | None, sex: str | None) -> np.ndarray:
    """(4,) float32 ``age-sex`` features (the 1.x classifiers' input); missing age or sex is encoded, never
    guessed."""
    s = (sex or "").upper()
    return encode(ClinicalInputs(age=age, sex=s or None), AGE_SEX)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FoldSlices(layers.Layer):
    """(B, S, ...) → (B*S, ...): lets one 2-D encoder see every slice of every series in a single batch."""

    def call(self, x: Any) -> Any:
        shape = ops.shape(x)
        return ops.reshape(x, (-1, *shape[2:]))

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        b, s = input_shape[0], input_shape[1]
        return (None if b is None or s is None else b * s, *input_shape[2:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class UnfoldSlices(layers.Layer):
    """(B*S, F) plus the (B, S, ...) reference → (B, S, F)."""

    def call(self, x: Any, reference: Any) -> Any:
        ref = ops.shape(reference)
        return ops.reshape(x, (ref[0], ref[1], ops.shape(x)[-1]))

    def compute_output_shape(self, x_shape: tuple[Any, ...], reference_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (reference_shape[0], reference_shape[1], x_shape[-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedAttentionPooling(layers.Layer):
    """Gated attention MIL pooling (Ilse et al., 2018): weights = softmax_S(w·(tanh(Vh) ⊙ sigmoid(Uh)))."""

    def __init__(self, units: int = 32, **kwargs: Any):
        super().__init__(**kwargs)
        self.units = units
        self.v = layers.Dense(units, activation="tanh")
        self.u = layers.Dense(units, activation="sigmoid")
        self.w = layers.Dense(1)

    def build(self, input_shape: tuple[Any, ...]) -> None:
        self.v.build(input_shape)
        self.u.build(input_shape)
        self.w.build((*input_shape[:-1], self.units))

    def call(self, h: Any) -> tuple[Any, Any]:
        scores = ops.squeeze(self.w(self.v(h) * self.u(h)), axis=-1)  # (B, S)
        attention = ops.softmax(scores, axis=-1)
        pooled = ops.sum(h * ops.expand_dims(attention, -1), axis=1)  # (B, F)
        return pooled, attention

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (input_shape[0], input_shape[-1]), (input_shape[0], input_shape[1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedSum(layers.Layer):
    """Σ_s attention[b, s] · values[b, s] → (B, 1): the attention-pooled slice evidence."""

    def call(self, values: Any, attention: Any) -> Any:
        return ops.sum(values * attention, axis=-1, keepdims=True)

    def compute_output_shape(self, values_shape: tuple[Any, ...], attention_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (values_shape[0], 1)


def _conv_block(x: Any, filters: int, stride: int, name: str) -> Any:
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # Group norm, not batch norm: a training batch holds the slices of one or two series, so batch statistics
    # would carry series-level information and differ between training and inference.
    x = layers.GroupNormalization(groups=max(1, min(8, filters // 4)), name=f"{name}_gn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_slice_encoder(grid: int, channels: int, widths: tuple[int, ...] = (16, 32, 48, 64), features: int = 64) -> keras.Model:
    """2-D CNN: (N, grid, grid, C) → (N, features)."""
    inp = keras.Input((grid, grid, channels), name="slice")
    x = inp
    for i, w in enumerate(widths):
        x = _conv_block(x, w, 2, f"enc{i}a")
        x = _conv_block(x, w, 1, f"enc{i}b")
    x = layers.Concatenate(name="enc_pool")(
        [layers.GlobalAveragePooling2D(name="enc_gap")(x), layers.GlobalMaxPooling2D(name="enc_gmp")(x)]
    )
    x = layers.Dense(features, activation="relu", name="enc_features")(x)
    return keras.Model(inp, x, name="slice_encoder")


def build_classifier(
    grid: int = 128,
    channels: int = 2,
    widths: tuple[int, ...] = (16, 32, 48, 64),
    features: int = 64,
    attention_units: int = 32,
    dropout: float = 0.2,
    clinical_features: int = CLINICAL_FEATURES,
) -> keras.Model:
    """The series classifier (see the module docstring for inputs and outputs)."""
    slices = keras.Input((None, grid, grid, channels), name="slices")
    clinical = keras.Input((clinical_features,), name="clinical")
    encoder = build_slice_encoder(grid, channels, widths, features)
    h = UnfoldSlices(name="unfold")(encoder(FoldSlices(name="fold")(slices)), slices)  # (B, S, F)
    slice_logit = layers.Reshape((-1,), name="slice_logit")(layers.Dense(1, name="slice_head")(h))
    pooled, attention = GatedAttentionPooling(attention_units, name="attention_pool")(h)
    # The series score rests on the attention-weighted slice evidence (so the slices the attention names are the
    # ones whose lesion score drove the decision), adjusted by the pooled features and the clinical data.
    evidence = WeightedSum(name="evidence")(slice_logit, attention)
    c = layers.Dense(8, activation="relu", name="clinical_dense")(clinical)
    z = layers.Concatenate(name="fusion")([layers.Dropout(dropout, name="pool_dropout")(pooled), c])
    z = layers.Dense(16, activation="relu", name="head_dense")(z)
    adjust = layers.Dense(1, kernel_initializer="zeros", name="adjust")(z)
    series_logit = layers.Add(name="series_logit")([evidence, adjust])
    probability = layers.Activation("sigmoid", name="probability")(series_logit)
    attention = layers.Activation("linear", name="attention")(attention)
    return keras.Model(
        {"slices": slices, "clinical": clinical},
        {"probability": probability, "attention": attention, "slice_logit": slice_logit},
        name="pneumonia_classifier",
    )


def focal_bce(y_true: Any, p: Any, *, gamma: float = 2.0, alpha: float = 0.5, eps: float = 1e-6) -> Any:
    """Binary focal loss on probabilities (mean over the batch); gamma=0, alpha=0.5 gives half the BCE."""
    p = ops.clip(p, eps, 1.0 - eps)
    pt = y_true * p + (1.0 - y_true) * (1.0 - p)
    at = y_true * alpha + (1.0 - y_true) * (1.0 - alpha)
    return ops.mean(-at * ops.power(1.0 - pt, gamma) * ops.log(pt))
