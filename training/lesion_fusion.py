"""Fit a classifier version's lesion fusion (`models.lesion_evidence`) on a phantom set neither model trained on.

``fit_lesion_fusion(data, registry, base_version=…, segmenter_version=…, version=…)`` runs the node's own
path over every case of ``data`` (``load_series`` → ``Segmenter.predict`` → ``Classifier.predict`` with the
clinical inputs the header offers), fits a logistic regression (scikit-learn, C = 1, as the evaluation's
lesion-evidence arm) of the label on the base classifier's calibrated logit and the segmenter's lesion features
(the newest set the models allow: v3 with the candidate stage's scores, from candidate model ``candidates_version``
or else the newest one trained over this segmenter; v2 when there is none), and picks the threshold by Youden's J on **out-of-fold**
fused probabilities (10-fold stratified cross-validation of the same regression on the same cases): in-sample, a
regression that nearly separates the fit set puts the Youden cut at its lowest positive's score, too high for new
cases (classifier 2.3.0's first fit: threshold 0.962, test sensitivity 0.86). It writes a new classifier version
folder: the base version's weights unchanged (same sha256), its card with the ``lesion_fusion`` block, the new
threshold, the out-of-fold metrics of the fused probability (and of the base alone, on the same cases) and where
it came from.

The fit set must be new to every model (their training and validation data were used to fit weights, pick epochs,
the threshold and the temperature; their predictions there are optimistic): `fit_lesion_fusion` refuses a dataset
whose seed any of their cards names. The new version is a release candidate (``"candidate": true``) until
``pacsnode model-eval`` on a held-out test set shows it beats the current default (see ``training/README.md``).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.lesion_evidence import (
    CLASSIFIER_TERM,
    FEATURE_SETS,
    LATEST,
    POOL_SPACING_MM,
    LesionFusion,
    logit,
    newest_set,
)
from models.registry import CARD_FILE, MODEL_FILE, Registry, RegistryError
from training.common import TrainingError, describe_data, seeds_of, youden_threshold
from training.stats import decision_metrics, roc_auc

MIN_PER_CLASS = 10  # cases of each class the fit set needs
OOF_FOLDS = 10  # folds of the out-of-fold probabilities the threshold is picked on
THRESHOLD_RULE = f"Youden J of the fused probability, out-of-fold ({OOF_FOLDS}-fold) on the fusion's fit set"


def fusion_inputs(data: Path, registry: Registry, *, base_version: str | None, segmenter_version: str | None,
                  candidates_version: str | None = None, names: tuple[str, ...] = FEATURE_SETS[LATEST],
                  progress: bool = True, pool_spacing_mm: float | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, base calibrated probabilities, lesion features (cases, len(names))) over ``data``: the
    evaluation's own pass (`training.evaluate.evaluate`, the node's path) with the base classifier (one that does
    not fuse: `fit_lesion_fusion` checks)."""
    from training.evaluate import evaluate

    rows = evaluate(data, registry, classifier_version=base_version, segmenter_version=segmenter_version,
                    candidates_version=candidates_version, progress=progress,
                    pool_spacing_mm=pool_spacing_mm)["per_case"]
    return (np.array([r["label"] for r in rows]), np.array([r["probability"] for r in rows]),
            np.array([[r["lesion_features"][n] for n in names] for r in rows]))


