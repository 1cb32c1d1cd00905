"""The shipped models' forward passes on a GPU through Keras 3's JAX backend, beside the CPU, with their agreement
with TensorFlow's CPU float32 outputs.

Why this exists beside `benchmarks/gpu.py` (the node's own TensorFlow path): the GPU machines lent to this
project's sessions have JAX with CUDA but no TensorFlow and no package registry, and TensorFlow with CUDA (over
2 GB of wheels) cannot travel to them. Keras 3 runs the same saved ``.keras`` files — the same layers and the same
weights — on JAX/XLA. So this measures the *models* on a GPU; it does not measure the node's TensorFlow GPU path
(the resize to the model grid on the device, TensorFlow's kernels, the masks back to the source grid). README "GPU"
says which numbers come from which script.

Two steps:

    # 1. where the node is installed (TensorFlow, CPU): the model-grid inputs exactly as the node makes them, the
    #    saved models' TensorFlow CPU float32 outputs (the reference) and TensorFlow CPU timings on this machine
    .venv/bin/python -m benchmarks.gpu_jax prepare --out .gpu [--cases 2] [--slices 48] [--size 512]
    # 2. anywhere with jax and keras (GPU or not): each configuration in its own process
    KERAS_BACKEND=jax python -m benchmarks.gpu_jax measure --inputs .gpu/inputs.npz [--json out.json]

Configurations: JAX CPU float32, JAX GPU float32, JAX GPU ``mixed_float16`` and ``mixed_bfloat16``
(`models.device.mixed_precision_copy`). Each times the classifier on 1 and on 8 series per call (batching across
queued series) and the U-Net on 32 and 256 slices per call, median of ``--repeats`` calls after one compiling
call (its seconds are printed too); inputs come from host memory and outputs go back to it, as in the node.
Exit status: 0 when every configuration agrees with TensorFlow's CPU outputs within `models.device.Tolerance`,
1 when one does not, 2 when one fails to run. Without a visible GPU only the CPU row is measured.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("cpu", "float32"), ("cuda", "float32"), ("cuda", "mixed_float16"), ("cuda", "mixed_bfloat16"))
CLASSIFIER_BATCHES = (1, 8)   # series per call
UNET_BATCHES = (32, 256)      # slices per call


def _model_files() -> dict[str, Path]:
    from models.registry import CLASSIFIER, MODEL_FILE, SEGMENTER, Registry

    registry = Registry()  # the versions the node loads by default
    return {"classifier": registry.folder(CLASSIFIER) / MODEL_FILE, "unet": registry.folder(SEGMENTER) / MODEL_FILE}


# -- step 1: TensorFlow, where the node is installed ----------------------------------------------------------------
def prepare(out: Path, cases: int, slices: int, size: int, repeats: int,
            batches: tuple[tuple[int, ...], tuple[int, ...]] = (CLASSIFIER_BATCHES, UNET_BATCHES)) -> Path:
    """Write ``out/inputs.npz`` (inputs, reference outputs, model file names, TensorFlow CPU timings); ``batches``:
    series per classifier call and slices per U-Net call to time (``measure`` times the same)."""
    import keras
    import tensorflow as tf

    import models.classifier  # noqa: F401  (registers the custom layers)
    from benchmarks.gpu import write_phantom
    from models.clinical import INPUTS, ClinicalInputs
    from models.preprocess import load_series, volume_grid, window
    from models.registry import Registry

    registry = Registry()
    classifier, segmenter = registry.classifier(), registry.segmenter()
    ccfg, scfg = classifier.preprocess, segmenter.preprocess
    if (ccfg.grid, ccfg.windows) != (scfg.grid, scfg.windows):
        raise SystemExit("the classifier and the U-Net see different model grids: extend prepare()")
    slices_in, clinical_in = [], []
    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-jax-") as tmp:
        for case in range(cases):  # lesions in every case (the U-Net has something to find)
            _, series = write_phantom(Path(tmp) / f"c{case}", "chest", size, slices, seed=4242 + case)
            volume = load_series(series)
            slices_in.append(window(volume_grid(volume, ccfg.grid), ccfg))
            ages = (71.0, 38.0, 55.0, None)
            given = ClinicalInputs(age=ages[case % 4], sex="FM"[case % 2], fever=1.0, cough=float(case % 2), dyspnoea=None)
            clinical_in.append(classifier.fusion_input(given)[1][0])
    x = np.stack(slices_in).astype(np.float32)          # (cases, S, g, g, C)
    clinical = np.stack(clinical_in).astype(np.float32)  # (cases, F)
    files = _model_files()
    cls = keras.saving.load_model(files["classifier"], compile=False)  # the saved models, not the node's copies
    unet = keras.saving.load_model(files["unet"], compile=False)
    ref: list[Any] = [cls({"slices": x[i:i + 1], "clinical": clinical[i:i + 1]}, training=False) for i in range(cases)]
    seg = [unet(x[i], training=False).numpy() for i in range(cases)]
    cls_fn = tf.function(lambda s, k: cls({"slices": s, "clinical": k}, training=False))
    unet_fn = tf.function(lambda s: unet(s, training=False))
    timings = _time_all(lambda s, k: {n: v.numpy() for n, v in cls_fn(s, k).items()},
                        lambda s: unet_fn(s).numpy(), x, clinical, repeats, batches)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "inputs.npz"
    np.savez(path, slices=x, clinical=clinical,
             probability=np.array([float(r["probability"][0, 0]) for r in ref], np.float32),
             attention=np.stack([r["attention"].numpy()[0] for r in ref]), segmentation=np.stack(seg),
             meta=json.dumps({"models": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
                              "batches": {"classifier": list(batches[0]), "unet": list(batches[1])},
                              "inputs": list(INPUTS), "tf_cpu": {"cpus": os.cpu_count(), "timings": timings,
                                                                "tensorflow": tf.__version__}}))
    return path


def _tile(a: np.ndarray, n: int) -> np.ndarray:
    return np.resize(a, (n, *a.shape[1:]))  # repeats the cases (or slices) to ``n`` along the first axis


def _time_all(classify: Any, segment: Any, x: np.ndarray, clinical: np.ndarray, repeats: int,
              batches: tuple[Sequence[int], Sequence[int]]) -> dict[str, Any]:
    """{"classifier": {B: (compile s, [s per call])}, "unet": {B: ...}} for the batch sizes given."""
    found: dict[str, Any] = {"classifier": {}, "unet": {}}
    for b in batches[0]:
        s, k = _tile(x, b), _tile(clinical, b)  # made before the clock starts
        found["classifier"][str(b)] = _time(lambda s=s, k=k: classify(s, k), repeats)
    flat = x.reshape(-1, *x.shape[2:])
    for b in batches[1]:
        s = _tile(flat, b)
        found["unet"][str(b)] = _time(lambda s=s: segment(s), repeats)
    return found


def _time(call: Any, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return first, times


# -- step 2: one configuration, in its own process (KERAS_BACKEND=jax) ----------------------------------------------
def child(inputs: Path, platform: str, policy: str, out: Path, repeats: int) -> dict[str, Any]:
    import jax
    import keras

    import models.classifier  # noqa: F401
    from models.device import mixed_precision_copy

    try:
        device = jax.devices(platform)[0]
    except (RuntimeError, AssertionError) as exc:  # AssertionError: JAX_PLATFORMS names a missing platform
        return {"platform": platform, "policy": policy, "missing": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    data = np.load(inputs)
    meta = json.loads(str(data["meta"]))
    x, clinical = data["slices"], data["clinical"]
    loaded = {k: keras.saving.load_model(ROOT / v, compile=False) for k, v in meta["models"].items()}
    if policy != "float32":
        loaded = {k: mixed_precision_copy(m, policy) for k, m in loaded.items()}
    fns = {}
    for name, model in loaded.items():
        weights = jax.device_put(([v.value for v in model.trainable_variables],
                                  [v.value for v in model.non_trainable_variables]), device)
        call = jax.jit(lambda w, inp, m=model: m.stateless_call(w[0], w[1], inp, training=False)[0])
        fns[name] = (call, weights)

    def classify(s: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
        call, w = fns["classifier"]
        return {n: np.asarray(v) for n, v in call(w, {"slices": s, "clinical": k}).items()}

    def segment(s: np.ndarray) -> np.ndarray:
        call, w = fns["unet"]
        return np.asarray(call(w, s))

    timings = _time_all(classify, segment, x, clinical, repeats, _batches(meta))
    outputs = [classify(x[i:i + 1], clinical[i:i + 1]) for i in range(len(x))]
    np.savez(out, probability=np.array([float(o["probability"][0, 0]) for o in outputs], np.float32),
             attention=np.stack([o["attention"][0] for o in outputs]),
             segmentation=np.stack([segment(x[i]) for i in range(len(x))]).astype(np.float32))
    return {"platform": platform, "policy": policy, "device": str(device.device_kind), "timings": timings,
            "jax": jax.__version__, "keras": keras.__version__}


# -- the parent: run each configuration, compare with TensorFlow's outputs, print ----------------------------------
def _rates(timings: dict[str, Any], slices: int) -> dict[str, dict[str, float]]:
    """slices/s per model and batch (the classifier's batch counts series of ``slices`` slices)."""
    return {model: {b: (int(b) * (slices if model == "classifier" else 1)) / statistics.median(t[1])
                    for b, t in per.items()} for model, per in timings.items()}


def _agreement(data: Any, path: Path) -> list[tuple[int, dict[str, float], list[str]]]:
    from models.device import InferenceOutputs, compare, exceeded

    with np.load(path) as got:
        rows = []
        for i in range(len(data["slices"])):
            ref = InferenceOutputs(float(data["probability"][i]), data["attention"][i], data["segmentation"][i])
            cand = InferenceOutputs(float(got["probability"][i]), got["attention"][i], got["segmentation"][i])
            measured = compare(ref, cand)
            rows.append((i, measured, exceeded(measured)))
        return rows


def measure(inputs: Path, repeats: int, json_out: Path | None) -> int:
    data = np.load(inputs)
    meta = json.loads(str(data["meta"]))
    cases, slices = data["slices"].shape[:2]
    print(f"model-grid inputs: {cases} phantom series × {slices} slices of {data['slices'].shape[2]}² × "
          f"{data['slices'].shape[4]} channels; median of {repeats} calls after one compiling call")
    rows: list[dict[str, Any]] = [{"label": f"TensorFlow {meta['tf_cpu']['tensorflow']} CPU float32 "
                                   f"({meta['tf_cpu']['cpus']} CPUs, where prepared)",
                                   "timings": meta["tf_cpu"]["timings"]}]
    status = 0
    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-jax-") as tmp:
        for platform, policy in CONFIGS:
            out = Path(tmp) / f"{platform}-{policy}.npz"
            cmd = [sys.executable, "-m", "benchmarks.gpu_jax", "child", "--inputs", str(inputs), "--platform",
                   platform, "--policy", policy, "--out", str(out), "--repeats", str(repeats)]
            env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": platform}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                tail = "\n    ".join(done.stderr.strip().splitlines()[-12:]) or "(no output)"
                print(f"JAX {platform} {policy}: failed:\n    {tail}")
                status = 2
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "missing" in result:
                print(f"JAX {platform} {policy}: no such device ({result['missing']})")
                continue
            where = f"{os.cpu_count()} CPUs" if platform == "cpu" else result["device"]
            result["label"] = f"JAX {result['jax']} {'GPU' if platform == 'cuda' else 'CPU'} {policy} ({where})"
            result["agreement"] = _agreement(data, out)
            if status == 0 and any(problems for _, _, problems in result["agreement"]):
                status = 1
            rows.append(result)
    _print_table(rows, slices, _batches(meta))
    for row in rows[1:]:
        worst = {k: max(m[k] for _, m, _ in row["agreement"]) for k in ("probability", "attention", "pixel_probability")}
        same = min(m["label_agreement"] for _, m, _ in row["agreement"])
        problems = [p for _, _, ps in row["agreement"] for p in ps]
        print(f"{row['label']} vs TensorFlow CPU float32: {'agrees' if not problems else 'DISAGREES: ' + '; '.join(problems)}"
              f" (worst over {cases} series: |ΔP| {worst['probability']:.2g}, max |Δattention| {worst['attention']:.2g}, "
              f"max |ΔU-Net p| {worst['pixel_probability']:.2g}, same class ≥ {100 * same:.3f} %)")
    if json_out is not None:
        json_out.write_text(json.dumps({"slices": int(slices), "cases": int(cases), "rows": rows}, indent=1))
    return status


def _batches(meta: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    b = meta.get("batches") or {"classifier": CLASSIFIER_BATCHES, "unet": UNET_BATCHES}
    return tuple(b["classifier"]), tuple(b["unet"])


def _print_table(rows: list[dict[str, Any]], slices: int, batches: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    heads = [f"classifier ×{b} series" for b in batches[0]] + [f"U-Net ×{b}" for b in batches[1]]
    print(f"{'slices/s (first call, s)':<58}" + "".join(f"{h:>24}" for h in heads))
    for row in rows:
        rates = _rates(row["timings"], slices)
        cells = [f"{rates[m][str(b)]:,.0f} ({row['timings'][m][str(b)][0]:.1f})"
                 for m, bs in (("classifier", batches[0]), ("unet", batches[1])) for b in bs]
        print(f"{row['label']:<58}" + "".join(f"{c:>24}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", type=Path, default=Path(".gpu"))
    pp.add_argument("--cases", type=int, default=2)
    pp.add_argument("--slices", type=int, default=48)
    pp.add_argument("--size", type=int, default=512)
    pp.add_argument("--repeats", type=int, default=3)
    pm = sub.add_parser("measure")
    pm.add_argument("--inputs", type=Path, default=Path(".gpu/inputs.npz"))
    pm.add_argument("--repeats", type=int, default=10)
    pm.add_argument("--json", type=Path)
    pc = sub.add_parser("child")
    pc.add_argument("--inputs", type=Path, required=True)
    pc.add_argument("--platform", required=True)
    pc.add_argument("--policy", required=True)
    pc.add_argument("--out", type=Path, required=True)
    pc.add_argument("--repeats", type=int, required=True)
    args = p.parse_args(argv)
    if args.step == "prepare":
        print(prepare(args.out, args.cases, args.slices, args.size, args.repeats))
        return 0
    if args.step == "child":
        print(json.dumps(child(args.inputs.resolve(), args.platform, args.policy, args.out, args.repeats)))
        return 0
    return measure(args.inputs.resolve(), args.repeats, args.json)


if __name__ == "__main__":
    sys.exit(main())
