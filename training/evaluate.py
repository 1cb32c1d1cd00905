"""Evaluation of the registry's models on a phantom dataset, through the node's path (load_series → predict).

``evaluate(data, registry)`` returns classifier metrics (ROC AUC with a bootstrap 95 % CI, sensitivity and
specificity at the card's threshold with Wilson CIs, the simulated reader's for comparison, how often the
top-attention slice holds lesion, the calibration error of each stage of the probability — raw, temperature-scaled,
fused: `ece_fields`) and segmenter metrics on the source grid (per-case lung Dice, per-case lesion Dice over
pneumonia cases, pooled lesion Dice, false-positive lesion volume in normal cases), plus timings.
``format_table`` renders them; ``record_in_cards`` stores them under ``metrics.test`` of both model cards;
``compare`` pairs two results on the same cases (a candidate against the default) and ``format_comparison``
renders that.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.lesion_evidence import ALL_FEATURES, CANDIDATE_FEATURES, LesionEvidence
from models.preprocess import PreprocessError, dice, load_series
from models.registry import CARD_FILE, CLASSIFIER, SEGMENTER, Registry
from training.common import TrainingError, case_masks, describe_data, read_table, roc_auc, series_files


def bootstrap_ci(values: Any, stat: Callable[..., float], *, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % CI of ``stat`` over case-level resamples of ``values`` (arrays sharing axis 0)."""
    rng = np.random.default_rng(seed)
    arrays = values if isinstance(values, tuple) else (values,)
    m = len(arrays[0])
    out = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = stat(*(a[idx] for a in arrays))
        if np.isfinite(v):
            out.append(v)
    if not out:
        return float("nan"), float("nan")
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _lesion_features(evidence: LesionEvidence | None, pool_spacing_mm: float | None = None) -> dict[str, float] | None:
    """Every feature the evidence offers (the candidate stage's only when it ran), by name, pooled at
    ``pool_spacing_mm`` (`models.lesion_evidence`; None: every slice)."""
    if evidence is None:
        return None
    names = ALL_FEATURES + (CANDIDATE_FEATURES if evidence.candidates is not None else ())
    return dict(zip(names, map(float, evidence.features(names, pool_spacing_mm)), strict=True))


def evaluate(
    data: Path,
    registry: Registry | None = None,
    *,
    classifier_version: str | None = None,
    segmenter_version: str | None = None,
    candidates_version: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    pool_spacing_mm: float | None = None,
) -> dict[str, Any]:
    """Run both models on every case of a phantom dataset and compute the metrics (see module docstring). The
    candidate stage runs when the classifier's fusion takes its scores, or when ``candidates_version`` names one
    (its features are then in each case's ``lesion_features``, pooled at ``pool_spacing_mm``:
    `training.lesion_fusion` fits on them)."""
    from tqdm import tqdm

    from models.clinical import from_header

    reg = registry or Registry()
    clf = reg.classifier(classifier_version)
    seg = reg.segmenter_for(clf, segmenter_version)
    cand = reg.candidates(candidates_version) if candidates_version is not None else reg.candidates_for(clf)
    table = read_table(data)
    if limit is not None:
        table = table.iloc[:limit]
    rows = []
    for row in tqdm(table.itertuples(), total=len(table), desc="evaluate", disable=not progress):
        t0 = time.perf_counter()
        try:
            vol = load_series(series_files(data, str(row.dicom_dir), str(row.case_id)))
        except PreprocessError as exc:
            raise TrainingError(f"case {row.case_id}: {exc}") from exc
        t1 = time.perf_counter()
        s = seg.predict(vol, cand)  # first, as the node's pneumonia pipeline: a lesion-fusing classifier needs its evidence
        t2 = time.perf_counter()
        # The node's input: age and sex from the header, symptoms from its request text (phantoms have none).
        c = clf.predict(vol, clinical=from_header(vol.datasets[0] if vol.datasets else None, age=vol.patient_age,
                                                  sex=vol.patient_sex), lesion=s.evidence)
        t3 = time.perf_counter()
        m = case_masks(data, row)
        les_per_slice = m["lesion"].sum(axis=(1, 2))
        voxel_ml = float(np.prod(vol.spacing)) / 1000.0
        rows.append(
            {
                "case_id": row.case_id,
                "label": int(row.label),
                "reader": _reader_label(getattr(row, "reader_label", None), row.Index),
                "subtle": int(getattr(row, "subtle", 0)),
                "probability": c.probability,
                "raw_probability": c.raw_probability if c.raw_probability is not None else c.probability,
                "classifier_probability": (c.classifier_probability if c.classifier_probability is not None
                                           else c.probability),
                "lesion_features": _lesion_features(s.evidence, pool_spacing_mm),
                "attention_hit": bool(les_per_slice[int(np.argmax(c.attention))] > 0) if les_per_slice.any() else None,
                "lung_dice": dice(s.lungs, m["lungs"]),
                "lesion_dice": dice(s.lesion, m["lesion"]) if m["lesion"].any() else None,
                "lesion_tp": int(np.logical_and(s.lesion, m["lesion"]).sum()),
                "lesion_pred": int(s.lesion.sum()),
                "lesion_true": int(m["lesion"].sum()),
                "fp_lesion_ml": float(s.lesion.sum()) * voxel_ml if not m["lesion"].any() else None,
                "slices": vol.shape[0],
                "rows": vol.shape[1],
                "load_s": t1 - t0,
                "segmenter_s": t2 - t1,
                "classifier_s": t3 - t2,
            }
        )
    return summarise(rows, clf.threshold, data, {CLASSIFIER: clf.version, SEGMENTER: seg.version})


