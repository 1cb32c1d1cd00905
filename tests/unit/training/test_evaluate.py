"""training.evaluate: confidence intervals and the summary on hand-made rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluate import bootstrap_ci, format_table, summarise, wilson


def test_wilson_interval() -> None:
    lo, hi = wilson(45, 50)
    assert 0.78 < lo < 0.9 < hi < 0.97
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_ci_brackets_the_mean() -> None:
    x = np.random.default_rng(0).normal(0.7, 0.1, 200)
    lo, hi = bootstrap_ci(x, np.mean)
    assert lo < x.mean() < hi and hi - lo < 0.05


def _row(label: int, p: float, lung: float, les: float | None) -> dict:
    return {"case_id": "C", "label": label, "reader": label, "subtle": 0, "probability": p,
            "attention_hit": True if label else None, "lung_dice": lung, "lesion_dice": les,
            "lesion_tp": 8 if label else 0, "lesion_pred": 10 if label else 2, "lesion_true": 10 if label else 0,
            "fp_lesion_ml": None if label else 0.5, "slices": 10, "rows": 64,
            "load_s": 0.1, "classifier_s": 0.1, "segmenter_s": 0.2}


def test_summarise_and_table(tmp_path: Path) -> None:
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "case.json").write_text('{"seed": 5, "generator_version": "1"}')
    (tmp_path / "clinical.csv").write_text("case_id,dicom_dir,masks,label,rows,slices\nC,C,C,1,64,10\n")
    rows = [_row(1, 0.9, 0.95, 0.8), _row(1, 0.4, 0.93, 0.6), _row(0, 0.3, 0.97, None), _row(0, 0.1, 0.96, None)]
    res = summarise(rows, 0.5, tmp_path, {"classifier": "1", "segmenter": "1"})
    c, s = res["classifier"], res["segmenter"]
    assert c["roc_auc"] == 1.0 and c["sensitivity"] == 0.5 and c["specificity"] == 1.0
    assert s["lesion_dice_mean"] == pytest.approx(0.7) and s["lung_dice_mean"] == pytest.approx(0.9525)
    assert s["lesion_dice_pooled"] == pytest.approx(2 * 16 / (24 + 20))
    assert s["false_positive_lesion_ml_in_normals_mean"] == 0.5
    text = format_table(res)
    assert "classifier ROC AUC" in text and "1.000" in text


def _result(version: str, probabilities: list[float], threshold: float, labels: list[int], subtle: list[int]) -> dict:
    rows = [{"case_id": f"C{i}", "label": y, "subtle": s, "probability": p}
            for i, (y, p, s) in enumerate(zip(labels, probabilities, subtle, strict=True))]
    return {"dataset": {"path": "d", "seed": 1}, "versions": {"classifier": version, "segmenter": "1.0.0"},
            "classifier": {"threshold": threshold}, "per_case": rows}


def test_compare_pairs_two_evaluations_case_by_case() -> None:
    from training.common import TrainingError
    from training.evaluate import compare, format_comparison

    rng = np.random.default_rng(3)
    y = [1] * 30 + [0] * 30
    subtle = [1] * 10 + [0] * 50
    good = [float(v) for v in np.clip(np.array(y) * 0.5 + rng.uniform(0, 0.5, 60), 0, 1)]  # separates perfectly
    weak = [0.4 if s else g for g, s in zip(good, subtle, strict=True)]  # misses the 10 subtle cases at 0.5
    c = compare(_result("new", good, 0.5, y, subtle), _result("old", weak, 0.5, y, subtle), n=300)
    assert c["roc_auc"]["new"] == 1.0 and c["roc_auc"]["difference"] > 0
    lo, hi = c["roc_auc"]["difference_ci95"]
    assert 0 <= lo <= c["roc_auc"]["difference"] <= hi
    assert c["subtle_sensitivity"] == {"new": 1.0, "old": 0.0, "cases": 10}
    assert c["mcnemar"]["a_only_correct"] == 10 and c["mcnemar"]["b_only_correct"] == 0
    assert c["mcnemar"]["p_value"] < 0.01
    assert c["accuracy"]["new"] == 1.0 and c["accuracy"]["old"] == pytest.approx(50 / 60)
    text = format_comparison(c)
    assert "classifier new against old on the same 60 cases" in text and "10 cases only new gets right" in text
    same = compare(_result("a", good, 0.5, y, subtle), _result("b", good, 0.5, y, subtle), n=50)
    assert same["roc_auc"]["difference"] == 0 and same["mcnemar"]["discordant"] == 0
    other = _result("b", good, 0.5, y, subtle)
    other["per_case"] = other["per_case"][::-1]
    with pytest.raises(TrainingError, match="same cases"):
        compare(_result("a", good, 0.5, y, subtle), other)
    # an evaluation written before the dataset description gained a key still pairs; another seed does not
    newer = _result("a", good, 0.5, y, subtle)
    newer["dataset"]["pleural_lesions"] = 0.0
    assert compare(newer, _result("b", weak, 0.5, y, subtle), n=20)["accuracy"]["old"] == pytest.approx(50 / 60)
    reseeded = _result("b", weak, 0.5, y, subtle)
    reseeded["dataset"]["seed"] = 2
    with pytest.raises(TrainingError, match="same cases"):
        compare(newer, reseeded)


def test_compare_pairs_the_segmenters_when_their_versions_differ(tmp_path: Path) -> None:
    """Two evaluations with different U-Net versions: per-case lesion Dice paired, subtle cases found, false
    positives in normals; the comparison lands in each card (classifier part, segmenter part) with --write-card."""
    import json

    from models.registry import Registry
    from training.evaluate import compare, format_comparison, record_in_cards

    y = [1] * 20 + [0] * 10
    subtle = [1] * 5 + [0] * 25
    probs = [0.9] * 20 + [0.1] * 10
    new, old = _result("2", probs, 0.5, y, subtle), _result("1", probs, 0.5, y, subtle)
    new["versions"]["segmenter"] = "1.1.0"
    for i, (a, b) in enumerate(zip(new["per_case"], old["per_case"], strict=True)):
        pos = a["label"] == 1
        # the new U-Net finds every subtle lesion (old: none) and is 0.1 better elsewhere but on case 19
        a.update(lesion_dice=(0.6 if a["subtle"] else 0.8 - (0.2 if i == 19 else 0.0)) if pos else None,
                 lesion_tp=5 if pos else 0, fp_lesion_ml=None if pos else 0.5)
        b.update(lesion_dice=(0.0 if b["subtle"] else 0.7) if pos else None,
                 lesion_tp=(0 if b["subtle"] else 5) if pos else 0, fp_lesion_ml=None if pos else 2.0)
    c = compare(new, old, n=300)
    sg = c["segmenter"]
    assert (sg["new"], sg["old"], sg["paired_cases"], sg["subtle_cases"]) == ("1.1.0", "1.0.0", 20, 5)
    assert sg["cases_better"] == 19 and sg["cases_worse"] == 1
    assert sg["lesion_dice_mean_difference"] == pytest.approx((5 * 0.6 + 14 * 0.1 - 0.1) / 20)
    lo, hi = sg["lesion_dice_difference_ci95"]
    assert 0 < lo <= sg["lesion_dice_mean_difference"] <= hi
    assert sg["subtle_cases_found"] == {"new": 5, "old": 0}
    assert sg["subtle_lesion_dice_mean"]["new"] == pytest.approx(0.6)
    assert sg["false_positive_lesion_ml_in_normals_mean"] == {"new": 0.5, "old": 2.0}
    text = format_comparison(c)
    assert "segmenter 1.1.0 against 1.0.0" in text and "found in 5 vs 0 of 5" in text
    assert "segmenter" not in compare(old, old, n=10)  # the same U-Net: nothing to pair

    # record_in_cards: each card gets its own part
    weights = tmp_path / "w"
    for kind, version in (("classifier", "2"), ("segmenter", "1.1.0")):
        (weights / kind / version).mkdir(parents=True)
        (weights / kind / version / "model_card.json").write_text(json.dumps({"version": version}))
    res = {**new, "cases": 30, "timing": {}, "classifier": {"threshold": 0.5}, "segmenter": {}, "comparison": c}
    paths = record_in_cards(res, Registry(weights), "pacsnode model-eval …")
    cards = {p.parent.parent.name: json.loads(p.read_text())["metrics"]["test"]["comparison"] for p in paths}
    assert cards["segmenter"] == json.loads(json.dumps(sg))
    assert "segmenter" not in cards["classifier"] and cards["classifier"]["mcnemar"] == json.loads(json.dumps(c["mcnemar"]))
    # two classifiers beside the same U-Net: the U-Net's card keeps its own comparison
    same = compare({**new, "versions": {**new["versions"], "classifier": "3"}}, new, n=10)
    again = record_in_cards({**res, "comparison": same}, Registry(weights), "pacsnode model-eval …")
    assert [p.parent.parent.name for p in again] == ["classifier"]
    unet = json.loads((weights / "segmenter" / "1.1.0" / "model_card.json").read_text())
    assert unet["metrics"]["test"]["comparison"] == json.loads(json.dumps(sg))


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "case.json").write_text('{"seed": 5, "generator_version": "1"}')
    (tmp_path / "clinical.csv").write_text("case_id,dicom_dir,masks,label,rows,slices\nC,C,C,1,64,10\n")
    return tmp_path


def test_each_stage_of_the_probability_has_its_own_ece(tmp_path: Path) -> None:
    """Raw output, temperature-scaled output and fused output are scored apart, and the table names each: a
    temperature that sharpens a calibrated output raises its ECE, and a fusion that lowers it again is not
    credited to the temperature (the 2.x cards showed raw 0.072 -> "calibrated" 0.027, which was the fusion; the
    temperature alone had taken 0.072 to 0.092)."""
    from models.registry import apply_temperature
    from training.calibration import ece

    rng = np.random.default_rng(0)
    q = 1 / (1 + np.exp(-rng.normal(0, 2, 600)))  # the true probability: the raw output is calibrated
    y = (rng.random(600) < q).astype(int)
    sharp = apply_temperature(q, 0.5)  # T < 1 sharpens: over-confident
    fused = np.clip(q + rng.normal(0, 0.01, 600), 0.001, 0.999)  # a fusion that puts calibration back
    rows = [{**_row(int(y[i]), float(fused[i]), 0.9, 0.7 if y[i] else None), "raw_probability": float(q[i]),
             "classifier_probability": float(sharp[i])} for i in range(600)]
    c = summarise(rows, 0.5, _dataset(tmp_path), {"classifier": "2", "segmenter": "1"})["classifier"]
    assert c["ece_raw"] == pytest.approx(ece(y, q)) and c["ece_temperature_scaled"] == pytest.approx(ece(y, sharp))
    assert c["ece_fused"] == pytest.approx(ece(y, fused)) and c["ece"] == c["ece_fused"]
    assert c["ece_temperature_scaled"] > c["ece_raw"] + 0.03 > c["ece_fused"] + 0.03  # scaling made it worse
    assert "ece_uncalibrated" not in c
    table = format_table(summarise(rows, 0.5, tmp_path, {"classifier": "2", "segmenter": "1"}))
    lines = {line[:44].strip(): line[44:52].strip() for line in table.splitlines()}
    assert lines["ECE (10 bins), raw classifier output"] == f"{c['ece_raw']:.3f}"
    assert lines["ECE, temperature-scaled (before fusion)"] == f"{c['ece_temperature_scaled']:.3f}"
    assert lines["ECE, fused with the lesion evidence"] == f"{c['ece_fused']:.3f}"
    assert "calibrated" not in table.replace("temperature-scaled", "")

    # without a fusion the reported probability is the temperature-scaled one: no fused ECE, no fused row
    plain = [{**r, "probability": r["classifier_probability"]} for r in rows]
    c = summarise(plain, 0.5, tmp_path, {"classifier": "2.0.0", "segmenter": "1"})["classifier"]
    assert c["ece_fused"] is None and c["ece"] == c["ece_temperature_scaled"] == pytest.approx(ece(y, sharp))
    assert "fused" not in format_table(summarise(plain, 0.5, tmp_path, {"classifier": "2", "segmenter": "1"}))
