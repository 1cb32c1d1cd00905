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
    from training.evaluate import compare, format_comparison
    from training.train import TrainingError

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
