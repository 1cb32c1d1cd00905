"""training.crossval end to end on a 12-case phantom set (3 folds, quick): metrics against scikit-learn, folds
that keep patients whole, valid PNG figures, the report files, determinism, the final model and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from training import crossval, report
from training.crossval.settings import EvaluateSettings
from training.phantom import generate_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cv12")
    generate_dataset(out, cases=12, seed=41, size=48, slices=(12, 12))
    return out


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick evaluation through the CLI (with the image-only ablation arm). Its determinism is checked by the
    tests that train folds again into other folders from its array cache (resume, only-folds)."""
    from training.segmenter import SegmenterSettings, train_segmenter

    base = tmp_path_factory.mktemp("cv-out")
    tiny = SegmenterSettings(epochs=1, steps_per_epoch=2, grid=32, base=4, depth=2, batch_size=4)
    train_segmenter(data, base / "weights" / "segmenter" / "0.0.1", settings=tiny, version="0.0.1", progress=False,
                    log=lambda _: None)
    rc = crossval.main(["evaluate", "--data", str(data), "--folds", "3", "--out", str(base / "a"), "--seed", "7",
                        "--quick", "--quiet", "--bootstrap", "200", "--cache-dir", str(base / "cache"),
                        "--weights-dir", str(base / "weights")])
    assert rc == 0
    return base / "a"


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _without_ablation(out: Path) -> dict:
    return {k: v for k, v in _metrics(out).items() if k != "ablation"}


