"""training.report and training.report_sections: every arm and subgroup with its 95 % CI (the headline table, the
lesion-evidence arm, the subtle-lesion subgroup), targets worded by where the CI lies, and a paired-bootstrap p at
its floor printed as a bound."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from training.crossval.imbalance import _paired_auc, paired_arms
from training.crossval.metrics import subgroups, summarise
from training.evaluate import wilson
from training.report import headline_rows, headline_table, to_markdown
from training.report_sections import _bootstrap_text, fused_headline, lesion_blocks


def _dataset(subtle: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(cases=[SimpleNamespace(row={"subtle": "1" if s else "0"}) for s in subtle])


def _run(n_subtle: int = 89, found: int = 52) -> dict:
    """A metrics.json-like dict of 800 cases: the classifier arm, the reader and a fused arm finding ``found`` of
    ``n_subtle`` subtle lesions (the cv800 run's 52 of 89)."""
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(400, int), np.zeros(400, int)]
    subtle = np.zeros(800, bool)
    subtle[:n_subtle] = True
    fold_of = np.tile(np.arange(1, 11), 80)
    p = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, 800), 0, 1)
    p[subtle] = rng.uniform(0, 0.4, n_subtle)  # the classifier misses most subtle lesions
    fused = np.clip(0.1 + 0.8 * y + rng.normal(0, 0.2, 800), 0, 1)
    fused[:n_subtle] = np.r_[np.full(found, 0.9), np.full(n_subtle - found, 0.2)]
    thr, reader = np.full(800, 0.5), np.where(rng.random(800) < 0.85, y, 1 - y)
    m = summarise(y, p, thr, fold_of, reader, bootstrap=200, seed=0)
    ds = _dataset(subtle)
    arms = paired_arms(y, fold_of, ("lesion_evidence", fused, thr), ("classifier", p, thr), bootstrap=200, seed=0)
    fused_sub = subgroups(ds, y, (fused >= thr).astype(int), reader)["subtle_pneumonia"]["model"]
    m.update(protocol={"folds": 10, "seed": 0}, dataset={"cases": 800, "pneumonia_cases": 400},
             subgroups=subgroups(ds, y, (p >= thr).astype(int), reader),
             lesion_evidence={**arms, "subtle_sensitivity": {"lesion_evidence": fused_sub["value"]},
                              "subtle": {"lesion_evidence": fused_sub}, "feature_set": "v3"})
    return m


def test_the_subtle_subgroup_has_its_counts_and_a_wilson_interval() -> None:
    m = _run()
    sub = m["subgroups"]["subtle_pneumonia"]
    k = sub["model"]["k"]
    assert sub["model"]["n"] == sub["cases"] == 89 and sub["model"]["ci95"] == list(wilson(k, 89))
    assert sub["model_sensitivity"] == pytest.approx(k / 89)
    r = sub["reader"]
    assert r["n"] == 89 and r["ci95"] == list(wilson(r["k"], 89)) and sub["reader_sensitivity"] == r["value"]
    fused = m["lesion_evidence"]["subtle"]["lesion_evidence"]
    assert (fused["k"], fused["n"]) == (52, 89)
    assert [round(100 * v, 1) for v in fused["ci95"]] == [48.0, 68.1]


def test_every_arm_has_bootstrap_intervals() -> None:
    arms = _run()["lesion_evidence"]["arms"]
    for arm in arms.values():
        for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            lo, hi = arm["ci95"][key]
            assert lo <= arm[key] <= hi and hi - lo > 0.005, key


