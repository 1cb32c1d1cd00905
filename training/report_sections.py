"""The report's sections on calibration before/after, class imbalance at the target prevalence, class weighting and
the image-only ablation, as blocks for :mod:`training.report` (absent from metrics → no section)."""

from __future__ import annotations

import math
from typing import Any

Block = tuple[Any, ...]
ARM_HEAD = ("Arm", "ROC AUC [95 % CI]", "Accuracy, pooled [95 % CI]", "Accuracy, mean ± SD over folds",
            "Sensitivity [95 % CI]", "Specificity [95 % CI]")


def _fmt(x: Any, pct: bool = False) -> str:
    from training.report import fmt

    return fmt(x, "accuracy" if pct else "")


def _p_is(x: Any) -> str:
    from training.report import _p_is as p_value

    return p_value(x)


def _with_ci(x: Any, ci: Any, pct: bool = False) -> str:
    """A value and its 95 % CI, "92.6 % [90.8, 94.4]" (the CI left out when there is none)."""
    from training.report import _ci

    return f"{_fmt(x, pct)} {_ci(ci, 'accuracy' if pct else '')}".strip()


def proportion_text(s: dict[str, Any] | None) -> str:
    """A subgroup's `training.crossval.metrics.proportion`: "58.4 % [48.0, 68.1] (52/89)"."""
    if not s:
        return "n/a"
    return f"{_with_ci(s['value'], s.get('ci95'), True)} ({s['k']}/{s['n']})"


def target_statement(value: Any, ci: Any, target: float) -> str:
    """Where a point estimate and its 95 % CI lie against a target, in words that claim no more than they show."""
    from training.report import _finite

    if not _finite(value):
        return "n/a"
    side = "above" if value > target else "below" if value < target else "at"
    text = f"point estimate {_fmt(value, True)}, {side} the target"
    if ci and all(_finite(v) for v in ci):
        inside = ci[0] <= target <= ci[1]
        text += f"; the 95 % CI [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] {'includes' if inside else 'excludes'} it"
    return text


def calibration_blocks(m: dict[str, Any]) -> list[Block]:
    ba = (m.get("calibration") or {}).get("before_after")
    if not ba:
        return []
    temps = ", ".join(f"{t:.2f}" for t in ba["fold_temperatures"]) or "—"
    rows = [["Expected calibration error (10 bins)", _fmt(ba["ece_before"]), _fmt(ba["ece_after"])],
            ["Brier score", _fmt(ba["brier_before"]), _fmt(ba["brier_after"])]]
    return [("h2", "Calibration before and after temperature scaling"),
            ("p", f"Method: {ba['method']}. Fold temperatures: {temps}. The decision threshold is mapped through the "
                  "same temperature, so decisions do not change; the probabilities above and in the SR are the "
                  "calibrated ones."),
            ("table", ["Out-of-fold", "Before", "After"], rows)]


def prevalence_blocks(m: dict[str, Any], model: str = "this report's classifier") -> list[Block]:
    pv, cw = m.get("prevalence"), m.get("class_weighting")
    if not pv:
        return []
    tgt, obs = pv["target_prevalence"], pv["observed_prevalence"]
    ci = pv["pr_target"].get("pr_auc_ci95") or []
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 and all(isinstance(v, float) for v in ci) else ""
    op = pv["operating_point"]
    rows = [["PR AUC (average precision)", _fmt(pv["pr_observed"]["pr_auc"]), _fmt(pv["pr_target"]["pr_auc"]) + ci_text],
            ["Precision (PPV) at the operating point", _fmt(op["observed"]["ppv"], True), _fmt(op["target"]["ppv"], True)],
            ["NPV at the operating point", _fmt(op["observed"]["npv"], True), _fmt(op["target"]["npv"], True)],
            ["Sensitivity / specificity at the operating point",
             f"{_fmt(op['sensitivity'], True)} / {_fmt(op['specificity'], True)}", "same (prevalence-free)"]]
    for spec, v in pv["sensitivity_at_specificity"].items():
        rows.append([f"Sensitivity at {float(spec):.0%} specificity", _fmt(v["sensitivity"], True),
                     "same (prevalence-free)"])
    out: list[Block] = [
        ("h2", f"Class imbalance: evaluated at {tgt:.0%} prevalence ({model})"),
        ("p", f"Method: {pv['method']}. Sensitivity at fixed specificity reads the pooled out-of-fold ROC curve "
              "(its threshold is chosen on the test predictions, so it describes the curve, not a deployable "
              "operating point)."),
        ("table", ["", f"Data ({obs:.0%} pneumonia)", f"At {tgt:.0%} prevalence"], rows),
    ]
    if cw:
        out.append(("p", f"Class weighting in training: {'on' if cw['used'] else 'off'} — {cw['rule']}. On a balanced "
                         "training part the weights are 1 and it changes nothing; it matters when the training data "
                         "are imbalanced (switch: --no-class-weights)."))
    return out


