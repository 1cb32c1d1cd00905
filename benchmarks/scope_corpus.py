"""Scope-check corpus: how often `models.scope.assess_chest_scope` lets each kind of series through, and what it costs
the shipped pneumonia classifier.

Usage: ``.venv/bin/python -m benchmarks.scope_corpus [--chest 60] [--per-region 40] [--seed 2024] [--csv FILE]``.
Generates chest phantoms (``training.phantom.generate_dataset``: normal, pneumonia, subtle single faint lesions),
the same chest series cut to their lowest quarter (lung bases only) and to their upper half, non-chest phantoms of
every region (``training.phantom.anatomy``), and real pydicom/pydicom-data CT slices restacked into volumes; runs the
U-Net, the scope check and the classifier on each, and prints per group: series, in scope, classifier positives
without and with the check, pneumonia sensitivity without and with the check (chest), the measures' ranges, and
the reasons given. ``--csv`` writes one row per series with every measure.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REAL_CT = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "693_UNCR.dcm",
           "bad_sequence.dcm")
SHOWN = ("lung_ml", "lung_aerated_fraction", "lung_extent_mm", "lung_side_share", "lung_body_ratio",
         "body_border_fraction", "head_slice_fraction", "pixel_correlation")


def _corpus(work: Path, chest: int, per_region: int, seed: int) -> list[dict[str, Any]]:
    """(group, files, label, subtle) for every series; writes the DICOM files under ``work``."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    from training.phantom import generate_dataset
    from training.phantom.anatomy import REGIONS, render_region, write_region
    from training.phantom.restack import restack_slice

    items: list[dict[str, Any]] = []
    table = generate_dataset(work / "chest", cases=chest, seed=seed, prevalence=0.6, size=(128, 384),
                             slices=(24, 96), progress=True)
    for _, row in table.iterrows():
        files = sorted((work / "chest" / row.dicom_dir).glob("*.dcm"))
        files.sort(key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
        kind = "chest, subtle" if row.subtle else ("chest, pneumonia" if row.label else "chest, normal")
        items.append({"group": kind, "files": files, "label": int(row.label)})
        if len(files) >= 16:
            items.append({"group": "chest cut: lowest quarter", "files": files[: len(files) // 4], "label": int(row.label)})
            items.append({"group": "chest cut: upper half", "files": files[len(files) // 2 :], "label": int(row.label)})
    rng = np.random.default_rng(seed)
    for region in REGIONS:
        for i in range(per_region):
            size = int(rng.choice([128, 192, 256, 320]))
            slices = int(rng.integers(24, 65))
            case = render_region(region, seed, i, size=size, slices=slices)
            files = write_region(case, seed, work / region / f"{i:03d}")
            group = "abdomen with lung bases" if case.detail == "lung bases" else region
            items.append({"group": group, "files": files, "label": 0})
    for name in REAL_CT:
        source = get_testdata_file(name)
        if source is None:
            print(f"skipped {name}: pydicom-data is not installed", file=sys.stderr)
            continue
        for n in (20, 60):
            files = restack_slice(source, work / "real" / f"{name}-{n}", slices=n, seed=seed, spacing_mm=5.0)
            items.append({"group": "real CT slice, restacked", "files": files, "label": 0, "name": name})
    return items


def _run(items: list[dict[str, Any]], weights_dir: Path | None) -> None:
    from models.preprocess import load_series
    from models.registry import Registry
    from models.scope import assess_chest_scope

    reg = Registry(weights_dir)
    clf, seg = reg.classifier(), reg.segmenter()
    cand = reg.candidates_for(clf)
    for n, it in enumerate(items, 1):
        vol = load_series(it["files"])
        segmented = seg.predict(vol, cand)
        lungs = segmented.lungs
        t = time.perf_counter()
        verdict = assess_chest_scope(vol, lungs)
        it["scope_s"] = time.perf_counter() - t
        out = clf.predict(vol, age=vol.patient_age, sex=vol.patient_sex, lesion=segmented.evidence)
        it.update(in_scope=verdict.in_scope, reason=verdict.reason, measures=verdict.measures,
                  positive=out.positive, probability=out.probability, shape=vol.shape)
        if n % 20 == 0:
            print(f"  {n}/{len(items)} series judged", file=sys.stderr, flush=True)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def _print(items: list[dict[str, Any]]) -> None:
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for it in items:
        groups[it["group"]].append(it)
    print(f"{'group':28} {'series':>6} {'in scope':>8} {'clf+ no check':>13} {'clf+ checked':>12} "
          f"{'sens. no check':>14} {'sens. checked':>13}")
    for name, its in groups.items():
        pos = [i for i in its if i["label"] == 1]
        n_in = sum(i["in_scope"] for i in its)
        clf_pos = sum(i["positive"] for i in its)
        clf_pos_in = sum(i["positive"] and i["in_scope"] for i in its)
        if pos and not name.startswith("chest cut"):
            sens = f"{sum(i['positive'] for i in pos)}/{len(pos)}"
            sens_c = f"{sum(i['positive'] and i['in_scope'] for i in pos)}/{len(pos)}"
        else:
            sens = sens_c = "-"
        print(f"{name:28} {len(its):>6} {n_in:>8} {clf_pos:>13} {clf_pos_in:>12} {sens:>14} {sens_c:>13}")
    chest = [i for i in items if i["group"].startswith("chest,")]
    pos = [i for i in chest if i["label"] == 1]
    print(f"{'all chest':28} {len(chest):>6} {sum(i['in_scope'] for i in chest):>8} "
          f"{sum(i['positive'] for i in chest):>13} {sum(i['positive'] and i['in_scope'] for i in chest):>12} "
          f"{sum(i['positive'] for i in pos)}/{len(pos):<12} {sum(i['positive'] and i['in_scope'] for i in pos)}/{len(pos)}")
    print("\nmeasure ranges per group (min–max)")
    print(f"{'group':28} " + " ".join(f"{k.replace('lung_', 'l_').replace('_fraction', '_fr')[:13]:>13}" for k in SHOWN))
    for name, its in groups.items():
        cells = []
        for k in SHOWN:
            vals = [i["measures"][k] for i in its]
            fmt = ".0f" if k.endswith(("_ml", "_mm")) else ".2f"
            cells.append(f"{min(vals):{fmt}}–{max(vals):{fmt}}")
        print(f"{name:28} " + " ".join(f"{c:>13}" for c in cells))
    print("\nreasons given (first failing check)")
    for name, its in groups.items():
        kinds = collections.Counter(_reason_kind(i["reason"]) for i in its)
        print(f"{name:28} " + "; ".join(f"{k} ×{v}" for k, v in kinds.most_common()))
    real = [i for i in items if "name" in i]
    if real:
        print("\nreal CT slices, restacked")
        for i in real:
            print(f"  {i['name']:26} {i['shape'][0]:>3} slices  in scope {i['in_scope']!s:5}  p {i['probability']:.2f}  "
                  f"{i['reason']}")
    times = sorted(i["scope_s"] for i in items)
    big = max(items, key=lambda i: i["shape"][0] * i["shape"][1] * i["shape"][2])
    print(f"\nscope check time per series: median {times[len(times) // 2] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms "
          f"(largest series {big['shape']}: {big['scope_s'] * 1000:.0f} ms)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")  # bad_sequence.dcm's malformed UID
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chest", type=int, default=60)
    p.add_argument("--per-region", type=int, default=40)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--workdir", type=Path, help="keep the generated series here (default: a temporary folder)")
    p.add_argument("--csv", type=Path, help="write one row per series with every measure")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        items = _corpus(work, args.chest, args.per_region, args.seed)
        t1 = time.perf_counter()
        _run(items, args.weights_dir)
    t2 = time.perf_counter()
    print(f"scope corpus: seed {args.seed}, {len(items)} series, {os.cpu_count()} logical CPUs")
    _print(items)
    print(f"wall time: {t2 - t0:.0f} s (generate {t1 - t0:.0f} s, U-Net + scope + classifier {t2 - t1:.0f} s)")
    if args.csv:
        import pandas as pd

        rows = [{"group": i["group"], "label": i["label"], "slices": i["shape"][0], "rows": i["shape"][1],
                 "in_scope": i["in_scope"], "probability": round(i["probability"], 4), "reason": i["reason"],
                 **{k: round(v, 4) for k, v in i["measures"].items()}} for i in items]
        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