def test_the_headline_table_holds_the_fused_arm_and_the_subtle_subgroup_with_intervals() -> None:
    m = _run()
    head, rows = headline_rows(m)
    assert head[-1].startswith("Model + lesion evidence") and head[-1].endswith("pooled [95 % CI]")
    acc = next(r for r in rows if r[0] == "Accuracy")
    a = m["lesion_evidence"]["arms"]["lesion_evidence"]
    lo, hi = a["ci95"]["accuracy"]
    assert acc[-1] == f"{100 * a['accuracy']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"
    auc = next(r for r in rows if r[0] == "ROC AUC")
    assert auc[-1] == f"{a['roc_auc']:.3f} [{a['ci95']['roc_auc'][0]:.3f}, {a['ci95']['roc_auc'][1]:.3f}]"
    subtle = next(r for r in rows if r[0].startswith("Sensitivity, subtle pneumonia (89 cases)"))
    assert subtle[-1] == "58.4 % [48.0, 68.1] (52/89)"
    k = m["subgroups"]["subtle_pneumonia"]["model"]["k"]
    assert subtle[2].endswith(f"({k}/89)") and "[" in subtle[2] and "[" in subtle[3]
    assert "58.4 % [48.0, 68.1] (52/89)" in headline_table(m)
    # the phrase the report (and the README) quote carries the intervals too
    text = fused_headline(m)
    assert text is not None and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in text and "58.4 % [48.0, 68.1] (52/89)" in text
    section = to_markdown(lesion_blocks(m | {"lesion_evidence": {**m["lesion_evidence"], "folds": [],
                                                                   "segmenter": {}, "feature_seconds": 1.0,
                                                                   "explanation": ""}}))
    assert "58.4 % [48.0, 68.1] (52/89)" in section and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in section


def test_a_target_inside_the_interval_is_worded_as_not_shown() -> None:
    """cv800's 52/89 and the fresh set's 67/98 lie on either side of 60 % and both intervals hold it ("reached" /
    "not reached" read off the point estimates alone); a Fisher test between them gives p = 0.17."""
    from training.report_sections import target_blocks, target_statement

    below = target_statement(52 / 89, wilson(52, 89), 0.60)
    assert below == "point estimate 58.4 %, below the target; the 95 % CI [48.0, 68.1] includes it"
    above = target_statement(67 / 98, wilson(67, 98), 0.60)
    assert above == "point estimate 68.4 %, above the target; the 95 % CI [58.6, 76.7] includes it"
    assert target_statement(0.84, (0.815, 0.865), 0.92).endswith("the 95 % CI [81.5, 86.5] excludes it")
    rows = to_markdown(target_blocks(_run()))
    assert "| subtle-lesion sensitivity 60 % (the project) | Classifier + lesion evidence | 58.4 % [48.0, 68.1] " \
           "(52/89) | point estimate 58.4 %, below the target; the 95 % CI [48.0, 68.1] includes it |" in rows
    assert rows.count("mean accuracy 92 % (the study)") == 2


def test_a_paired_bootstrap_p_at_its_floor_is_printed_as_a_bound() -> None:
    """No resample on the far side of 0: p is only known to lie below 2/(B + 1) (0.002 at B = 1000), and the
    report must not print it as a measured "p = 0.002"."""
    y = np.array([0, 1] * 100)
    good, poor = y + np.linspace(0, 0.5, 200), np.random.default_rng(0).random(200)
    bs = _paired_auc(y, good, poor, 1000, 0)
    assert bs["p_at_floor"] is True and bs["p_value"] == bs["p_floor"] == pytest.approx(2 / 1001)
    text = _bootstrap_text(bs)
    assert "p < 0.002 (no resample crossed 0)" in text and "p = 0.002" not in text
    # metrics written before the flag: recognised by their p
    old = {k: v for k, v in bs.items() if k not in ("p_floor", "p_at_floor")}
    assert "p < 0.002" in _bootstrap_text(old)
    # a p the resamples do resolve is printed as it is
    noisy = _paired_auc(y, poor + 0.01 * np.random.default_rng(1).random(200), poor, 1000, 0)
    assert noisy["p_at_floor"] is False and f"p = {noisy['p_value']:.3f}" in _bootstrap_text(noisy)