def ece_fields(y: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The ECE (10 bins) of each stage of the classifier's probability on ``rows``: ``ece_raw`` the network's raw
    output, ``ece_temperature_scaled`` that output through the card's temperature (before any fusion),
    ``ece_fused`` the lesion fusion's output (None for a version without one: its rows' ``probability`` is the
    temperature-scaled one), and ``ece`` the probability the node reports (the last stage). Temperature scaling
    and fusion are scored apart, so neither is credited with the other's change."""
    from training.calibration import ece

    p = np.array([r["probability"] for r in rows], dtype=np.float64)
    raw = np.array([r.get("raw_probability", r["probability"]) for r in rows], dtype=np.float64)
    scaled = np.array([r.get("classifier_probability", r["probability"]) for r in rows], dtype=np.float64)
    fused = bool(len(p)) and not np.array_equal(p, scaled)  # without a fusion the two are one value
    return {"ece_raw": ece(y, raw), "ece_temperature_scaled": ece(y, scaled),
            "ece_fused": ece(y, p) if fused else None, "ece": ece(y, p)}


def _reader_label(value: Any, index: Any) -> int:
    """The simulated reader's call for a case: 0 or 1, or -1 where the table has none (blank or no column).
    Raises TrainingError naming the table row for any other value."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return -1
    try:
        label = float(value)
    except ValueError:
        label = math.nan
    if label not in (0.0, 1.0):
        raise TrainingError(f"row {int(index) + 2} of clinical.csv: column 'reader_label': not 0, 1 or blank")
    return int(label)


def summarise(rows: list[dict[str, Any]], threshold: float, data: Path, versions: dict[str, str]) -> dict[str, Any]:
    """`evaluate`'s result from its per-case rows (see the module docstring; the ECE fields: `ece_fields`)."""
    y = np.array([r["label"] for r in rows])
    p = np.array([r["probability"] for r in rows])
    reader = np.array([r["reader"] for r in rows])
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    tp, tn = int((pred & pos).sum()), int((~pred & neg).sum())
    r_tp, r_tn = int(((reader == 1) & pos).sum()), int(((reader == 0) & neg).sum())
    r_pos, r_neg = int((pos & (reader >= 0)).sum()), int((neg & (reader >= 0)).sum())  # cases the reader read
    subtle = np.array([r["subtle"] for r in rows]) == 1
    lung = np.array([r["lung_dice"] for r in rows])
    les = np.array([r["lesion_dice"] for r in rows if r["lesion_dice"] is not None])
    fp_ml = np.array([r["fp_lesion_ml"] for r in rows if r["fp_lesion_ml"] is not None])
    hits = [r["attention_hit"] for r in rows if r["attention_hit"] is not None]
    tp_sum = sum(r["lesion_tp"] for r in rows)
    pooled = 2 * tp_sum / max(1, sum(r["lesion_pred"] + r["lesion_true"] for r in rows))
    slices = sum(r["slices"] for r in rows)
    sub_mask = subtle | neg
    return {
        "dataset": describe_data(data),
        "versions": versions,
        "cases": len(rows),
        "classifier": {
            "roc_auc": roc_auc(y, p),
            "roc_auc_ci95": bootstrap_ci((y, p), roc_auc),
            "threshold": threshold,
            "sensitivity": tp / max(1, int(pos.sum())),
            "sensitivity_ci95": wilson(tp, int(pos.sum())),
            "specificity": tn / max(1, int(neg.sum())),
            "specificity_ci95": wilson(tn, int(neg.sum())),
            "roc_auc_subtle_vs_normal": roc_auc(y[sub_mask], p[sub_mask]) if subtle.any() else None,
            "subtle_cases": int(subtle.sum()),
            "reader_sensitivity": r_tp / r_pos if r_pos else None,
            "reader_specificity": r_tn / r_neg if r_neg else None,
            "attention_top_slice_has_lesion": float(np.mean(hits)) if hits else None,
            **ece_fields(y, rows),
            # A lesion-fusing version: the image classifier's own (calibrated) probability, before the fusion.
            "roc_auc_before_lesion_fusion": roc_auc(y, np.array([r.get("classifier_probability", r["probability"])
                                                              for r in rows])),
            "clinical_inputs": "from the DICOM header as the node reads it (age, sex; symptoms only from request "
            "text, which phantoms do not carry)",
        },
        "segmenter": {
            "lung_dice_mean": float(lung.mean()),
            "lung_dice_ci95": bootstrap_ci(lung, np.mean),
            "lesion_dice_mean": float(les.mean()) if len(les) else None,
            "lesion_dice_ci95": bootstrap_ci(les, np.mean) if len(les) else None,
            "lesion_dice_median": float(np.median(les)) if len(les) else None,
            "lesion_dice_pooled": pooled,
            "false_positive_lesion_ml_in_normals_mean": float(fp_ml.mean()) if len(fp_ml) else None,
            "grid": "source grid (masks resampled back from the model grid)",
        },
        "timing": {
            "load_s_per_case": float(np.mean([r["load_s"] for r in rows])),
            "classifier_slices_per_s": slices / max(1e-9, sum(r["classifier_s"] for r in rows)),
            "segmenter_slices_per_s": slices / max(1e-9, sum(r["segmenter_s"] for r in rows)),
        },
        "per_case": rows,
    }


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics."""
    c, s, t, d = res["classifier"], res["segmenter"], res["timing"], res["dataset"]
    lines = [
        f"dataset {d['path']} (seed {d['seed']}, {res['cases']} cases, {d['pneumonia_cases']} pneumonia, "
        f"{d['rows_range'][0]}-{d['rows_range'][1]} px, {d['slices_range'][0]}-{d['slices_range'][1]} slices)",
        f"classifier {res['versions'][CLASSIFIER]}, segmenter {res['versions'][SEGMENTER]}",
        "",
        f"{'metric':<44}{'value':>8}  95% CI",
        f"{'-' * 44}{'-' * 8}  {'-' * 16}",
    ]

    def add(name: str, value: Any, ci: Any = None) -> None:
        v = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
        lines.append(f"{name:<44}{v:>8}  {_ci(ci)}")

    add("classifier ROC AUC", c["roc_auc"], c["roc_auc_ci95"])
    if c.get("roc_auc_before_lesion_fusion") is not None and c["roc_auc_before_lesion_fusion"] != c["roc_auc"]:
        add("classifier ROC AUC before the lesion fusion", c["roc_auc_before_lesion_fusion"])
    add(f"classifier sensitivity @ {c['threshold']:.3f}", c["sensitivity"], c["sensitivity_ci95"])
    add(f"classifier specificity @ {c['threshold']:.3f}", c["specificity"], c["specificity_ci95"])
    add(f"classifier ROC AUC, subtle only (n={c['subtle_cases']})", c["roc_auc_subtle_vs_normal"])
    add("simulated reader sensitivity", c["reader_sensitivity"])
    add("simulated reader specificity", c["reader_specificity"])
    add("top-attention slice holds lesion", c["attention_top_slice_has_lesion"])
    # an evaluation written before the three ECE fields has "ece_uncalibrated" (raw) and "ece" (the output)
    add("ECE (10 bins), raw classifier output", c.get("ece_raw", c.get("ece_uncalibrated")))
    add("ECE, temperature-scaled (before fusion)", c.get("ece_temperature_scaled"))
    if c.get("ece_fused") is not None:
        add("ECE, fused with the lesion evidence", c["ece_fused"])
    add("U-Net lung Dice (mean per case)", s["lung_dice_mean"], s["lung_dice_ci95"])
    add("U-Net lesion Dice (mean per pneumonia case)", s["lesion_dice_mean"], s["lesion_dice_ci95"])
    add("U-Net lesion Dice (median per case)", s["lesion_dice_median"])
    add("U-Net lesion Dice (pooled voxels)", s["lesion_dice_pooled"])
    add("false-positive lesion ml in normals (mean)", s["false_positive_lesion_ml_in_normals_mean"])
    add("load_series s/case", t["load_s_per_case"])
    lines.append(f"{'classifier slices/s':<44}{t['classifier_slices_per_s']:>8.0f}")
    lines.append(f"{'segmenter slices/s (incl. resampling)':<44}{t['segmenter_slices_per_s']:>8.0f}")
    return "\n".join(lines)


def _paired_rows(new: dict[str, Any], old: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-case rows of two `evaluate` results, in the same case order. Raises TrainingError when the two were
    not run on the same cases."""
    a, b = new["per_case"], old["per_case"]
    da, db = new["dataset"], old["dataset"]
    # keys one side lacks were added to the description later (e.g. ``pleural_lesions``): the shared ones decide
    shared = set(da) & set(db)
    if [r["case_id"] for r in a] != [r["case_id"] for r in b] or any(da[k] != db[k] for k in shared) \
            or not {"seed", "path"} <= shared:
        raise TrainingError("the two evaluations were not run on the same cases")
    return a, b