def _arm_row(name: str, a: dict[str, Any]) -> list[str]:
    """Arm, ROC AUC, accuracy pooled and mean ± SD over folds, sensitivity, specificity; the pooled values with
    their bootstrap 95 % CIs where the metrics have them."""
    ms, ci = a["accuracy_over_folds"], a.get("ci95") or {}
    mean_sd = (f"{_fmt(ms['mean'], True)} ± {100 * ms['sd']:.1f}" if isinstance(ms.get("sd"), float)
               else _fmt(ms["mean"], True))
    return [name, _with_ci(a["roc_auc"], ci.get("roc_auc")), _with_ci(a["accuracy"], ci.get("accuracy"), True),
            mean_sd, _with_ci(a["sensitivity"], ci.get("sensitivity"), True),
            _with_ci(a["specificity"], ci.get("specificity"), True)]


def fused_headline(m: dict[str, Any]) -> str | None:
    """The lesion-evidence arm's mean accuracy ± SD, ROC AUC and subtle-lesion sensitivity in one phrase (the form
    the node's default classifier applies), or None without the arm."""
    le = m.get("lesion_evidence")
    if not le or "skipped" in le:
        return None
    a, ms = le["arms"]["lesion_evidence"], le["arms"]["lesion_evidence"]["accuracy_over_folds"]
    ci = a.get("ci95") or {}
    subtle = (le.get("subtle") or {}).get("lesion_evidence")
    subtle_text = proportion_text(subtle) if subtle else _fmt(le["subtle_sensitivity"].get("lesion_evidence"), True)
    return (f"mean accuracy {_fmt(ms['mean'], True)} ± {100 * ms['sd']:.1f} (pooled "
            f"{_with_ci(a['accuracy'], ci.get('accuracy'), True)}), ROC AUC {_with_ci(a['roc_auc'], ci.get('roc_auc'))}, "
            f"subtle-lesion sensitivity {subtle_text} with the lesion evidence (feature set "
            f"{le.get('feature_set', 'v1')})")


def _bootstrap_text(bs: dict[str, Any]) -> str:
    """A paired bootstrap's difference, CI and p; a p at its floor 2/(B + 1) (no resample on the far side of 0) is
    an upper bound, "p < 0.002", not a measured p (metrics written before ``p_at_floor`` are recognised by p)."""
    ci, n = bs["ci95"], bs["resamples"]
    floor = bs.get("p_floor", 2 / (n + 1) if n else float("nan"))
    at_floor = bs.get("p_at_floor", bool(n) and abs(bs["p_value"] - floor) < 1e-12)
    p = f"< {_upper(floor)} (no resample crossed 0)" if at_floor else _p_is(bs["p_value"])
    return f"{_fmt(bs['difference'])} (95 % CI {_fmt(ci[0])} to {_fmt(ci[1])}), p {p}, {n} resamples"


