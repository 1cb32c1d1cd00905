"""The image contrast check (`models.scope.contrast_problem`) on chest phantoms, unenhanced and with their blood
raised to late-phase, venous and arterial values: the numbers behind its thresholds (models/scope.py, README).

Usage: ``.venv/bin/python -m benchmarks.contrast_corpus [--seed 2024] [--cases 16] [--size 192] [--slices 24-96]
[--margins 12,15,18,25]``. Generates chest phantoms (``training.phantom.generate_dataset``), runs the shipped U-Net
for the lungs, and measures ``mediastinum_enhanced_ml`` for each phantom as rendered and with every VESSEL voxel
(heart, great and pulmonary vessels) raised to a late (100-140 HU), venous (140-200) and arterial (200-400) value
drawn per case, plus a cortex mostly at marrow values (60 % of BONE voxels at 250 HU, marrow +50 HU); per bone
margin it prints each variant's range and how many cases the check refuses. The 2026-12-06 runs (seed 2024:
16 × 192 px, 24-96 slices; seed 77: 12 × 384 px, 100-200 slices) are the numbers in models/scope.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

VARIANTS = ("unenhanced", "open cortex", "late", "venous", "arterial")
PHASES = {"late": (100.0, 140.0), "venous": (140.0, 200.0), "arterial": (200.0, 400.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--slices", default="24-96")
    parser.add_argument("--margins", default="12,15,18,25", help="bone margins to compare, mm")
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd

    import models.scope as scope
    from models.preprocess import load_series
    from models.registry import Registry
    from training.phantom import generate_dataset, load_masks
    from training.phantom.spec import Tissue

    segmenter = Registry().segmenter()
    margins = [float(m) for m in args.margins.split(",")]
    shipped = scope.BONE_MARGIN_MM
    found: dict[tuple[float, str], list[float]] = {(m, v): [] for m in margins for v in VARIANTS}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate_dataset(out, cases=args.cases, seed=args.seed, prevalence=0.5, size=args.size, slices=args.slices)
        for _, row in pd.read_csv(out / "clinical.csv").iterrows():
            volume = load_series(sorted((out / row.dicom_dir).glob("*.dcm")))
            tissue = load_masks(out / row.masks)["tissue"]
            variants = {"unenhanced": volume.hu}
            for name, (lo, hi) in PHASES.items():
                hu = volume.hu.astype(np.float32, copy=True)
                hu[tissue == Tissue.VESSEL] += rng.uniform(lo, hi) - 42.0  # the phantoms' blood reads 35-50 HU
                variants[name] = hu
            hu = volume.hu.astype(np.float32, copy=True)
            hu[(tissue == Tissue.BONE) & (rng.random(hu.shape) < 0.6)] = 250.0
            hu[tissue == Tissue.MARROW] += 50.0
            variants["open cortex"] = hu
            for name, hu in variants.items():
                changed = dataclasses.replace(volume, hu=hu, _cache={})
                lungs = segmenter.predict(changed).lungs
                for margin in margins:
                    scope.BONE_MARGIN_MM = margin
                    found[(margin, name)].append(scope.measure(changed, lungs)["mediastinum_enhanced_ml"])
    scope.BONE_MARGIN_MM = shipped
    limit = scope.ScopeSettings().max_enhanced_ml
    print(f"{args.cases} chest phantoms, seed {args.seed}, {args.size} px, {args.slices} slices; "
          f"refused above {limit:.0f} mL; the shipped bone margin is {shipped:g} mm\n")
    print("| bone margin | variant | enhanced mL, min – max | refused |")
    print("|---:|---|---:|---:|")
    for (margin, name), values in found.items():
        refused = sum(v > limit for v in values)
        print(f"| {margin:g} mm | {name} | {min(values):.0f} – {max(values):.0f} | {refused} of {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