def compare(new: dict[str, Any], old: dict[str, Any], *, n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two `evaluate` results on the same cases (classifier ``new`` against ``old``): ROC AUC
    of each and their difference with a paired bootstrap 95 % CI, accuracy at each card's threshold, McNemar on
    the cases exactly one gets right, and the subtle-lesion sensitivity of each; where the two ran different
    segmenter versions, `compare_segmenters` under ``"segmenter"``. Raises TrainingError when the two were not run
    on the same cases."""
    from training.stats import decision_metrics, mcnemar

    a, b = _paired_rows(new, old)
    y = np.array([r["label"] for r in a])
    pa, pb = (np.array([r["probability"] for r in rows]) for rows in (a, b))
    ta, tb = new["classifier"]["threshold"], old["classifier"]["threshold"]
    ca, cb = (pa >= ta) == (y == 1), (pb >= tb) == (y == 1)
    subtle = np.array([r["subtle"] for r in a]) == 1
    da, db = (decision_metrics(y, (p >= t).astype(int)) for p, t in ((pa, ta), (pb, tb)))
    return {
        "new": new["versions"], "old": old["versions"], "cases": len(y),
        "roc_auc": {"new": roc_auc(y, pa), "old": roc_auc(y, pb), "difference": roc_auc(y, pa) - roc_auc(y, pb),
                    "difference_ci95": bootstrap_ci((y, pa, pb), lambda yy, x, z: roc_auc(yy, x) - roc_auc(yy, z), n=n,
                                                    seed=seed)},
        **{k: {"new": da[k], "old": db[k]} for k in ("accuracy", "sensitivity", "specificity")},
        "subtle_sensitivity": {"new": float(ca[subtle].mean()) if subtle.any() else None,
                               "old": float(cb[subtle].mean()) if subtle.any() else None,
                               "cases": int(subtle.sum())},
        "mcnemar": mcnemar(ca.astype(int), cb.astype(int)),
        **({"segmenter": compare_segmenters(new, old, n=n, seed=seed)}
           if new["versions"][SEGMENTER] != old["versions"][SEGMENTER] else {}),
    }


def compare_segmenters(new: dict[str, Any], old: dict[str, Any], *, n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The two segmenters of two `evaluate` results on the same cases: per pneumonia case, the lesion Dice of
    each, the mean paired difference (new − old) with a paired bootstrap 95 % CI and the cases each does better
    on; on the subtle cases, the mean Dice and how many have any true lesion voxel found; the mean false-positive
    lesion volume in normals. Raises TrainingError when they were not run on the same cases."""
    a, b = _paired_rows(new, old)
    pos = [i for i, r in enumerate(a) if r["lesion_dice"] is not None and b[i]["lesion_dice"] is not None]
    da, db = (np.array([rows[i]["lesion_dice"] for i in pos], dtype=np.float64) for rows in (a, b))
    subtle = [i for i in pos if a[i]["subtle"] == 1]
    normals = [i for i, r in enumerate(a) if r["fp_lesion_ml"] is not None and b[i]["fp_lesion_ml"] is not None]

    def per(rows: list[dict[str, Any]], idx: list[int], key: str) -> float | None:
        return float(np.mean([rows[i][key] for i in idx])) if idx else None

    return {
        "new": new["versions"][SEGMENTER], "old": old["versions"][SEGMENTER], "paired_cases": len(pos),
        "lesion_dice_mean": {"new": per(a, pos, "lesion_dice"), "old": per(b, pos, "lesion_dice")},
        "lesion_dice_mean_difference": float(np.mean(da - db)) if pos else None,
        "lesion_dice_difference_ci95": (bootstrap_ci((da, db), lambda x, z: float(np.mean(x - z)), n=n, seed=seed)
                                        if len(pos) > 1 else None),
        "cases_better": int((da > db).sum()), "cases_worse": int((da < db).sum()),
        "subtle_cases": len(subtle),
        "subtle_lesion_dice_mean": {"new": per(a, subtle, "lesion_dice"), "old": per(b, subtle, "lesion_dice")},
        "subtle_cases_found": {"new": sum(a[i]["lesion_tp"] > 0 for i in subtle),
                               "old": sum(b[i]["lesion_tp"] > 0 for i in subtle)},
        "false_positive_lesion_ml_in_normals_mean": {"new": per(a, normals, "fp_lesion_ml"),
                                                     "old": per(b, normals, "fp_lesion_ml")},
    }


def format_comparison(c: dict[str, Any]) -> str:
    """`compare`'s result as a few plain-text lines."""
    new, old = c["new"][CLASSIFIER], c["old"][CLASSIFIER]
    auc, m = c["roc_auc"], c["mcnemar"]
    lines = [f"classifier {new} against {old} on the same {c['cases']} cases",
             f"ROC AUC {auc['new']:.3f} vs {auc['old']:.3f}: difference {auc['difference']:+.3f} "
             f"{_ci(auc['difference_ci95'])} (paired bootstrap)"]
    for key in ("accuracy", "sensitivity", "specificity", "subtle_sensitivity"):
        v = c[key]
        if v["new"] is not None:
            lines.append(f"{key.replace('_', ' ')} {v['new']:.3f} vs {v['old']:.3f}")
    lines.append(f"McNemar ({m['method']}): {m['a_only_correct']} cases only {new} gets right, "
                 f"{m['b_only_correct']} only {old}; p = {m['p_value']:.3g}")
    sg = c.get("segmenter")
    if sg and sg["paired_cases"]:
        d, sd, found = sg["lesion_dice_mean"], sg["subtle_lesion_dice_mean"], sg["subtle_cases_found"]
        lines.append(f"segmenter {sg['new']} against {sg['old']}: lesion Dice {d['new']:.3f} vs {d['old']:.3f} on "
                     f"{sg['paired_cases']} pneumonia cases, difference {sg['lesion_dice_mean_difference']:+.3f} "
                     f"{_ci(sg['lesion_dice_difference_ci95'])} (paired bootstrap); better on "
                     f"{sg['cases_better']}, worse on {sg['cases_worse']}")
        if sg["subtle_cases"]:
            lines.append(f"subtle cases: Dice {sd['new']:.3f} vs {sd['old']:.3f}; any lesion voxel found in "
                         f"{found['new']} vs {found['old']} of {sg['subtle_cases']}")
        fp = sg["false_positive_lesion_ml_in_normals_mean"]
        if fp["new"] is not None:
            lines.append(f"false-positive lesion in normals: {fp['new']:.2f} vs {fp['old']:.2f} ml (mean)")
    return "\n".join(lines)


def record_in_cards(res: dict[str, Any], registry: Registry, command: str) -> list[Path]:
    """Store the test metrics (not the per-case rows) under ``metrics.test`` of the evaluated model cards, with
    ``res``'s comparison (`compare`) where it has one: its classifier part in the classifier's card, its segmenter
    part in the segmenter's. A comparison of two classifiers beside the same U-Net leaves the U-Net's card as it
    is (its measures would be the same, and its own comparison with its predecessor would be lost)."""
    written = []
    common = {"dataset": res["dataset"], "cases": res["cases"], "command": command, "timing": res["timing"]}
    comparison = dict(res.get("comparison") or {})
    parts = {SEGMENTER: comparison.pop("segmenter", None), CLASSIFIER: comparison or None}
    same_unet = bool(comparison) and parts[SEGMENTER] is None
    for kind, key in [(CLASSIFIER, "classifier")] + ([] if same_unet else [(SEGMENTER, SEGMENTER)]):
        path = registry.folder(kind, res["versions"][kind]) / CARD_FILE
        card = json.loads(path.read_text())
        card.setdefault("metrics", {})["test"] = {**common, **res[key],
                                                  **({"comparison": parts[kind]} if parts[kind] else {})}
        path.write_text(json.dumps(card, indent=2) + "\n")
        written.append(path)
    return written
