"""CPU inference benchmark: load the shipped models once, then time load_series, classifier and U-Net on phantoms.

Usage: ``.venv/bin/python -m benchmarks.inference [--sizes 512 256] [--slices 120] [--repeats 3] [--weights-dir DIR]``.
Prints one table row per matrix size: median seconds per stage over the repeats (after one warm-up run) and
slices/s for the whole model path (classifier + U-Net, including resampling to the model grid and back).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _bench(size: int, slices: int, repeats: int, weights_dir: Path | None) -> dict[str, float]:
    from models.preprocess import load_series
    from models.registry import Registry
    from training.phantom import generate_dataset

    t = time.perf_counter()
    import keras  # noqa: F401  (imported here so that model loading is timed on its own)
    import tensorflow  # noqa: F401

    import_tf = time.perf_counter() - t
    reg = Registry(weights_dir)
    t = time.perf_counter()
    clf, seg = reg.classifier(), reg.segmenter()
    cand = reg.candidates_for(clf)  # the candidate stage, when the fusion takes its scores
    load_models = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, cases=1, seed=4242, prevalence=1.0, size=size, slices=slices)
        files = sorted(Path(tmp).glob("CASE0001/dicom/*.dcm"))
        times: dict[str, list[float]] = {"load_series": [], "classifier": [], "segmenter": []}
        for i in range(repeats + 1):  # the first run warms up (tf.function tracing), it is not counted
            t0 = time.perf_counter()
            vol = load_series(files)
            t1 = time.perf_counter()
            evidence = seg.predict(vol, cand).evidence  # first, as the node: a lesion-fusing classifier needs it
            t2 = time.perf_counter()
            clf.predict(vol, age=vol.patient_age, sex=vol.patient_sex, lesion=evidence)
            t3 = time.perf_counter()
            if i:
                times["load_series"].append(t1 - t0)
                times["segmenter"].append(t2 - t1)
                times["classifier"].append(t3 - t2)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size": size, "slices": slices, "import_tf": import_tf, "load_models": load_models, **med,
            "models_slices_per_s": slices / (med["classifier"] + med["segmenter"])}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights-dir", type=Path)
    args = p.parse_args(argv)
    rows = [_bench(s, args.slices, args.repeats, args.weights_dir) for s in args.sizes]
    print(f"CPU inference, {os.cpu_count()} logical CPUs, median of {args.repeats} runs after one warm-up")
    print(f"{'matrix':>8} {'slices':>6} {'load_series s':>13} {'classifier s':>12} {'U-Net s':>8} "
          f"{'models slices/s':>15}")
    for r in rows:
        print(f"{r['size']:>6}px {r['slices']:>6} {r['load_series']:>13.2f} {r['classifier']:>12.2f} "
              f"{r['segmenter']:>8.2f} {r['models_slices_per_s']:>15.0f}")
    print(f"once per process: import TensorFlow/Keras {rows[0]['import_tf']:.2f} s, "
          f"load both models {rows[0]['load_models']:.2f} s")
    print("load_series: read + decode + sort + rescale the DICOM files; classifier/U-Net: resize to the model grid, "
          "forward pass, masks back to the source grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
