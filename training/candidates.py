"""Train the candidate stage (`models.candidates`): a CNN scoring each lesion candidate a shipped U-Net marks.

``train_candidates(datasets, out, segmenter=…)``:

1. **Candidates** (`collect`): the segmenter runs over every case of every dataset on its model grid (the
   prepared-array cache of `training.prepared`), and `models.candidates.extract` gives each series' components and
   patches, exactly as the node makes them. A component is labelled a lesion when ≥ `LABEL_OVERLAP` of its voxels
   lie in the reference lesion mask on the same grid (area fraction ≥ 0.5).
2. **Training**: the CNN of `models.candidates.build_model`, Adam (learning rate 1e-3), batch 128, binary
   cross-entropy weighted by the inverse class frequency, random flips and quarter turns of the patches; 10 % of
   the *cases* (not candidates: a case's candidates are alike) are held out, and the epoch with the best ROC AUC
   there is kept. The card records that AUC beside the peak probability's own (what the U-Net alone tells).
   ``CandidateSettings.members`` > 1 (``--members N``) trains N such CNNs (seeds S … S + N − 1) on the same
   training and held-out cases and saves their mean as one model (`models.candidates.average`); measured on the
   development sets it was more specific, not more sensitive (training/README.md).

The datasets must be new to the segmenter (its training and validation data make its candidates unlike the
node's), and must never be the evaluation's cross-validation set or the test set: the fusing classifier's
metrics are measured there. `train_candidates` refuses a dataset whose seed the segmenter's card names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.candidates import (
    HALF,
    LABEL_OVERLAP,
    SCALARS,
    build_model,
    extract,
    lesion_in_lungs,
    patch_channels,
)
from training.common import (
    NOT_FOR_CLINICAL_USE,
    TrainingError,
    describe_data,
    save_run,
    seeds_of,
    training_environment,
)

NAME = "pacsnode-lesion-candidates"


WEIGHTINGS = ("class", "size")
SIZE_BANDS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0)  # log(1 + voxels) edges of the "size" weighting's bands
MAX_BAND_BOOST = 5.0  # a lesion candidate weighs at most this many times its "class" weighting's weight


@dataclass(frozen=True)
class CandidateSettings:
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    held_out_cases: float = 0.1
    seed: int = 0
    members: int = 1  # CNNs averaged into the one model (seeds seed, seed + 1, …)
    weighting: str = "class"  # `WEIGHTINGS`: see `sample_weights`


def sample_weights(labels: np.ndarray, scalars: np.ndarray, weighting: str) -> np.ndarray:
    """Each candidate's weight in the loss. Both weightings give the lesion class the same total weight as the
    rest (non-lesion candidates weigh 1). ``"class"``: every lesion candidate weighs the same (inverse class
    frequency). ``"size"``: within the lesion class every size band (log(1 + voxels), `SIZE_BANDS`) has the same
    total, so the small, faint lesions (a tenth of the lesion candidates, most of them 10-150 voxels) count as
    much as extensive disease; no candidate weighs more than `MAX_BAND_BOOST` times its ``"class"`` weight (a
    band so capped leaves the lesion class's total a little lower; on the training sets of training/README.md no
    band is)."""
    if weighting not in WEIGHTINGS:
        raise TrainingError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    lesion = labels >= 0.5
    positives, negatives = int(lesion.sum()), int((~lesion).sum())
    weights = np.ones(len(labels))
    if weighting == "class":
        weights[lesion] = negatives / positives
        return weights
    band = np.digitize(scalars[lesion, SCALARS.index("log1p_voxels")], SIZE_BANDS)
    counts = np.bincount(band, minlength=len(SIZE_BANDS) + 1)
    per = negatives / (counts[band] * np.count_nonzero(counts))  # each non-empty band: the same share
    weights[lesion] = np.minimum(per, MAX_BAND_BOOST * negatives / positives)
    return weights


@dataclass(frozen=True)
class Collected:
    """Every candidate of the datasets: patches, scalars, labels (1: lesion) and the case each came from (an index
    over all datasets' cases)."""

    patches: np.ndarray
    scalars: np.ndarray
    labels: np.ndarray
    cases: np.ndarray
    n_cases: int
    seconds: float


def collect(datasets: Sequence[Path], segmenter: Any, cache_dir: Path,
            log: Callable[[str], None] = print) -> Collected:
    """The labelled candidates of every case (see the module docstring)."""
    from scipy import ndimage

    from models.preprocess import masks_to_grid, window
    from training.dataset import load_dataset
    from training.phantom import load_masks
    from training.prepared import prepare

    t0 = time.perf_counter()
    grid = segmenter.preprocess.grid
    patches, scalars, labels, cases = [], [], [], []
    offset = 0
    for data in datasets:
        ds = load_dataset(data)
        prep = prepare(ds, grid, cache_dir)
        for i, (case, source) in enumerate(zip(prep.cases, ds.cases, strict=True)):
            x = window(case.hu.astype(np.float32), segmenter.preprocess)
            found = extract(x, lesion_in_lungs(segmenter.grid_probabilities(x)))
            if not len(found):
                continue
            reference = masks_to_grid(load_masks(Path(data) / str(source.row["masks"]))["lesion"], grid) >= 0.5
            overlap = ndimage.mean(reference, found.labels, index=np.arange(1, len(found) + 1))
            patches.append(found.patches)
            scalars.append(found.scalars)
            labels.append((np.asarray(overlap) >= LABEL_OVERLAP).astype(np.float32))
            cases.append(np.full(len(found), offset + i))
        offset += len(ds.cases)
        log(f"{data}: {len(ds.cases)} cases, {sum(map(len, labels))} candidates so far "
            f"({time.perf_counter() - t0:.0f} s)")
    if not labels:
        raise TrainingError("the segmenter marks no candidate in these datasets")
    return Collected(np.concatenate(patches), np.concatenate(scalars), np.concatenate(labels),
                     np.concatenate(cases), offset, time.perf_counter() - t0)


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.ascontiguousarray(np.rot90(x, int(rng.integers(4)), axes=(1, 2)))


def _fit_member(c: Collected, tr: np.ndarray, va: np.ndarray, s: CandidateSettings, seed: int,
                rng: np.random.Generator, name: str,
                log: Callable[[str], None]) -> tuple[Any, dict[str, Any], dict[str, list[float]]]:
    """One CNN trained on the candidates ``tr`` (initialised from ``seed``, batches drawn with ``rng``), kept at
    its best epoch by the ROC AUC on ``va``."""
    import keras

    from training.common import roc_auc

    keras.utils.set_random_seed(seed)
    weights = np.zeros(len(c.labels))
    weights[tr] = sample_weights(c.labels[tr], c.scalars[tr], s.weighting)
    model = build_model(c.patches.shape[-1], name=name)
    model.compile(keras.optimizers.Adam(s.learning_rate), "binary_crossentropy")
    history: dict[str, list[float]] = {"loss": [], "val_auc": []}
    best, best_weights, best_epoch = -1.0, None, 0
    for epoch in range(1, s.epochs + 1):
        order = rng.permutation(tr)
        losses = []
        for a in range(0, len(order), s.batch_size):
            b = np.sort(order[a : a + s.batch_size])
            losses.append(float(model.train_on_batch({"patch": _augment(c.patches[b], rng), "scalars": c.scalars[b]},
                                                     c.labels[b], sample_weight=weights[b])))
        auc = roc_auc(c.labels[va], _scores(model, c, va))
        history["loss"].append(float(np.mean(losses)))
        history["val_auc"].append(auc)
        log(f"{name} epoch {epoch}/{s.epochs}: loss {np.mean(losses):.4f}, held-out AUC {auc:.4f}")
        if auc > best:
            best, best_weights, best_epoch = auc, model.get_weights(), epoch
    model.set_weights(best_weights)
    return model, {"seed": seed, "best_epoch": best_epoch, "held_out_roc_auc": best}, history


def _scores(model: Any, c: Collected, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict({"patch": c.patches[idx], "scalars": c.scalars[idx]}, verbose=0,
                                    batch_size=512)).reshape(-1)


def fit(c: Collected, s: CandidateSettings, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """The trained CNN — or, with ``s.members`` > 1, the mean of that many CNNs (seeds ``s.seed`` + 0, 1, …, the
    same training and held-out cases) as one model — and its training record."""
    from models.candidates import average
    from training.common import roc_auc

    rng = np.random.default_rng(s.seed)
    held = rng.choice(c.n_cases, int(c.n_cases * s.held_out_cases), replace=False)
    va = np.flatnonzero(np.isin(c.cases, held))  # the held-out cases' candidates
    tr = np.setdiff1d(np.arange(len(c.labels)), va)
    positives = float(c.labels[tr].sum())
    if positives == 0 or positives == len(tr) or len(np.unique(c.labels[va])) < 2:
        raise TrainingError("training needs lesion and non-lesion candidates in both the training and the "
                            "held-out cases")
    if s.members < 1:
        raise TrainingError(f"an ensemble needs at least one member, got {s.members}")
    t0 = time.perf_counter()
    members, runs, history = [], [], {}
    for i in range(s.members):
        name = "candidates" if s.members == 1 else f"candidates_{i + 1}"
        # the first member draws its batches from the generator that drew the held-out cases, so a single CNN
        # trains exactly as it did before ensembles existed
        member_rng = rng if i == 0 else np.random.default_rng(s.seed + i)
        model, run, h = _fit_member(c, tr, va, s, s.seed + i, member_rng, name, log)
        members.append(model)
        runs.append(run)
        history.update(h if s.members == 1 else {f"{k}_{i + 1}": v for k, v in h.items()})
    model = average(members, c.patches.shape[-1])
    record = {
        "candidates": int(len(c.labels)), "lesion_candidates": int(c.labels.sum()), "cases": c.n_cases,
        "held_out_cases": int(len(held)), "held_out_candidates": int(len(va)),
        **({"best_epoch": runs[0]["best_epoch"]} if s.members == 1 else {"members": runs}),
        "held_out_roc_auc": runs[0]["held_out_roc_auc"] if s.members == 1
        else roc_auc(c.labels[va], _scores(model, c, va)),
        "held_out_roc_auc_peak_probability": roc_auc(c.labels[va], c.scalars[va, SCALARS.index("peak_probability")]),
        "collect_seconds": round(c.seconds, 1), "train_seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    return model, record


def train_candidates(datasets: Sequence[Path], out: Path, *, registry: Any = None, segmenter_version: str | None = None,
                     cache_dir: Path, settings: CandidateSettings | None = None, version: str = "0.0.0-dev",
                     command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect, train and write ``out`` (model.keras, model_card.json, history.json, curves.png); returns the
    card. Raises TrainingError."""
    from models.registry import Registry

    s = settings or CandidateSettings()
    reg = registry or Registry()
    seg = reg.segmenter(segmenter_version)
    described = [describe_data(Path(d)) for d in datasets]
    used = seeds_of(seg.card)
    clash = [d["path"] for d in described if d.get("seed") in used]
    if clash:
        raise TrainingError(f"{clash} were made with a seed the segmenter's card names ({sorted(used)}): its "
                            "candidates there are not like the node's")
    collected = collect([Path(d) for d in datasets], seg, cache_dir, log)
    model, record = fit(collected, s, log)
    history = record.pop("history")
    card = {
        "name": NAME,
        "version": version,
        "kind": "candidates",
        "task": "score each 3-D lesion candidate of the U-Net (a component of lesion probability >= 0.5 in the "
                "lungs) as lesion or not; two per-series features from the scores feed a lesion-fusing classifier",
        "intended_use": "Demonstration and testing of the pacs-ai-node pipeline. " + NOT_FOR_CLINICAL_USE,
        "not_for_clinical_use": True,
        "limitations": [
            "Trained only on synthetic phantoms from training.phantom; says nothing about real patients.",
            f"Scores the candidates of {seg.name} {seg.version} only (another segmenter's are refused).",
            "Sees a 3-slice 32 x 32 patch on the 128^2 model grid around each candidate's peak: context beyond it "
            "(the whole lung, the other candidates) is not used.",
        ],
        "segmenter": {"name": seg.name, "version": seg.version},
        "architecture": {
            "type": "2-D CNN over 3-slice patches + candidate size and peak"
                    + (f"; the mean of {s.members} such CNNs (seeds {s.seed}-{s.seed + s.members - 1})"
                       if s.members > 1 else ""),
            "patch": [2 * HALF, 2 * HALF, patch_channels(seg.preprocess.channels)],
            "scalars": list(SCALARS),
            "parameters": int(model.count_params()),
        },
        "preprocessing": seg.card["preprocessing"],
        "training": {
            "data": described,
            "label": f"a candidate is a lesion when >= {LABEL_OVERLAP:.0%} of its voxels lie in the reference "
                     "lesion mask (area fraction >= 0.5 on the model grid)",
            "settings": asdict(s),
            "loss": "binary cross-entropy, classes weighted by inverse frequency"
                    + ("; lesion candidates weighted so that each size band (log(1 + voxels) in steps of 1) has the "
                       "same total" if s.weighting == "size" else ""),
            "augmentation": "left-right and up-down flips, quarter turns",
            **record,
            "environment": training_environment(),
            "commands": [command] if command else [],
        },
        "metrics": {"validation": {"roc_auc": record["held_out_roc_auc"],
                                   "roc_auc_peak_probability": record["held_out_roc_auc_peak_probability"],
                                   "note": "per candidate, on the held-out cases' candidates"}},
    }
    save_run(model, Path(out), card, history, f"{NAME} {version}")
    return card


__all__ = ["NAME", "WEIGHTINGS", "CandidateSettings", "Collected", "collect", "fit", "sample_weights",
           "train_candidates"]
