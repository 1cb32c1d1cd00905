"""Inference copies of the models with a faster GroupNormalization: the same weights and the same arithmetic up to
float32 rounding.

Keras computes a group's moments on a 5-D reshape (batch, rows, columns, groups, channels per group), a reduction
over non-adjacent axes with a short inner axis that TensorFlow's CPU kernels run slowly: it was ~45 % of the
U-Net's time per slice here (6.4 ms of which 3.0 ms GroupNormalization, 128² slices, 2 cores). `FastGroupNormalization`
reduces each channel over rows and columns first (contiguous, fast), then adds the channels of a group; the variance
is taken of the centred values in a second pass (numerically as stable as Keras's). Measured on the shipped U-Net
1.0.0 and 48 slices of a 512² chest phantom: U-Net 6.5 → 5.2 ms per slice, softmax within 7e-5 of the original's,
every pixel the same class (tests/unit/models/test_fastnorm.py checks both models on every run).

Only inference uses it (`models.registry` loads through `fast_norm_copy`); training keeps Keras's layer, and the
saved files are untouched.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


class FastGroupNormalization(keras.layers.GroupNormalization):
    """`keras.layers.GroupNormalization` (channels last) with per-channel reductions first; see the module
    docstring. Any other axis falls back to Keras's own computation."""

    def call(self, inputs: Any) -> Any:
        if self.axis not in (-1, len(inputs.shape) - 1):
            return super().call(inputs)
        x = tf.cast(inputs, tf.float32)  # as Keras does: moments in float32 whatever the compute dtype
        channels = int(x.shape[-1])
        per_group = channels // self.groups
        axes = list(range(1, len(x.shape) - 1))
        count = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]) * per_group, tf.float32)
        expand = [slice(None)] + [None] * len(axes) + [slice(None)]  # (batch, channels) → (batch, 1, …, channels)

        def group_mean(per_channel_sum: Any) -> Any:
            sums = tf.reduce_sum(tf.reshape(per_channel_sum, [-1, self.groups, per_group]), axis=-1)
            return tf.repeat(sums / count, per_group, axis=-1)

        centred = x - group_mean(tf.reduce_sum(x, axis=axes))[tuple(expand)]
        inv = tf.math.rsqrt(group_mean(tf.reduce_sum(tf.square(centred), axis=axes)) + self.epsilon)
        if self.scale:
            inv = inv * tf.cast(self.gamma, tf.float32)
        out = centred * inv[tuple(expand)]
        if self.center:
            out = out + tf.cast(self.beta, tf.float32)
        return tf.cast(out, self.compute_dtype)


def fast_norm_copy(model: Any) -> Any:
    """A copy of a loaded Keras model whose GroupNormalization layers are `FastGroupNormalization` (same names,
    configs and weights); nested models are copied likewise. A model without such layers comes back as it is."""
    if not any(isinstance(layer, keras.layers.GroupNormalization) for layer in _layers(model)):
        return model

    def rebuild(layer: Any) -> Any:
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=rebuild)
        if type(layer) is keras.layers.GroupNormalization:
            return FastGroupNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=rebuild)
    copy.set_weights(model.get_weights())
    return copy


def _layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _layers(layer)
    return out