def fit(y: np.ndarray, p: np.ndarray, features: np.ndarray, segmenter: tuple[str, str],
        fitted_on: str, candidates: tuple[str, str] | None = None,
        pool_spacing_mm: float | None = None) -> tuple[LesionFusion, float, np.ndarray]:
    """The fusion (fitted on every case), its threshold and the out-of-fold fused probabilities the threshold was
    picked on (see the module docstring); ``features``: the columns of v3 with ``candidates``, else of v2. Raises
    TrainingError on too few cases."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if min(pos, neg) < MIN_PER_CLASS:
        raise TrainingError(f"the fit set holds {pos} pneumonia and {neg} normal cases; the fusion needs at least "
                            f"{MIN_PER_CLASS} of each")
    x = np.column_stack([logit(p), features])
    model = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    names = FEATURE_SETS[newest_set(candidates is not None)]
    fusion = LesionFusion(segmenter, dict(zip((CLASSIFIER_TERM, *names), map(float, model.coef_[0]), strict=True)),
                          float(model.intercept_[0]), fitted_on, candidates, pool_spacing_mm)
    oof = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x, y, method="predict_proba",
                            cv=StratifiedKFold(OOF_FOLDS, shuffle=True, random_state=0))[:, 1]
    return fusion, float(youden_threshold(y.tolist(), oof.tolist())), oof


def _metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    d = decision_metrics(y, (p >= threshold).astype(int))
    return {"roc_auc": roc_auc(y, p), "sensitivity": d["sensitivity"], "specificity": d["specificity"]}


def _validated_acquisition(dataset: dict[str, Any], pool_spacing_mm: float | None) -> dict[str, Any]:
    """The card's ``validated_acquisition``: the smallest matrix of the fit set (`models.registry.min_matrix_of`: the
    node refuses smaller ones; the fused verdict was never fitted there) and the slices it held."""
    rows, slices = dataset.get("rows_range") or [0, 0], dataset.get("slices_range")
    pooled = f"; lesion evidence pooled at {pool_spacing_mm:g} mm" if pool_spacing_mm else ""
    return {"min_matrix": int(rows[0]),
            "basis": f"the smallest matrix the lesion fusion was fitted on ({dataset['path']}: {rows[0]}-{rows[1]} px)",
            "slices": f"fitted on {slices[0]}-{slices[1]} point-sampled slices{pooled}" if slices else "not recorded"}


def fit_lesion_fusion(data: Path, registry: Registry, *, base_version: str | None, segmenter_version: str | None,
                      version: str, candidates_version: str | None = None, command: str = "",
                      progress: bool = True, pool_spacing_mm: float | None = POOL_SPACING_MM) -> dict[str, Any]:
    """Fit and write the new version (see the module docstring) as the registry's ``classifier/<version>``
    folder, which must not exist yet; returns its card. The evidence is pooled at ``pool_spacing_mm``
    (`models.lesion_evidence`; None: every slice, as before classifier 2.5.0)."""
    base_dir = registry.folder("classifier", base_version)
    if registry.classifier(base_dir.name).fusion is not None:
        raise TrainingError(f"classifier {base_dir.name} already fuses lesion evidence; name its base version")
    seg = registry.segmenter(segmenter_version)
    cand = registry.candidates(candidates_version) if candidates_version else registry.candidates_over(seg)
    if cand is not None and cand.segmenter != (seg.name, seg.version):
        raise TrainingError(f"candidate model {cand.version} scores the outputs of {' '.join(cand.segmenter)}, "
                            f"not of {seg.name} {seg.version}")
    base_card = json.loads((base_dir / CARD_FILE).read_text())
    dataset = describe_data(data)
    used = seeds_of(base_card) | seeds_of(seg.card) | (seeds_of(cand.card) if cand is not None else set())
    if dataset.get("seed") in used:
        raise TrainingError(f"{data} was made with seed {dataset['seed']}, which the classifier or segmenter card "
                            f"already names (seeds {sorted(used)}): fit the fusion on phantoms new to every model")
    target = registry.weights_dir / "classifier" / version
    if target.exists():
        raise TrainingError(f"{target} already exists")
    t0 = time.perf_counter()
    y, p, feats = fusion_inputs(data, registry, base_version=base_dir.name, segmenter_version=seg.version,
                                candidates_version=cand.version if cand is not None else None,
                                names=FEATURE_SETS[newest_set(cand is not None)], progress=progress,
                                pool_spacing_mm=pool_spacing_mm)
    seconds = time.perf_counter() - t0
    fitted_on = f"{dataset['path']} ({len(y)} phantoms, seed {dataset['seed']}, new to every model)"
    fusion, threshold, fused = fit(y, p, feats, (seg.name, seg.version), fitted_on,
                                   (cand.name, cand.version) if cand is not None else None, pool_spacing_mm)
    card = copy.deepcopy(base_card)
    for key in ("candidate", "candidate_reason"):
        card.pop(key, None)
    # The fused metrics are out-of-fold (10-fold on the fit set); the base alone is out-of-sample there.
    card["metrics"] = {"validation": {"dataset": dataset, **_metrics(y, fused, threshold),
                                      "threshold_rule": THRESHOLD_RULE,
                                      "note": "the fusion's fit set: the fused probabilities out-of-fold "
                                              f"({OOF_FOLDS}-fold), the threshold picked on them",
                                      "before_lesion_fusion": _metrics(y, p, float(base_card.get("threshold", 0.5)))},
                       "base_version": base_card.get("metrics", {})}
    card.update({
        "version": version,
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "lesion_fusion": fusion.to_card(),
        "validated_acquisition": _validated_acquisition(dataset, pool_spacing_mm),
        "derived_from": {"classifier": base_card["version"], "weights": "unchanged (same file, same sha256)",
                         "segmenter": {"name": seg.name, "version": seg.version},
                         **({"candidates": {"name": cand.name, "version": cand.version}} if cand is not None else {}),
                         "fit_seconds": round(seconds, 1), "command": command},
        "candidate": True,
        "candidate_reason": "Not compared with the default on a held-out test set yet (pacsnode model-eval).",
    })
    target.mkdir(parents=True)
    try:
        for name in (MODEL_FILE, "history.json", "curves.png"):
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, target / name)
        (target / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        Registry(registry.weights_dir).classifier(version)  # loads: sha256, card and fusion block are sound
    except (OSError, RegistryError):
        shutil.rmtree(target, ignore_errors=True)
        raise
    return card


__all__ = ["MIN_PER_CLASS", "OOF_FOLDS", "fit", "fit_lesion_fusion", "fusion_inputs"]
