"""Inference device: which device TensorFlow runs the models on, the mixed-precision copy of a model, and the
tolerance within which another device's (or precision's) outputs must agree with the CPU's float32 outputs.

`select_device(requested, gpu_index=None, mixed_precision=False)` is called once per process before the first
model loads (TensorFlow fixes its visible devices when its runtime starts) and returns a `DeviceChoice`:

- ``"cpu"``: every GPU is hidden (``tf.config.set_visible_devices([], "GPU")``); the models run on the CPU.
- ``"auto"``: the GPU (``gpu_index``, default the first visible one) when TensorFlow sees one, else the CPU.
- ``"gpu"``: the GPU; when none is visible (no device, no driver, or a TensorFlow built without CUDA) the models
  run on the CPU and the choice carries ``fallback_reason`` — never a refusal: a hospital node keeps producing
  results, slower, and says so loudly (the node logs ``gpu_unavailable_falling_back``, sets a metric and shows
  the device in ``/readyz``).

On a GPU only the chosen GPU is made visible and its memory grows on demand (TensorFlow would otherwise reserve
nearly all of it at start). ``mixed_precision`` takes effect on a GPU only (float16 kernels on a CPU are slower
than float32); `mixed_precision_copy` makes the float16-compute copy of a loaded model. `compare` measures two
`InferenceOutputs` against `Tolerance`. Raises ValueError for a bad ``requested`` or ``gpu_index``.
``python -m models.device [auto|cpu|gpu]`` prints the choice this machine would make.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "gpu")
MIXED_POLICY = "mixed_float16"


@dataclass(frozen=True)
class DeviceChoice:
    """What the models run on. ``kind`` is "cpu" or "gpu"; ``name`` e.g. "NVIDIA H200" or "CPU";
    ``fallback_reason`` is set when a GPU was asked for (``requested == "gpu"``) and none could be used;
    ``note`` says anything else worth telling (mixed precision ignored on a CPU, devices fixed too early)."""

    requested: str
    kind: str
    name: str
    mixed_precision: bool
    gpus_visible: int
    cuda_build: bool
    fallback_reason: str | None = None
    note: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_device(requested: str = "auto", gpu_index: int | None = None, mixed_precision: bool = False) -> DeviceChoice:
    """Make TensorFlow see the device to use and return the choice (see the module docstring)."""
    if requested not in DEVICES:
        raise ValueError(f"select_device: requested must be one of {DEVICES}, not {requested!r}")
    if gpu_index is not None and gpu_index < 0:
        raise ValueError(f"select_device: gpu_index must be >= 0, not {gpu_index}")
    import tensorflow as tf

    cuda = bool(tf.test.is_built_with_cuda())
    gpus = tf.config.list_physical_devices("GPU")
    index = gpu_index or 0
    reason = _no_gpu_reason(cuda, gpus, index) if requested != "cpu" else None
    use_gpu = requested != "cpu" and reason is None
    note: str | None = None
    try:
        if use_gpu:
            tf.config.set_visible_devices([gpus[index]], "GPU")
            tf.config.experimental.set_memory_growth(gpus[index], True)
        elif gpus:
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # the runtime already started in this process: its devices stay as they are
        note = "TensorFlow's devices were initialised before the device was chosen; left as they were"
        visible = tf.config.get_visible_devices("GPU")
        use_gpu = bool(visible)
        gpus = visible
        index = 0
    mixed = mixed_precision and use_gpu
    if mixed_precision and not use_gpu:
        note = note or "mixed_precision applies on a GPU only; running float32 on the CPU"
    return DeviceChoice(
        requested=requested,
        kind="gpu" if use_gpu else "cpu",
        name=_gpu_name(tf, gpus[index]) if use_gpu else "CPU",
        mixed_precision=mixed,
        gpus_visible=len(gpus),
        cuda_build=cuda,
        fallback_reason=reason if requested == "gpu" else None,
        note=note if note else (f"no GPU used: {reason}" if requested == "auto" and reason else None),
    )


def _no_gpu_reason(cuda: bool, gpus: list[Any], index: int) -> str | None:
    """Why no GPU can be used (None when one can)."""
    if not cuda:
        return ("this TensorFlow is built without CUDA (tensorflow-cpu): install the [gpu] extra, see README "
                "'GPU'")
    if not gpus:
        return "TensorFlow sees no GPU (no device, driver or CUDA libraries; or CUDA_VISIBLE_DEVICES hides it)"
    if index >= len(gpus):
        return f"gpu_index {index} is not visible: TensorFlow sees {len(gpus)} GPU(s)"
    return None


def _gpu_name(tf: Any, gpu: Any) -> str:
    try:
        details = tf.config.experimental.get_device_details(gpu)
    except (RuntimeError, ValueError):
        details = {}
    return str(details.get("device_name") or gpu.name)


def mixed_precision_copy(model: Any, policy: str = MIXED_POLICY) -> Any:
    """A copy of a loaded Keras model that computes in float16 (``mixed_float16``, or another mixed ``policy``:
    variables stay float32), its output layers kept float32; the weights are the original's. Nested models are
    copied likewise.

    Keras stores each layer's dtype policy in the saved model, so setting the global policy before loading changes
    nothing: the layers are rebuilt from their configs with the policy. The global policy is switched while they
    are rebuilt (sub-layers that a custom layer makes in ``__init__`` take it from there) and restored after.
    """
    import keras

    outputs = {tensor._keras_history[0].name for tensor in model.outputs}

    def rebuild(layer: Any) -> Any:
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=rebuild)
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32" if layer.name in outputs else policy
        return layer.__class__.from_config(config)

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        copy = keras.models.clone_model(model, clone_function=rebuild)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


@dataclass(frozen=True)
class InferenceOutputs:
    """What both models say about one series: P(pneumonia), the per-slice attention, and the U-Net's softmax
    (slices, grid, grid, classes) on the model grid."""

    probability: float
    attention: np.ndarray
    segmentation: np.ndarray


@dataclass(frozen=True)
class Tolerance:
    """How far another device's or precision's outputs may lie from the CPU's float32 outputs.

    Measured with the shipped 1.0.0 models, CPU float32 vs CPU ``mixed_float16``, on eight chest phantoms (six at
    128² × 20 slices, with and without lesions; 24 × 256²; 48 × 512²): |ΔP| ≤ 1.2e-4, max |Δattention| ≤ 7e-4,
    max |ΔU-Net softmax| ≤ 0.02 (a few edge pixels), ≥ 99.999 % of pixels the same class. The bounds leave room for GPU arithmetic (TF32 matmuls/convolutions on Ampere and later, cuDNN's
    algorithm choice) while still catching a wrong model, wrong weights or a broken kernel.
    """

    probability: float = 0.01          # |ΔP(pneumonia)|
    attention: float = 0.01            # max |Δ| over the per-slice attention weights (they sum to 1)
    pixel_probability: float = 0.15    # max |Δ| of any pixel's U-Net class probability
    label_agreement: float = 0.999     # fraction of model-grid pixels given the same class (argmax)


def compare(reference: InferenceOutputs, candidate: InferenceOutputs) -> dict[str, float]:
    """The measured differences, named like `Tolerance`'s fields."""
    if reference.attention.shape != candidate.attention.shape:
        raise ValueError(f"compare: attention shapes differ {reference.attention.shape} vs {candidate.attention.shape}")
    if reference.segmentation.shape != candidate.segmentation.shape:
        raise ValueError(
            f"compare: segmentation shapes differ {reference.segmentation.shape} vs {candidate.segmentation.shape}"
        )
    ref_seg = reference.segmentation.astype(np.float32)
    cand_seg = candidate.segmentation.astype(np.float32)
    return {
        "probability": abs(float(reference.probability) - float(candidate.probability)),
        "attention": float(np.max(np.abs(reference.attention.astype(np.float32) - candidate.attention.astype(np.float32)),
                                  initial=0.0)),
        "pixel_probability": float(np.max(np.abs(ref_seg - cand_seg), initial=0.0)),
        "label_agreement": float(np.mean(ref_seg.argmax(-1) == cand_seg.argmax(-1))) if ref_seg.size else 1.0,
    }


def exceeded(measured: dict[str, float], tolerance: Tolerance | None = None) -> list[str]:
    """Which measured differences lie outside ``tolerance`` (default `Tolerance()`), as readable lines; empty
    when the outputs agree."""
    tol = tolerance or Tolerance()
    problems = [f"{key} differs by {measured[key]:.3g} > {getattr(tol, key)}"
                for key in ("probability", "attention", "pixel_probability") if measured[key] > getattr(tol, key)]
    if measured["label_agreement"] < tol.label_agreement:
        problems.append(f"label_agreement {measured['label_agreement']:.5f} < {tol.label_agreement}")
    return problems


if __name__ == "__main__":  # python -m models.device [auto|cpu|gpu]: what the worker would run on here
    import json
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(json.dumps(select_device(sys.argv[1] if len(sys.argv) > 1 else "auto").as_dict(), indent=2))
