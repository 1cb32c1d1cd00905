"""models.device: the device choice ("cpu" hides GPUs, in a fresh TensorFlow process; "gpu" without one falls back
to the CPU with a reason), the mixed_float16 copies of the shipped models agreeing with float32 within `Tolerance`
on a chest phantom with lesions, and the tolerance check catching outputs that do not agree.

On a machine without a GPU (this project's) the "gpu" case checks the fallback; on one with a GPU the same test
checks that the GPU is used. Mixed precision is meant for GPUs; here the float16 copies run on the CPU, which
TensorFlow supports (slowly), so the agreement measured is that of the precision alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.device import (
    MIXED_POLICY,
    InferenceOutputs,
    Tolerance,
    compare,
    exceeded,
    mixed_precision_copy,
    select_device,
)
from models.preprocess import load_series
from models.registry import Registry

from .util import case_files

REPO = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter: TensorFlow fixes its visible devices when its runtime starts, once per process.
_PROBE = """
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from models.device import select_device
choice = select_device(sys.argv[1])
import tensorflow as tf
x = tf.random.uniform((64, 64))
y = tf.matmul(x, x)
physical = tf.config.list_physical_devices("GPU")
print(json.dumps({"choice": choice.as_dict(), "visible_gpus": len(tf.config.get_visible_devices("GPU")),
                  "physical_gpus": len(physical), "cuda": tf.test.is_built_with_cuda(), "op_device": y.device}))
"""


def test_cpu_hides_every_gpu_in_a_fresh_process() -> None:
    """(In its own interpreter: on a machine with a GPU an earlier test may have started TensorFlow's runtime. The
    "gpu" request without a GPU is checked in tests/unit/test_device.py, through the worker.)"""
    done = subprocess.run([sys.executable, "-c", _PROBE, "cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cpu = json.loads(done.stdout.strip().splitlines()[-1])
    assert cpu["choice"]["kind"] == "cpu" and cpu["choice"]["fallback_reason"] is None
    assert cpu["choice"]["gpus_visible"] == cpu["physical_gpus"]  # what there was to hide
    assert cpu["visible_gpus"] == 0 and cpu["op_device"].endswith("CPU:0")


def test_gpu_request_in_this_process_uses_a_gpu_or_says_why_not() -> None:
    import tensorflow as tf

    choice = select_device("gpu")
    if tf.test.is_built_with_cuda() and tf.config.get_visible_devices("GPU"):
        assert choice.kind == "gpu" and choice.fallback_reason is None
    else:  # this project's machines: the models still run, on the CPU, and the choice says why
        assert choice.kind == "cpu" and choice.name == "CPU" and choice.fell_back
        assert choice.fallback_reason and ("without CUDA" in choice.fallback_reason
                                           if not choice.cuda_build else "no GPU" in choice.fallback_reason)


def test_bad_requests_are_refused_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="requested must be one of"):
        select_device("tpu")
    with pytest.raises(ValueError, match="gpu_index must be >= 0"):
        select_device("gpu", gpu_index=-1)


def _outputs(registry: Registry, files: list[Path]) -> InferenceOutputs:
    volume = load_series(files)
    evidence = registry.segmenter().predict(volume, registry.candidates_for(registry.classifier())).evidence
    cls = registry.classifier().predict(volume, lesion=evidence)
    seg = registry.segmenter().probabilities(volume)
    return InferenceOutputs(cls.probability, cls.attention, seg)


@pytest.fixture(scope="module")
def float32_and_mixed(small_phantom: Path) -> tuple[InferenceOutputs, InferenceOutputs]:
    """Both models' outputs on a pneumonia phantom (20 slices, 128 px): float32 and the mixed_float16 copies.
    Case 3: positive but not saturated (case 0's single faint lesion is below every shipped classifier's threshold)."""
    files = case_files(small_phantom, 3)
    return _outputs(Registry(), files), _outputs(Registry(mixed_precision=True), files)


def test_mixed_precision_outputs_agree_with_float32(float32_and_mixed: tuple[InferenceOutputs, InferenceOutputs]) -> None:
    reference, mixed = float32_and_mixed
    assert reference.probability > 0.9, "the phantom has lesions: the agreement is checked on a positive series"
    assert (reference.segmentation.argmax(-1) == 2).any(), "and the U-Net finds lesion pixels in it"
    measured = compare(reference, mixed)
    assert exceeded(measured) == [], measured
    # Not trivially equal: the copy really computed in float16.
    assert measured["pixel_probability"] > 0 or measured["probability"] > 0
    assert mixed.segmentation.dtype == np.float32 and mixed.attention.dtype == np.float32


def test_mixed_precision_copy_computes_in_float16_with_float32_outputs() -> None:
    original = Registry().segmenter()._m.model
    copy = mixed_precision_copy(original)
    policies = {layer.name: layer.dtype_policy.name for layer in copy.layers}
    assert policies["probabilities"] == "float32"  # the softmax output stays float32
    assert sum(p == MIXED_POLICY for p in policies.values()) > len(policies) // 2
    assert all(w.dtype == "float32" for w in copy.weights)  # mixed precision keeps float32 variables
    for a, b in zip(original.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert original.layers[1].dtype_policy.name == "float32"  # the shared original is left alone


def test_mixed_precision_copy_takes_another_mixed_policy() -> None:
    """``mixed_bfloat16`` (what benchmarks/gpu_jax.py measures beside float16): same weights, bfloat16 compute,
    the output layer float32, and the global policy restored afterwards."""
    import keras

    original = Registry().segmenter()._m.model
    copy = mixed_precision_copy(original, "mixed_bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in copy.layers}
    assert policies["probabilities"] == "float32"
    assert sum(p == "mixed_bfloat16" for p in policies.values()) > len(policies) // 2
    assert not any(p == MIXED_POLICY for p in policies.values())
    assert keras.mixed_precision.global_policy().name == "float32"
    x = np.random.default_rng(0).random((2, *original.inputs[0].shape[1:]), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(original(x)), atol=0.2)


def test_the_tolerance_check_catches_outputs_that_do_not_agree(
    float32_and_mixed: tuple[InferenceOutputs, InferenceOutputs],
) -> None:
    reference, _ = float32_and_mixed
    assert exceeded(compare(reference, reference)) == []
    shifted = replace(reference, probability=reference.probability - 0.05)
    assert any(p.startswith("probability") for p in exceeded(compare(reference, shifted)))
    attention = reference.attention.copy()
    attention[[0, -1]] += np.array([0.03, -0.03], dtype=np.float32)
    assert any(p.startswith("attention") for p in exceeded(compare(reference, replace(reference, attention=attention))))
    # A U-Net that labels one slice in ten differently: far below the label agreement bound.
    seg = reference.segmentation.copy()
    seg[::10] = seg[::10][..., ::-1]
    problems = exceeded(compare(reference, replace(reference, segmentation=seg)))
    assert any(p.startswith("label_agreement") for p in problems) and any(p.startswith("pixel") for p in problems)
    # A looser tolerance lets the same difference through.
    assert exceeded(compare(reference, shifted), Tolerance(probability=0.1)) == []
    with pytest.raises(ValueError, match="attention shapes differ"):
        compare(reference, replace(reference, attention=reference.attention[:-1]))