def _upper(x: float) -> str:
    """``x`` rounded up to two significant digits, so "p < …" never claims less than it knows (2/1001 → 0.002)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return f"{math.ceil(round(x / step, 9)) * step:.3g}"


def ablation_blocks(m: dict[str, Any]) -> list[Block]:
    ab = m.get("ablation")
    if not ab:
        return []
    rows = [_arm_row(name, ab["arms"][key]) for name, key in (("Image + clinical", "image_clinical"),
                                                                 ("Image only", "image_only"))]
    bs, mc = ab["auc_paired_bootstrap"], ab["mcnemar"]
    return [("h2", "Ablation: image only against image + clinical (same folds)"),
            ("table", list(ARM_HEAD), rows),
            ("table", ["Paired test", "Result"], [
                ["AUC difference (image + clinical − image only), paired bootstrap", _bootstrap_text(bs)],
                ["McNemar on the decisions", f"clinical-only correct {mc['a_only_correct']}, image-only correct "
                 f"{mc['b_only_correct']}; {mc['method']}: p {_p_is(mc['p_value'])}"]]),
            ("p", ab["explanation"])]


def lesion_blocks(m: dict[str, Any]) -> list[Block]:
    """The lesion-evidence arm (training.crossval.lesion): both arms, subtle sensitivity, paired tests, the fits."""
    le = m.get("lesion_evidence")
    if not le:
        return []
    title = ("h2", "Lesion evidence: the classifier fused with the segmenter")
    if "skipped" in le:
        return [title, ("p", f"Skipped: {le['skipped']}.")]
    subtle = le.get("subtle") or {}

    def sub(key: str, value: Any, counts: dict[str, Any] | None) -> str:
        return proportion_text(counts) if counts else _fmt(value, True)

    rows = [[*_arm_row(name, le["arms"][key]), sub(key, le["subtle_sensitivity"].get(key), subtle.get(key))]
            for name, key in (("Classifier (this report's model)", "classifier"),
                              ("Classifier + lesion evidence", "lesion_evidence"))]
    wc = le.get("without_candidates")
    if wc:
        rows.insert(1, [*_arm_row(f"Classifier + lesion evidence without the candidate stage ({wc['feature_set']})",
                                  wc["arm"]), sub("", wc["subtle_sensitivity"], wc.get("subtle"))])
    bs, mc, seg = le["auc_paired_bootstrap"], le["mcnemar"], le["segmenter"]
    tests = [["AUC difference (lesion evidence − classifier), paired bootstrap", _bootstrap_text(bs)],
             ["McNemar on the decisions", f"only the fusion correct {mc['a_only_correct']}, only the classifier "
              f"correct {mc['b_only_correct']}; {mc['method']}: p {_p_is(mc['p_value'])}"]]
    if wc:
        w_mc = wc["mcnemar"]
        tests += [["AUC difference (with − without the candidate stage), paired bootstrap",
                   _bootstrap_text(wc["auc_paired_bootstrap"])],
                  ["McNemar, with against without the candidate stage", f"only with it correct "
                   f"{w_mc['a_only_correct']}, only without it correct {w_mc['b_only_correct']}; {w_mc['method']}: "
                   f"p {_p_is(w_mc['p_value'])}"]]
    data = seg.get("training_data") or {}
    trained_on = (f"{data.get('cases')} phantoms, generator seed {data.get('seed')}" if data else "see its card")
    coef = [[str(f["fold"]), str(f.get("fit_cases", "–")), str(f["validation_cases"]), _fmt(f["threshold"]),
             ", ".join(f"{k} {v:+.2f}" for k, v in f["coefficients"].items())] for f in le["folds"]]
    return [title,
            ("table", [*ARM_HEAD, "Subtle-lesion sensitivity [95 % CI]"], rows),
            ("p", "CIs: percentile bootstrap over cases of the pooled out-of-fold predictions (as in the headline); "
                  "subtle-lesion sensitivity: Wilson interval of k/n."),
            ("table", ["Paired test", "Result"], tests),
            ("p", f"Segmenter: {seg.get('name')} {seg.get('version')}, trained on {trained_on} (none of this "
                  f"report's cases){_candidates_text(le.get('candidates'))}; its features took "
                  f"{le['feature_seconds']:.0f} s"
                  f"{' (read from the cache this run)' if le.get('features_from_cache') else ''}. {le['explanation']}"),
            ("table", ["Fold", "Fit cases (stage 1)", "Validation cases", "Threshold", "Fitted coefficients"], coef),
            *_fused_prevalence_and_calibration(le)]


def _fused_prevalence_and_calibration(le: dict[str, Any]) -> list[Block]:
    """The fused arm's (the headline model's) own 10 % prevalence table and calibration."""
    out = prevalence_blocks({"prevalence": le["prevalence"]}, "classifier + lesion evidence") \
        if le.get("prevalence") else []
    cal = le.get("calibration")
    if cal:
        out.append(("p", f"Calibration of the fused arm's out-of-fold probabilities: expected calibration error "
                         f"{_fmt(cal['ece'])}, Brier score {_fmt(cal['brier'])} ({cal['method']})."))
    return out


def _candidates_text(cand: dict[str, Any] | None) -> str:
    """The candidate model that scored the candidates (feature set v3), and its training data."""
    if not cand:
        return ""
    data = cand.get("training_data") or []
    sets = ", ".join(f"{d.get('cases')} (seed {d.get('seed')})" for d in data) if isinstance(data, list) else ""
    return (f"; candidate model: {cand.get('name')} {cand.get('version')}, trained on the U-Net's candidates in "
            f"{sets or 'see its card'} phantoms (none of this report's cases either)")


def fused_arm(m: dict[str, Any]) -> dict[str, Any] | None:
    """The lesion-evidence arm's pooled metrics (the form the node's default classifier applies), or None."""
    le = m.get("lesion_evidence")
    return None if not le or "skipped" in le else le["arms"]["lesion_evidence"]


def subtle_counts(m: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Subtle-lesion sensitivity with counts and Wilson CI: the classifier, the reader and the fused arm (absent
    in metrics written before the counts were)."""
    sub = (m.get("subgroups") or {}).get("subtle_pneumonia") or {}
    le = m.get("lesion_evidence") or {}
    return {"model": sub.get("model"), "reader": sub.get("reader"),
            "fused": (le.get("subtle") or {}).get("lesion_evidence") if fused_arm(m) else None}


