"""benchmarks.gpu's report, given what its per-device runs return: the table with a GPU column, the agreement line,
exit 1 when a GPU's outputs disagree with the CPU's, and the "GPU: none visible" line without one. (The runs
themselves need TensorFlow and, for the GPU columns, a GPU: `benchmarks/gpu.sh` is run by hand.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu import Column, report

ARGS = argparse.Namespace(repeats=3, unet_batch=32)
rng = np.random.default_rng(0)
SEG = rng.dirichlet([1, 1, 1], size=(6, 16, 16)).astype(np.float32)
ATTENTION = np.full(6, 1 / 6, np.float32)


def column(tmp_path: Path, label: str, device: str, *, seconds: float, probability: float = 0.8,
           seg: np.ndarray = SEG, name: str = "CPU") -> Column:
    out = tmp_path / f"{label.replace(' ', '-')}.npz"
    np.savez(out, probability=np.float32(probability), attention=ATTENTION, segmentation=seg)
    result = {"device": device, "choice": {"kind": device, "name": name, "fallback_reason": None}, "slices": 6,
              "matrix": [64, 64], "times": {"classifier": [seconds] * 3, "unet": [2 * seconds] * 3}}
    return Column(label, result=result, outputs=out)


def test_a_gpu_that_agrees_is_a_column_and_exit_0(tmp_path, capsys):
    cpu = column(tmp_path, "CPU float32", "cpu", seconds=1.0)
    gpu = column(tmp_path, "GPU float32", "gpu", seconds=0.1, probability=0.8 + 1e-4, name="NVIDIA H200")
    assert report([cpu, gpu], "chest", ARGS) == 0
    out = capsys.readouterr().out
    assert "GPU float32 (NVIDIA H200)" in out
    classifier_row = next(line for line in out.splitlines() if line.startswith("classifier"))
    assert classifier_row.split()[1:] == ["6.0", "60.0"]  # 6 slices in 1 s and in 0.1 s
    assert "GPU float32 vs CPU float32: agrees" in out and "none visible" not in out


def test_a_gpu_that_disagrees_exits_1(tmp_path, capsys):
    cpu = column(tmp_path, "CPU float32", "cpu", seconds=1.0)
    flipped = SEG.copy()
    flipped[::2] = flipped[::2][..., ::-1]  # half the slices labelled differently
    gpu = column(tmp_path, "GPU mixed_float16", "gpu", seconds=0.1, seg=flipped, name="NVIDIA H200")
    assert report([cpu, gpu], "chest", ARGS) == 1
    assert "GPU mixed_float16 vs CPU float32: DISAGREES: " in capsys.readouterr().out


@pytest.mark.parametrize("failed_cpu", [False, True])
def test_without_a_gpu_only_the_cpu_column_and_the_reason(tmp_path, capsys, failed_cpu):
    cpu = column(tmp_path, "CPU float32", "cpu", seconds=0.5)
    if failed_cpu:
        cpu = Column("CPU float32", error="ImportError: no tensorflow")
    none = Column("GPU float32", result={"device": "gpu", "choice": {
        "kind": "cpu", "name": "CPU", "fallback_reason": "TensorFlow sees no GPU"}})
    status = report([cpu, none], "disc", ARGS)
    out = capsys.readouterr().out
    if failed_cpu:
        assert status == 2 and "CPU run failed: ImportError" in out
    else:
        assert status == 0 and "GPU: none visible (TensorFlow sees no GPU)" in out
        assert [line.split()[-1] for line in out.splitlines() if line.startswith(("classifier", "U-Net"))] == \
            ["12.0", "6.0"]