def test_pooled_and_fold_metrics_match_sklearn(run: Path) -> None:
    out = run
    m = _metrics(out)
    pred = pd.read_csv(out / "predictions.csv")
    y, p, d, r = pred.label.to_numpy(), pred.probability.to_numpy(), pred.prediction.to_numpy(), pred.reader_label.to_numpy()
    assert (d == (p >= pred.threshold.to_numpy())).all()
    pm = m["pooled"]["model"]
    assert pm["accuracy"] == pytest.approx(skm.accuracy_score(y, d))
    assert pm["sensitivity"] == pytest.approx(skm.recall_score(y, d, zero_division=np.nan), nan_ok=True)
    assert pm["specificity"] == pytest.approx(skm.recall_score(y, d, pos_label=0))
    assert pm["f1"] == pytest.approx(skm.f1_score(y, d, zero_division=0.0))
    assert pm["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert pm["brier"] == pytest.approx(skm.brier_score_loss(y, p), abs=1e-6)
    pr = m["pooled"]["reader"]
    assert pr["accuracy"] == pytest.approx(skm.accuracy_score(y, r))
    assert pr["precision"] == pytest.approx(skm.precision_score(y, r))
    c = m["comparison"]
    assert c["kappa_model_reader"] == pytest.approx(skm.cohen_kappa_score(d, r), nan_ok=True)
    assert c["mcnemar"]["discordant"] == int(((d == y) != (r == y)).sum())
    accs = []
    for f in m["folds"]:
        sel = pred.fold == f["fold"]
        assert f["accuracy"] == pytest.approx(skm.accuracy_score(y[sel], d[sel]))
        assert f["reader"]["accuracy"] == pytest.approx(skm.accuracy_score(y[sel], r[sel]))
        accs.append(f["accuracy"])
    assert m["summary"]["model"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert m["summary"]["model"]["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    lo, hi = pm["ci95"]["accuracy"]
    assert lo <= pm["accuracy"] <= hi


def test_folds_are_stratified_and_keep_patients_whole(run: Path) -> None:
    pred = pd.read_csv(run / "predictions.csv")
    assert sorted(pred.fold.unique()) == [1, 2, 3] and len(pred) == 12
    assert pred.groupby("patient_group").fold.nunique().max() == 1
    assert (pred.groupby("fold").label.sum() >= 1).all() and (pred.groupby("fold").label.count() == 4).all()


def test_outer_folds_group_patients_and_refuse_too_few() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1])
    groups = np.array(["a", "a", "b", "c", "d", "d", "e", "f", "g", "h", "i", "j"])
    for train, test in crossval.outer_folds(y, groups, 3, seed=1):
        assert not set(groups[train]) & set(groups[test])
        fit, val = crossval.inner_split(y, groups, train, 0.5, seed=1)
        assert not set(groups[fit]) & set(groups[val]) and len(fit) + len(val) == len(train)
    with pytest.raises(crossval.DatasetError, match="at least 7 patients of each class"):
        crossval.outer_folds(y, groups, 7, seed=1)


def test_every_figure_is_a_readable_png(run: Path) -> None:
    import matplotlib.image as mpimg

    figs = sorted((run / "figures").glob("*.png"))
    names = {f.stem for f in figs}
    assert {"hu_histograms", "training_curves", "roc", "confusion", "reliability", "fold_accuracy", "examples",
            "pr"} <= names
    for f in figs:
        raw = f.read_bytes()
        assert raw[:8] == PNG_SIGNATURE and len(raw) > 5000, f
        img = mpimg.imread(f)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0


def test_report_files_hold_the_numbers(run: Path) -> None:
    out = run
    m = _metrics(out)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    acc = report.fmt(m["pooled"]["model"]["accuracy"], "accuracy")
    auc = report.fmt(m["pooled"]["model"]["roc_auc"])
    mean_acc = f"{100 * m['summary']['model']['accuracy']['mean']:.1f} %"
    for text in (md, html):
        assert "not for clinical use" in text and "synthetic phantom" in text
        assert acc in text and auc in text and mean_acc in text
        assert "McNemar" in text and "kappa" in text and "paired t-test" in text.lower()
    assert md.count("](figures/") == 8
    assert "U-Net: pacsnode-lung-lesion-unet 0.0.1 from the registry" in md  # the overlay came from --weights-dir
    assert html.count('src="data:image/png;base64,') == 8
    for title in ("Calibration before and after temperature scaling", "Class imbalance: evaluated at 10% prevalence",
                  "Ablation: image only against image + clinical (same folds)"):
        assert f"## {title}" in md and title in html
    assert report.fmt(m["prevalence"]["pr_target"]["pr_auc"]) in md and "Class weighting in training: on" in md
    assert report.fmt(m["ablation"]["auc_paired_bootstrap"]["difference"]) in md
    assert report.fmt(m["calibration"]["before_after"]["ece_before"]) in md
    assert report.headline_table(m).splitlines()[2].startswith("| Metric |")
    run = json.loads((out / "run.json").read_text())
    assert run["wall_seconds"] > 0 and len(run["fold_train_seconds"]) == 3
    assert m["protocol"]["folds"] == 3 and m["protocol"]["fold_seeds"] == [8, 9, 10]
    assert (out / "folds" / "fold-01" / "model.keras").is_file()


def test_resume_reuses_finished_folds_with_the_same_numbers(run: Path, tmp_path: Path) -> None:
    """A rerun into a report folder retrains only the fold without a finished manifest; each fold reseeds, so
    a fold trained after loaded ones gives the numbers of a fresh run."""
    import shutil

    a = run
    c = tmp_path / "c"
    shutil.copytree(a, c, ignore=shutil.ignore_patterns("figures", "report.*", "metrics.json"))
    (c / "folds" / "fold-02" / "fold.json").unlink()
    data = _metrics(a)["dataset"]["root"]
    crossval.evaluate(data, folds=3, out=c, seed=7, quick=True, bootstrap=200, cache_dir=a.parent / "cache",
                      weights_dir=a.parent / "weights", progress=False)
    record = json.loads((c / "run.json").read_text())
    assert record["resumed_folds"] == [1, 3]
    assert (c / "metrics.json").read_bytes() == (a / "metrics.json").read_bytes()
    # the image-only arm's three folds were all reused too, and the report counts every reused fold model
    assert record["image_only_resumed_folds"] == [1, 2, 3]
    assert "5 of the 6 fold models trained by earlier runs" in (c / "report.md").read_text()


def test_only_folds_split_the_work_and_claims_are_respected(run: Path, tmp_path: Path) -> None:
    import os

    a = run
    data, d = _metrics(a)["dataset"]["root"], tmp_path / "d"
    common = {"folds": 3, "out": d, "seed": 7, "quick": True, "bootstrap": 200, "cache_dir": a.parent / "cache",
              "progress": False, "ablation": False, "weights_dir": a.parent / "weights"}
    (d / "folds" / "fold-02").mkdir(parents=True)
    (d / "folds" / "fold-02" / "claim").write_text(str(os.getppid()))  # a live process holds fold 2
    assert crossval.evaluate(data, only_folds=[3, 2, 1], **common) == {"only_folds": [3, 2, 1], "reused": []}
    assert not (d / "metrics.json").exists() and not (d / "folds" / "fold-02" / "fold.json").exists()
    assert {p.parent.name for p in d.glob("folds/*/fold.json")} == {"fold-01", "fold-03"}
    assert not list(d.glob("folds/fold-0[13]/claim"))
    (d / "folds" / "fold-02" / "claim").write_text("999999999")  # its holder died: the claim is taken over
    crossval.evaluate(data, **common)
    assert json.loads((d / "run.json").read_text())["resumed_folds"] == [1, 3]
    # A whole run trained again from the first one's array cache, without the ablation arm: the same numbers.
    assert json.loads((a / "run.json").read_text())["prepare_from_cache"] is False
    assert json.loads((d / "run.json").read_text())["prepare_from_cache"] is True
    assert _metrics(a)["ablation"] is not None and _metrics(d)["ablation"] is None
    assert _without_ablation(d) == _without_ablation(a)
    assert (d / "predictions.csv").read_bytes() == (a / "predictions.csv").read_bytes()
    with pytest.raises(ValueError, match="fold numbers 1..3"):
        crossval.evaluate(data, only_folds=[4], **common)


def test_train_final_without_masks_loads_in_the_registry(data: Path, run: Path, tmp_path: Path) -> None:
    """Series labels only (no masks column): the model trains, ships through the registry, records the CV."""
    from models.preprocess import load_series
    from models.registry import CARD_FILE, Registry

    table = pd.read_csv(data / "clinical.csv").drop(columns=["masks", "dicom_dir", "case_id"])
    table.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "weights" / "classifier" / "0.0.1"
    card = crossval.train_final(data, out, labels=tmp_path / "labels.csv", seed=3, quick=True, version="0.0.1",
                                cache_dir=tmp_path / "cache", cv_metrics=run / "metrics.json", progress=False)
    assert card["training"]["settings"]["slice_loss_weight"] == 0.0
    assert card["training"]["settings"]["pretrain_steps"] == 0
    saved = json.loads((out / CARD_FILE).read_text())
    assert saved["metrics"]["cross_validation"]["folds"] == 3
    assert saved["metrics"]["cross_validation"]["pooled"]["accuracy"] == _metrics(run)["pooled"]["model"]["accuracy"]
    clf = Registry(tmp_path / "weights").classifier("0.0.1")
    vol = load_series(sorted((data / "CASE0001" / "dicom").glob("*.dcm")))
    res = clf.predict(vol, age=vol.patient_age, sex=vol.patient_sex)
    assert 0.0 <= res.probability <= 1.0 and res.attention.shape == (12,)


def test_imbalance_and_ablation_numbers(run: Path) -> None:
    """The 10 % prevalence section against scikit-learn's weighted average precision, and the ablation's arms
    against the image-only models' own predictions (they must ignore the clinical inputs)."""
    out = run
    m, pred = _metrics(out), pd.read_csv(out / "predictions.csv")
    y, p = pred.label.to_numpy(), pred.probability.to_numpy()
    w = 0.9 / 0.1 * y.sum() / (len(y) - y.sum())
    pv = m["prevalence"]
    assert pv["negative_weight"] == pytest.approx(w)
    assert pv["pr_target"]["pr_auc"] == pytest.approx(skm.average_precision_score(y, p, sample_weight=np.where(y == 1, 1, w)))
    assert pv["pr_observed"]["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert pv["sensitivity_at_specificity"]["0.90"]["sensitivity"] == pytest.approx(tpr[fpr <= 0.1 + 1e-12].max())
    ab = m["ablation"]
    arms, mc = ab["arms"], ab["mcnemar"]
    assert arms["image_clinical"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert ab["auc_paired_bootstrap"]["difference"] == pytest.approx(
        arms["image_clinical"]["roc_auc"] - arms["image_only"]["roc_auc"])
    # McNemar's discordant counts and the arms' accuracies describe the same decisions.
    assert mc["a_only_correct"] - mc["b_only_correct"] == round(
        len(y) * (arms["image_clinical"]["accuracy"] - arms["image_only"]["accuracy"]))
    card = json.loads((out / "folds" / "fold-01-image-only" / "model_card.json").read_text())
    assert card["clinical_inputs"]["used"] == [] and card["calibration"]["method"] == "temperature"
    assert m["calibration"]["before_after"]["fold_temperatures"] == [
        json.loads((out / "folds" / f"fold-0{k}" / "model_card.json").read_text())["calibration"]["temperature"]
        for k in (1, 2, 3)]


def test_fit_refuses_cases_on_another_grid(tmp_path: Path) -> None:
    """fit hands prepared cases straight to train_classifier_cases; cases on another grid are refused first."""
    from training.common import GridCase

    s = crossval.classifier_settings(quick=True)  # grid 32
    case = GridCase(case_id="c1", label=1, hu=np.zeros((4, 16, 16), np.float16), slice_lesion=np.zeros(4, np.float32),
                    slice_lung=np.ones(4, np.float32), age=None, sex=None)
    with pytest.raises(crossval.TrainingError, match="on a 16 grid, the settings want 32"):
        crossval.fit([case], [], s, tmp_path / "m", describe_train={})
    assert not (tmp_path / "m").exists()


def _differences(got: object, want: object, at: str = "") -> list[str]:
    """Where ``got`` and ``want`` (parsed JSON, or CSV cells) differ: every key, length, string and integer
    exactly, floats within 1e-5 relative (fixtures/README.md: CPUs with other vector units round TensorFlow's
    float32 training in the last digits)."""
    if isinstance(want, dict) and isinstance(got, dict):
        if list(got) != list(want):
            return [f"{at}: keys {list(got)} != {list(want)}"]
        return [d for k in want for d in _differences(got[k], want[k], f"{at}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{at}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{at}[{i}]")]
    if isinstance(want, float) and isinstance(got, float) and not (np.isnan(want) or np.isnan(got)):
        return [] if got == pytest.approx(want, rel=1e-5, abs=1e-9) else [f"{at}: {got!r} != {want!r}"]
    if type(got) is not type(want) or (got != want and not (isinstance(want, float) and np.isnan(want) and np.isnan(got))):
        return [f"{at}: {got!r} != {want!r}"]
    return []


def _cells(text: str) -> list[list[object]]:
    """A CSV's cells, numbers with a decimal point or exponent as floats."""
    def cell(v: str) -> object:
        try:
            return float(v) if any(c in v for c in ".eEn") else v
        except ValueError:
            return v
    return [[cell(v) for v in line.split(",")] for line in text.splitlines()]


def test_metrics_match_the_run_before_the_split(run: Path) -> None:
    """The quick run writes the metrics.json and predictions.csv that crossval.py wrote before it became a package
    (fixtures/README.md): the same keys, texts and counts, floats within 1e-5 relative; only the dataset folder,
    a temporary path, is masked."""
    a = run
    root = _metrics(a)["dataset"]["root"]
    written = (a / "metrics.json").read_text().replace(json.dumps(root)[1:-1], "<data>")
    assert _differences(json.loads(written), json.loads((FIXTURES / "crossval-quick-metrics.json").read_text())) == []
    assert _differences(_cells((a / "predictions.csv").read_text()),
                        _cells((FIXTURES / "crossval-quick-predictions.csv").read_text())) == []


def test_register_adds_both_subcommands() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    crossval.register(sub)
    args = parser.parse_args(["evaluate", "--data", "d", "--folds", "10", "--out", "r", "--seed", "3", "--quick",
                              "--epochs", "2"])
    assert (args.folds, args.seed, args.quick, args.epochs, args.func) == (10, 3, True, 2, crossval.cmd_evaluate)
    args = parser.parse_args(["train-final", "--data", "d", "--out", "m", "--version", "1.2.0"])
    assert args.func is crossval.cmd_train_final and args.version == "1.2.0"


def test_cli_reports_dataset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crossval.main(["evaluate", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_budget_options_reach_the_settings_and_bad_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    crossval.register(sub)
    args = parser.parse_args(["evaluate", "--data", "d", "--warmup-steps", "300", "--max-slices", "32", "--epochs", "3"])
    assert args.ablation is True
    assert parser.parse_args(["evaluate", "--data", "d", "--no-ablation"]).ablation is False
    assert args.segmenter_version is None
    pinned = parser.parse_args(["evaluate", "--data", "d", "--segmenter-version", "1.1.0"]).segmenter_version
    assert pinned == "1.1.0"
    assert EvaluateSettings(data="d", segmenter_version=pinned).command_line().endswith(" --segmenter-version 1.1.0")
    s = crossval.classifier_settings(epochs=args.epochs, warmup_steps=args.warmup_steps, max_slices=args.max_slices)
    assert (s.epochs, s.pretrain_steps, s.max_slices) == (3, 300, 32)
    default = crossval.classifier_settings()
    assert (default.pretrain_steps, default.max_slices) != (300, 32)
    # without lesion masks there is nothing to warm up on, whatever was asked
    assert crossval.classifier_settings(warmup_steps=300, slice_labels=False).pretrain_steps == 0
    with pytest.raises(ValueError, match="warm-up"):
        crossval.classifier_settings(warmup_steps=-1)
    with pytest.raises(ValueError, match="max slices"):
        crossval.classifier_settings(max_slices=0)


def test_the_pr_curve_is_the_upper_envelope_at_each_recall() -> None:
    """Precision on the recall grid is the best precision at recall ≥ r (it was the best at recall ≤ r, which made
    every stored precision 1.0 and pr.png two flat lines)."""
    from training.crossval.imbalance import pr_curve

    y = np.array([1, 0, 1, 0, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    curve = pr_curve(y, p)
    at = dict(zip(curve["recall"], curve["precision"], strict=True))
    assert at[0.0] == 1.0 and at[0.33] == 1.0  # the top case alone
    assert at[0.66] == pytest.approx(2 / 3, abs=1e-4) and at[1.0] == pytest.approx(0.5)  # 3 of the top 6
    assert np.all(np.diff(curve["precision"]) <= 0)  # never rises with recall
    weighted = pr_curve(y, p, 9 * 3 / 5)  # negatives reweighted to 10 % prevalence
    assert weighted["precision"][-1] == pytest.approx(3 / (3 + 3 * 27 / 5), abs=1e-4)


def test_a_paired_bootstrap_with_every_difference_on_one_side_has_p_above_zero() -> None:
    """With B resamples the smallest p resolved is about 2/(B + 1), not 0 (the report printed "p = < 0.001")."""
    from training.crossval.imbalance import _paired_auc

    y = np.array([0, 1] * 50)
    good, poor = y + np.linspace(0, 0.5, 100), np.random.default_rng(0).random(100)
    result = _paired_auc(y, good, poor, 200, 0)
    assert result["p_value"] == pytest.approx(2 / (result["resamples"] + 1))
    assert report._p_is(result["p_value"]) == "= 0.010" and report._p_is(0.0004) == "< 0.001"
