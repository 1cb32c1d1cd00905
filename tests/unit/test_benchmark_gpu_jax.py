"""benchmarks.gpu_jax: ``prepare`` (TensorFlow, here) writes the model-grid inputs with the saved models' CPU
outputs and timings; ``measure`` prints TensorFlow's row from them and each JAX configuration's result — here,
without JAX installed, a clear failure line per configuration and exit 2, never a traceback. (The GPU rows need a
machine with JAX and a GPU: README "GPU".)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu_jax import _agreement, measure, prepare


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(tmp_path_factory.mktemp("gpu-jax"), cases=2, slices=3, size=64, repeats=1, batches=((1, 2), (2, 4)))


def test_prepare_writes_inputs_references_and_timings(inputs: Path) -> None:
    with np.load(inputs) as d:
        x, seg, p = d["slices"], d["segmentation"], d["probability"]
        meta = json.loads(str(d["meta"]))
    assert x.shape[:2] == (2, 3) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1  # windowed
    assert not np.array_equal(x[0], x[1])  # two different phantoms, not one twice
    assert seg.shape == (*x.shape[:4], 3) and np.allclose(seg.sum(-1), 1, atol=1e-4)  # softmax per pixel
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    assert set(meta["tf_cpu"]["timings"]["classifier"]) == {"1", "2"} and set(meta["tf_cpu"]["timings"]["unet"]) == {"2", "4"}
    assert all(Path(__file__).resolve().parents[2].joinpath(m).is_file() for m in meta["models"].values())


def test_agreement_flags_outputs_outside_the_tolerance(inputs: Path, tmp_path: Path) -> None:
    with np.load(inputs) as d:
        same, other = tmp_path / "same.npz", tmp_path / "other.npz"
        np.savez(same, probability=d["probability"], attention=d["attention"], segmentation=d["segmentation"])
        np.savez(other, probability=d["probability"] + 0.05, attention=d["attention"], segmentation=d["segmentation"])
        assert all(not problems for _, _, problems in _agreement(d, same))
        assert all(any(p.startswith("probability") for p in problems) for _, _, problems in _agreement(d, other))


def test_measure_prints_tensorflows_row_and_each_configuration(inputs: Path, capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    status = measure(inputs, repeats=1, json_out=tmp_path / "out.json")
    out = capsys.readouterr().out
    assert "TensorFlow" in out and "CPU float32 (" in out and "classifier ×2 series" in out and "U-Net ×4" in out
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("keras") is None:
        assert status == 2
        assert out.count("failed:") == 4 and "No module named 'jax'" in out and "Traceback" not in out.split("failed:")[0]
    else:  # JAX installed: at least its CPU row, agreeing with TensorFlow
        assert status in (0, 1) and "JAX" in out and "CPU float32" in out
    assert json.loads((tmp_path / "out.json").read_text())["cases"] == 2