TARGETS = ((0.92, "mean accuracy 92 % (the study)"), (0.60, "subtle-lesion sensitivity 60 % (the project)"))


def target_blocks(m: dict[str, Any]) -> list[Block]:
    """Each arm's point estimate and 95 % CI against the study's 92 % accuracy and the project's 60 % subtle-lesion
    sensitivity, worded by `target_statement`."""
    arms = [("Classifier", m["pooled"]["model"]["accuracy"], (m["pooled"]["model"].get("ci95") or {}).get("accuracy"),
             subtle_counts(m)["model"])]
    fused = fused_arm(m)
    if fused:
        arms.append(("Classifier + lesion evidence", fused["accuracy"], (fused.get("ci95") or {}).get("accuracy"),
                     subtle_counts(m)["fused"]))
    rows = []
    for name, acc, ci, sub in arms:
        rows.append([TARGETS[0][1], name, _with_ci(acc, ci, True), target_statement(acc, ci, TARGETS[0][0])])
        if sub:
            rows.append([TARGETS[1][1], name, proportion_text(sub),
                         target_statement(sub["value"], sub.get("ci95"), TARGETS[1][0])])
    return [("h2", "Against the targets"),
            ("table", ["Target", "Arm", "Estimate [95 % CI]", "Where it lies"], rows),
            ("p", "Accuracy: pooled out-of-fold (with equal folds the same as the mean over folds), percentile "
                  "bootstrap CI; subtle-lesion sensitivity: Wilson CI. A target inside the CI is consistent with "
                  "the data on either side: these cases do not show it reached or missed.")]


def extra_blocks(m: dict[str, Any]) -> list[Block]:
    """Every section this module draws, in report order."""
    return calibration_blocks(m) + prevalence_blocks(m) + ablation_blocks(m) + lesion_blocks(m)
