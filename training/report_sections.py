"""The report's sections on calibration before/after, class imbalance at the target prevalence, class weighting and
the image-only ablation, as blocks for :mod:`training.report` (absent from metrics → no section)."""

from __future__ import annotations

from typing import Any

Block = tuple[Any, ...]


def _fmt(x: Any, pct: bool = False) -> str:
    from training.report import fmt

    return fmt(x, "accuracy" if pct else "")


def _p_is(x: Any) -> str:
    from training.report import _p_is as p_value

    return p_value(x)


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
    """Arm, ROC AUC, accuracy pooled and mean ± SD over folds, sensitivity, specificity."""
    ms = a["accuracy_over_folds"]
    mean_sd = (f"{_fmt(ms['mean'], True)} ± {100 * ms['sd']:.1f}" if isinstance(ms.get("sd"), float)
               else _fmt(ms["mean"], True))
    return [name, _fmt(a["roc_auc"]), _fmt(a["accuracy"], True), mean_sd, _fmt(a["sensitivity"], True),
            _fmt(a["specificity"], True)]


def fused_headline(m: dict[str, Any]) -> str | None:
    """The lesion-evidence arm's mean accuracy ± SD, ROC AUC and subtle-lesion sensitivity in one phrase (the form
    the node's default classifier applies), or None without the arm."""
    le = m.get("lesion_evidence")
    if not le or "skipped" in le:
        return None
    a, ms = le["arms"]["lesion_evidence"], le["arms"]["lesion_evidence"]["accuracy_over_folds"]
    subtle = le["subtle_sensitivity"].get("lesion_evidence")
    return (f"mean accuracy {_fmt(ms['mean'], True)} ± {100 * ms['sd']:.1f}, ROC AUC {_fmt(a['roc_auc'])}, "
            f"subtle-lesion sensitivity {_fmt(subtle, True)} with the lesion evidence (feature set "
            f"{le.get('feature_set', 'v1')})")


def _bootstrap_text(bs: dict[str, Any]) -> str:
    ci = bs["ci95"]
    return (f"{_fmt(bs['difference'])} (95 % CI {_fmt(ci[0])} to {_fmt(ci[1])}), p {_p_is(bs['p_value'])}, "
            f"{bs['resamples']} resamples")


def ablation_blocks(m: dict[str, Any]) -> list[Block]:
    ab = m.get("ablation")
    if not ab:
        return []
    rows = [_arm_row(name, ab["arms"][key]) for name, key in (("Image + clinical", "image_clinical"),
                                                                 ("Image only", "image_only"))]
    bs, mc = ab["auc_paired_bootstrap"], ab["mcnemar"]
    return [("h2", "Ablation: image only against image + clinical (same folds)"),
            ("table", ["Arm", "ROC AUC", "Accuracy (pooled)", "Accuracy, mean ± SD over folds", "Sensitivity",
                       "Specificity"], rows),
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
    rows = [[*_arm_row(name, le["arms"][key]), _fmt(le["subtle_sensitivity"].get(key), True)]
            for name, key in (("Classifier (this report's model)", "classifier"),
                              ("Classifier + lesion evidence", "lesion_evidence"))]
    wc = le.get("without_candidates")
    if wc:
        rows.insert(1, [*_arm_row(f"Classifier + lesion evidence without the candidate stage ({wc['feature_set']})",
                                  wc["arm"]), _fmt(wc["subtle_sensitivity"], True)])
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
            ("table", ["Arm", "ROC AUC", "Accuracy (pooled)", "Accuracy, mean ± SD over folds", "Sensitivity",
                       "Specificity", "Subtle-lesion sensitivity"], rows),
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


def extra_blocks(m: dict[str, Any]) -> list[Block]:
    """Every section this module draws, in report order."""
    return calibration_blocks(m) + prevalence_blocks(m) + ablation_blocks(m) + lesion_blocks(m)
