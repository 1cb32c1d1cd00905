"""GPU benchmark: slices/s of the classifier and the U-Net on the CPU and on the GPU side by side, and whether the
GPU's outputs agree with the CPU's float32 outputs within `models.device.Tolerance`.

    benchmarks/gpu.sh [--slices 48] [--size 512] [--repeats 3] [--phantom auto|chest|disc] [--no-mixed] [--cpu-mixed]
    # or: .venv/bin/python -m benchmarks.gpu ...

One phantom series is written once (the chest phantom of `training.phantom`, with lesions, when the [training]
extra is installed; else the disc phantom of `peers.ctgen`), then each configuration runs in its own process,
because TensorFlow fixes its visible devices once per process: the CPU (GPUs hidden), the GPU in float32, and the
GPU with ``mixed_float16`` — exactly the node's path (`models.device.select_device`, `models.registry`, each
model's ``predict``: resize to the model grid on the device, forward pass, masks back to the source grid). Each
configuration warms up once (tf.function tracing) and reports the median of ``--repeats`` timed runs.

Without a usable GPU only the CPU column is measured and the GPU columns say "GPU: none visible" with the reason.
``--cpu-mixed`` adds a CPU ``mixed_float16`` column (float16 kernels on a CPU: slow, for checking the precision and
this script's agreement check on a machine without a GPU).
Exit status: 0 when every GPU configuration agrees with the CPU (or there is no GPU), 1 when one does not, 2 when a
configuration fails to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = (("cpu", False), ("gpu", False), ("gpu", True))


def _label(device: str, mixed: bool) -> str:
    return f"{device.upper()} {'mixed_float16' if mixed else 'float32'}"


# -- the phantom ----------------------------------------------------------------------------------------------------
def write_phantom(out: Path, kind: str, size: int, slices: int, seed: int = 4242) -> tuple[str, list[Path]]:
    """One series under ``out``: ("chest", files) from training.phantom (lesions) or ("disc", files) from
    peers.ctgen; ``kind`` "auto" takes the chest phantom when the [training] extra is installed."""
    if kind in ("auto", "chest"):
        try:
            from training.phantom import generate_dataset
        except ImportError:
            if kind == "chest":
                raise
        else:
            generate_dataset(out, cases=1, seed=seed, prevalence=1.0, size=size, slices=slices)
            return "chest", sorted(out.glob("CASE0001/dicom/*.dcm"))
    from peers.ctgen import write_ct_series

    return "disc", write_ct_series(out / "disc", slices=slices, size=size, seed=seed).paths


# -- one configuration, in its own process --------------------------------------------------------------------------
def run_child(device: str, mixed: bool, series: Path, out: Path, repeats: int, unet_batch: int) -> dict[str, Any]:
    """Time both models on ``device``; save their outputs to ``out`` (npz); return the timings and the choice."""
    from dataclasses import replace

    import numpy as np

    from models.device import select_device

    choice = select_device(device, mixed_precision=mixed)
    result: dict[str, Any] = {"device": device, "mixed": mixed, "choice": choice.as_dict()}
    if device == "gpu" and choice.kind != "gpu":
        return result  # no GPU: nothing to measure here
    from models.preprocess import load_series
    from models.registry import Registry

    registry = Registry(mixed_precision=choice.mixed_precision or (device == "cpu" and mixed))  # --cpu-mixed
    classifier, segmenter = registry.classifier(), registry.segmenter()
    candidates = registry.candidates_for(classifier)
    segmenter.batch_size = unet_batch
    volume = load_series(sorted(series.glob("*.dcm")))
    times: dict[str, list[float]] = {"classifier": [], "unet": []}
    for i in range(repeats + 1):  # the first run traces the tf.functions: not counted
        fresh = replace(volume, _cache={})  # each run resizes to the model grid again, as a new series would
        t0 = time.perf_counter()
        evidence = segmenter.predict(fresh, candidates).evidence  # first, as the node: a lesion-fusing classifier needs it
        t1 = time.perf_counter()
        cls = classifier.predict(fresh, lesion=evidence)
        t2 = time.perf_counter()
        if i:
            times["unet"].append(t1 - t0)
            times["classifier"].append(t2 - t1)
    probabilities = segmenter.probabilities(volume)
    np.savez(out, probability=np.float32(cls.probability), attention=cls.attention, segmentation=probabilities)
    result.update(slices=volume.shape[0], matrix=list(volume.shape[1:]), times=times)
    return result


# -- the parent: run each configuration, compare, print --------------------------------------------------------------
@dataclass
class Column:
    label: str
    result: dict[str, Any] | None = None
    outputs: Path | None = None
    error: str | None = None

    @property
    def measured(self) -> bool:
        return self.result is not None and "times" in self.result

    def slices_per_s(self, model: str) -> float:
        assert self.result is not None
        return float(self.result["slices"] / statistics.median(self.result["times"][model]))


def _spawn(device: str, mixed: bool, series: Path, out: Path, args: argparse.Namespace) -> Column:
    column = Column(_label(device, mixed), outputs=out)
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", device, "--series", str(series), "--out", str(out),
           "--repeats", str(args.repeats), "--unet-batch", str(args.unet_batch)] + (["--mixed"] if mixed else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        column.error = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return column
    column.result = json.loads(done.stdout.strip().splitlines()[-1])
    return column


def _load(path: Path) -> Any:
    import numpy as np

    from models.device import InferenceOutputs

    with np.load(path) as data:
        return InferenceOutputs(float(data["probability"]), data["attention"], data["segmentation"])


def _agreement(cpu: Column, other: Column) -> tuple[str, bool]:
    from models.device import compare, exceeded

    assert cpu.outputs is not None and other.outputs is not None
    measured = compare(_load(cpu.outputs), _load(other.outputs))
    problems = exceeded(measured)
    text = (f"|ΔP| {measured['probability']:.2g}, max |Δattention| {measured['attention']:.2g}, max |ΔU-Net p| "
            f"{measured['pixel_probability']:.2g}, same class {100 * measured['label_agreement']:.3f} %")
    return (f"{other.label} vs CPU float32: {'agrees' if not problems else 'DISAGREES: ' + '; '.join(problems)} "
            f"({text})"), not problems


def _gpu_missing(column: Column) -> str:
    assert column.result is not None
    choice = column.result["choice"]
    return f"GPU: none visible ({choice['fallback_reason']})"


def report(columns: list[Column], phantom: str, args: argparse.Namespace) -> int:
    """Print the table and the agreement lines; return the exit status."""
    cpu = columns[0]
    if not cpu.measured:
        print(f"CPU run failed: {cpu.error}")
        return 2
    assert cpu.result is not None
    others = [c for c in columns[1:] if c.measured]
    missing = next((c for c in columns[1:] if c.result is not None and not c.measured), None)
    failed = [c for c in columns[1:] if c.error is not None]
    rows, cols = cpu.result["matrix"]
    print(f"inference slices/s: {cpu.result['slices']} slices of {rows}x{cols} ({phantom} phantom), median of "
          f"{args.repeats} runs after one warm-up; U-Net batch {args.unet_batch}; {os.cpu_count()} logical CPUs")
    names = [f"CPU float32 ({os.cpu_count()} CPUs)"]
    for c in others:
        assert c.result is not None
        names.append(f"{c.label} ({c.result['choice']['name']})")
    print(f"{'model':<12}" + "".join(f"{n:>32}" for n in names))
    for model, title in (("classifier", "classifier"), ("unet", "U-Net")):
        print(f"{title:<12}" + "".join(f"{c.slices_per_s(model):>32.1f}" for c in [cpu, *others]))
    if missing is not None:
        print(_gpu_missing(missing))
    status = 0
    for c in others:
        line, ok = _agreement(cpu, c)
        print(line)
        status = status if ok else 1
    for c in failed:
        print(f"{c.label} run failed: {c.error}")
        status = 2
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=48)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phantom", choices=("auto", "chest", "disc"), default="auto")
    p.add_argument("--no-mixed", action="store_true", help="skip the GPU mixed_float16 column")
    p.add_argument("--cpu-mixed", action="store_true", help="add a CPU mixed_float16 column (checks the precision)")
    p.add_argument("--unet-batch", type=int, default=32, help="slices per U-Net call (the node uses 32)")
    p.add_argument("--child", choices=("cpu", "gpu"), help=argparse.SUPPRESS)
    p.add_argument("--mixed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--series", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.mixed, args.series, args.out, args.repeats, args.unet_batch)))
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-bench-") as tmp:
        phantom, files = write_phantom(Path(tmp) / "series", args.phantom, args.size, args.slices)
        series = files[0].parent
        columns: list[Column] = []
        for device, mixed in CONFIGS + ((("cpu", True),) if args.cpu_mixed else ()):
            if device == "gpu" and mixed and args.no_mixed:
                continue
            if device == "gpu" and columns and columns[-1].result is not None and not columns[-1].measured:
                continue  # the float32 GPU run found no GPU: the mixed one would not either
            columns.append(_spawn(device, mixed, series, Path(tmp) / f"{device}-{int(mixed)}.npz", args))
        status = report(columns, phantom, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
