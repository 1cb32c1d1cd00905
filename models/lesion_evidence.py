"""The segmenter's lesion evidence, and its late fusion with the classifier (classifier versions that carry it).

The classifier misses small faint lesions that the U-Net still marks (docs/evaluation: the lesion-evidence arm).
A classifier version whose card has a ``lesion_fusion`` block reports, instead of its own calibrated probability,
a logistic regression over that probability's logit and numbers the segmenter's softmax gives per series, "lesion"
meaning the lesion probability of a pixel inside the lungs (lung + lesion ≥ 0.5; 0 outside). Two feature sets
exist, and a card names one (its coefficients' keys):

``v1`` (classifiers 2.1.0, 2.2.0):

* ``max_lesion_logit``: the logit of the largest lesion probability;
* ``log1p_lesion_px``: log(1 + lesion pixels), a pixel counting at p ≥ 0.5;
* ``log1p_max_slice_px``: log(1 + the most such pixels on one slice);
* ``log1p_lesion_slices``: log(1 + the slices with any such pixel).

``v2`` (from classifier 2.3.0): graded rather than thresholded at 0.5, so that a faint lesion the U-Net marks at
p = 0.3–0.5 counts. Chosen on a development set new to every model (300 phantoms, seed 6000; a regression fitted on
150 and scored on the other 150, 300 random splits): with a cross-validation fold classifier's logit, U-Net 1.1.0's
v1 evidence reached 90.6 % accuracy, v2 93.7 % (the evaluation's test folds were not used to choose):

* ``top10_lesion_logit``, ``top50_lesion_logit``, ``top200_lesion_logit``: the logit of the mean of the 10 / 50 /
  200 largest lesion probabilities in the series (0 where the lungs hold fewer pixels);
* ``log1p_px_p30``, ``log1p_px_p10``: log(1 + pixels at p ≥ 0.3 / ≥ 0.1);
* ``log1p_probability_sum``: log(1 + the summed lesion probability);
* ``log1p_slices_p30``: log(1 + the slices with any pixel at p ≥ 0.3).

``v3`` (from classifier 2.4.0): v2 plus the candidate stage's two series features (`models.candidates`: a CNN
scores each 3-D component the U-Net marks): ``max_candidate_score`` and ``log1p_candidates_p50``. A v3 fusion
names the candidate model (name, version) besides the segmenter, and refuses evidence without its scores.

All are on the segmenter's model grid (so they do not depend on the source matrix). The per-slice part
(`slice_evidence` → `SliceEvidence`: each slice's largest probability, pixel counts at 0.5 / 0.3 / 0.1, summed
probability and its `TOP_K` largest probabilities) is computed where the U-Net runs —
`models.registry.Segmenter.predict` and, while a series arrives, `models.streaming.SliceModels` — and
`LesionEvidence.features` pools it at completion (the series' top k lie among the slices' top `TOP_K`).
`training.crossval.lesion` computes the same features for the evaluation arm, and `training.lesion_fusion` fits a
version's ``lesion_fusion`` block.

**Pooling at a slice spacing** (from classifier 2.5.0: the card's ``lesion_fusion.pool_spacing_mm``). The series
features above grow with the number of slices the U-Net looks at — its largest probabilities are maxima over more
samples — so the same normal anatomy at 240 thin slices read far more "lesion" than at 48 (a 2.4.0 normal phantom:
0.40 → 0.995 fused, every series' own classifier probability unchanged). The phantoms the models were trained and
fitted on are point-sampled slices a few mm apart; a thin-slice series (0.6–1.25 mm, the usual chest CT) is
therefore read as ``step`` interleaved series of every ``step``-th slice (``step`` = the slice spacing closest to
``pool_spacing_mm``), each pooled as above, and the features averaged over them (the fusion is linear in its
features, so this is the mean of the ``step`` fused logits). A series already that far apart is pooled as before
(``step`` 1); the candidate features (3-D components) are the series' own. A version without the field pools every
slice, as it was fitted.

The coefficients were fitted with one segmenter's outputs: `LesionFusion.check_segmenter` refuses any other
segmenter name or version, and a fusing classifier refuses to give a verdict without evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from models.candidates import FEATURES as CANDIDATE_FEATURES
from models.candidates import CandidateEvidence, lesion_in_lungs
from models.errors import ModelError

FEATURES_V1 = ("max_lesion_logit", "log1p_lesion_px", "log1p_max_slice_px", "log1p_lesion_slices")
FEATURES_V2 = ("top10_lesion_logit", "top50_lesion_logit", "top200_lesion_logit", "log1p_px_p30", "log1p_px_p10",
               "log1p_probability_sum", "log1p_slices_p30")
FEATURES_V3 = FEATURES_V2 + CANDIDATE_FEATURES
FEATURE_SETS = {"v1": FEATURES_V1, "v2": FEATURES_V2, "v3": FEATURES_V3}
LATEST = "v3"  # the set new fusions are fitted with, where a candidate model is at hand
WITHOUT_CANDIDATES = "v2"  # the newest set that needs no candidate model
FEATURES = FEATURE_SETS[LATEST]
ALL_FEATURES = FEATURES_V1 + FEATURES_V2  # the segmenter's own (no candidate model needed)
CLASSIFIER_TERM = "classifier_logit"  # the calibrated classifier probability's logit, the regression's first input
TOP_K = 200  # largest probabilities kept per slice: enough for the series' top 200
POOL_SPACING_MM = 5.0  # what new fusions pool at (`training.lesion_fusion`): the phantoms' typical slice spacing
MAX_POOL_STEP = 32  # 0.16 mm slices at 5 mm: no CT is thinner; a spacing that says otherwise is not trusted further
_EPS = 1e-6


class LesionFusionError(ModelError):
    """A ``lesion_fusion`` block that cannot be used: malformed, another segmenter, or no evidence given."""


def logit(p: Any) -> np.ndarray:
    """log(p / (1 − p)) with p clipped to [1e-6, 1 − 1e-6] (float64)."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)))


@dataclass(frozen=True)
class SliceEvidence:
    """Per-slice lesion evidence of one run of slices (each array's first axis: the slices)."""

    max_probability: np.ndarray  # float32: the largest lesion probability
    pixels: np.ndarray  # int64: pixels at p ≥ 0.5
    pixels_p30: np.ndarray  # int64: at p ≥ 0.3
    pixels_p10: np.ndarray  # int64: at p ≥ 0.1
    probability_sum: np.ndarray  # float64: summed lesion probability
    top: np.ndarray  # float32 (slices, TOP_K): the largest lesion probabilities, descending, 0-padded

    def __len__(self) -> int:
        return len(self.pixels)

    def take(self, index: Any) -> SliceEvidence:
        """The slices at ``index`` (a slice or an index array), in that order."""
        return SliceEvidence(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concat(cls, parts: Sequence[SliceEvidence]) -> SliceEvidence:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    @classmethod
    def stack(cls, rows: Sequence[tuple[SliceEvidence, int]]) -> SliceEvidence:
        """One slice from each (evidence, index) pair, in the given order."""
        return cls(*(np.stack([getattr(e, f.name)[j] for e, j in rows]) for f in fields(cls)))

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, f.name).nbytes for f in fields(self)))


def newest_set(with_candidates: bool) -> str:
    """The feature set a new fusion takes: `LATEST` with a candidate model's scores, else `WITHOUT_CANDIDATES`."""
    return LATEST if with_candidates else WITHOUT_CANDIDATES


def slice_evidence(probabilities: np.ndarray) -> SliceEvidence:
    """Per slice of a U-Net softmax (slices, grid, grid, 3: background, lung, lesion): see the module docstring."""
    return map_evidence(lesion_in_lungs(probabilities))


def map_evidence(lesion_map: np.ndarray) -> SliceEvidence:
    """`slice_evidence` from the lesion-in-lungs probability (slices, grid, grid) (`models.candidates.lesion_in_lungs`),
    where the caller has it already."""
    lesion = np.asarray(lesion_map, dtype=np.float32).reshape(len(lesion_map), -1)
    k = min(TOP_K, lesion.shape[1])
    top = np.zeros((len(lesion), TOP_K), np.float32)
    if k:
        top[:, :k] = largest(lesion, k)
    return SliceEvidence(lesion.max(axis=1, initial=0.0).astype(np.float32),
                         (lesion >= 0.5).sum(axis=1).astype(np.int64), (lesion >= 0.3).sum(axis=1).astype(np.int64),
                         (lesion >= 0.1).sum(axis=1).astype(np.int64), lesion.sum(axis=1, dtype=np.float64), top)


def largest(rows: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values of each row of ``rows`` (n, m), in descending order: the same array as
    ``-np.sort(-np.partition(rows, m - k, axis=1)[:, -k:], axis=1)``, ~10× faster on lesion maps. numpy's
    introselect slows ~10× on many equal values, and every pixel outside the lungs is exactly 0; so a row with at
    least ``k`` positive values (and no NaN) partitions those alone, and any other row is sorted whole."""
    out = np.empty((len(rows), k), rows.dtype)
    for i, row in enumerate(rows):
        positive = row[row > 0]
        if len(positive) >= k and not np.isnan(row).any():
            part = np.partition(positive, len(positive) - k)[-k:]
        else:
            part = np.sort(row)[-k:]
        out[i] = -np.sort(-part)
    return out


def _top_mean(s: SliceEvidence, k: int) -> float:
    """The mean of the series' ``k`` largest lesion probabilities (0-padded): a partition, not a sort, of the
    slices' top `TOP_K` (a 1,000-slice series holds 200,000)."""
    flat = s.top.reshape(-1)
    values = np.partition(flat, len(flat) - k)[-k:] if len(flat) > k else flat
    return float(np.sum(values, dtype=np.float64) / k)


_FEATURE: dict[str, Callable[[SliceEvidence], float]] = {
    "max_lesion_logit": lambda s: float(logit(np.max(s.max_probability, initial=0.0))),
    "log1p_lesion_px": lambda s: float(np.log1p(s.pixels.sum())),
    "log1p_max_slice_px": lambda s: float(np.log1p(s.pixels.max(initial=0))),
    "log1p_lesion_slices": lambda s: float(np.log1p((s.pixels > 0).sum())),
    "top10_lesion_logit": lambda s: float(logit(_top_mean(s, 10))),
    "top50_lesion_logit": lambda s: float(logit(_top_mean(s, 50))),
    "top200_lesion_logit": lambda s: float(logit(_top_mean(s, 200))),
    "log1p_px_p30": lambda s: float(np.log1p(s.pixels_p30.sum())),
    "log1p_px_p10": lambda s: float(np.log1p(s.pixels_p10.sum())),
    "log1p_probability_sum": lambda s: float(np.log1p(s.probability_sum.sum())),
    "log1p_slices_p30": lambda s: float(np.log1p((s.pixels_p30 > 0).sum())),
}


def pooled_features(slices: SliceEvidence, names: Sequence[str] = ALL_FEATURES,
                    candidates: CandidateEvidence | None = None) -> np.ndarray:
    """(len(names),) float64 from per-slice evidence and, for the candidate features, ``candidates`` (see the
    module docstring). Raises KeyError on an unknown name, LesionFusionError for a candidate feature without
    candidates."""
    wanted = [n for n in names if n in CANDIDATE_FEATURES]
    if wanted and candidates is None:
        raise LesionFusionError(f"the features {wanted} need the candidate stage's scores, and none were given")
    scored = dict(zip(wanted, candidates.features(wanted), strict=True)) if candidates is not None and wanted else {}
    return np.array([scored[n] if n in scored else _FEATURE[n](slices) for n in names], dtype=np.float64)


def series_features(probabilities: np.ndarray, names: Sequence[str] = ALL_FEATURES) -> np.ndarray:
    """`pooled_features` of one series' U-Net softmax (slices, grid, grid, 3)."""
    return pooled_features(slice_evidence(probabilities), names)


def pool_step(slice_spacing_mm: float | None, pool_spacing_mm: float | None) -> int:
    """Every how many slices a series with ``slice_spacing_mm`` is read to come closest to ``pool_spacing_mm``
    (1: every slice; also when either is unknown or not a positive number), at most `MAX_POOL_STEP`."""
    if not slice_spacing_mm or not pool_spacing_mm or not (slice_spacing_mm > 0 and pool_spacing_mm > 0):
        return 1
    if not np.isfinite(ratio := pool_spacing_mm / slice_spacing_mm):
        return 1
    return int(min(max(1, round(ratio)), MAX_POOL_STEP))


@dataclass(frozen=True)
class LesionEvidence:
    """One series' per-slice lesion evidence (volume order) from segmenter ``segmenter`` = (name, version) on its
    ``grid``² model grid, and the candidate stage's scores when it ran (`models.candidates`)."""

    slices: SliceEvidence
    segmenter: tuple[str, str]
    grid: int
    candidates: CandidateEvidence | None = None
    slice_spacing_mm: float | None = None  # between the slices' centres (None: not known, never pooled)

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, segmenter: tuple[str, str],
                           candidates: CandidateEvidence | None = None) -> LesionEvidence:
        return cls(slice_evidence(probabilities), segmenter, int(np.shape(probabilities)[1]), candidates)

    def step(self, pool_spacing_mm: float | None) -> int:
        """How many interleaved series `features` pools this series as at ``pool_spacing_mm`` (`pool_step`, at
        most one per slice; 1: every slice as one series)."""
        return min(pool_step(self.slice_spacing_mm, pool_spacing_mm), max(1, len(self.slices)))

    def features(self, names: Sequence[str] = ALL_FEATURES, pool_spacing_mm: float | None = None) -> np.ndarray:
        """The series features ``names``; with ``pool_spacing_mm``, pooled at that slice spacing (module
        docstring: the mean over `step` interleaved series)."""
        step = self.step(pool_spacing_mm)
        if step == 1:
            return pooled_features(self.slices, names, self.candidates)
        return np.mean([pooled_features(self.slices.take(slice(j, None, step)), names, self.candidates)
                        for j in range(step)], axis=0)

    def describe(self) -> str:
        """For the SR: what the segmenter saw (no patient data; counts on the model grid). ASCII only: the SR's
        text values are in the default character repertoire."""
        s = self.slices
        top = float(np.max(s.max_probability, initial=0.0))
        text = (f"{self.segmenter[0]} {self.segmenter[1]}: largest lesion probability {top:.3f} in the lungs "
                f"(mean of the 50 largest {_top_mean(s, 50):.3f}), {int(s.pixels.sum())} lesion pixels at p >= 0.5 "
                f"on {int((s.pixels > 0).sum())} of {len(s)} slices, {int(s.pixels_p30.sum())} at p >= 0.3 "
                f"(on the {self.grid} x {self.grid} model grid)")
        return text if self.candidates is None else f"{text}; {self.candidates.describe()}"


@dataclass(frozen=True)
class LesionFusion:
    """A classifier card's ``lesion_fusion`` block: P = sigmoid(intercept + c₀·logit(p_classifier) + Σ cᵢ·featureᵢ)
    over one feature set (``features``), with the segmenter (name, version) whose outputs the coefficients were
    fitted on, and for a set with candidate features (v3) the candidate model (name, version) that scored them."""

    segmenter: tuple[str, str]
    coefficients: dict[str, float]
    intercept: float
    fitted_on: str
    candidates: tuple[str, str] | None = None
    pool_spacing_mm: float | None = None  # the slice spacing the evidence is pooled at (None: every slice)

    @property
    def features(self) -> tuple[str, ...]:
        """The feature set the coefficients name, in its canonical order."""
        return next(names for names in FEATURE_SETS.values() if set(names) == set(self.coefficients) - {CLASSIFIER_TERM})

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> LesionFusion | None:
        """The card's block, None when it has none. Raises LesionFusionError when it is malformed."""
        block = card.get("lesion_fusion")
        if block is None:
            return None
        where = f"model card {card.get('name')} {card.get('version')}"
        try:
            seg = block["segmenter"]
            cand = block.get("candidates")
            coefficients = {str(k): float(v) for k, v in block["coefficients"].items()}
            pool = block.get("pool_spacing_mm")
            fusion = cls((str(seg["name"]), str(seg["version"])), coefficients, float(block["intercept"]),
                         str(block.get("fitted_on", "")),
                         (str(cand["name"]), str(cand["version"])) if cand is not None else None,
                         None if pool is None else float(pool))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LesionFusionError(f"{where}: bad lesion_fusion: {exc}") from exc
        allowed = [sorted({CLASSIFIER_TERM, *names}) for names in FEATURE_SETS.values()]
        if sorted(coefficients) not in allowed:
            raise LesionFusionError(f"{where}: lesion_fusion coefficients must be exactly one of {allowed}, got "
                                    f"{sorted(coefficients)}")
        if not all(np.isfinite([*coefficients.values(), fusion.intercept])):
            raise LesionFusionError(f"{where}: non-finite lesion_fusion")
        if fusion.pool_spacing_mm is not None and not (0 < fusion.pool_spacing_mm < 100):
            raise LesionFusionError(f"{where}: lesion_fusion.pool_spacing_mm must lie in (0, 100) mm")
        if (fusion.candidates is not None) != any(n in CANDIDATE_FEATURES for n in coefficients):
            raise LesionFusionError(f"{where}: lesion_fusion names a candidate model if and only if its features "
                                    "use the candidate scores")
        return fusion

    def to_card(self) -> dict[str, Any]:
        block: dict[str, Any] = {"segmenter": {"name": self.segmenter[0], "version": self.segmenter[1]}}
        if self.candidates is not None:
            block["candidates"] = {"name": self.candidates[0], "version": self.candidates[1]}
        pool = {} if self.pool_spacing_mm is None else {"pool_spacing_mm": self.pool_spacing_mm}
        return {**block, "features": [CLASSIFIER_TERM, *self.features], "coefficients": dict(self.coefficients),
                "intercept": self.intercept, "fitted_on": self.fitted_on, **pool}

    def check_segmenter(self, name: str, version: str) -> None:
        """Raises LesionFusionError unless (name, version) is the segmenter the coefficients were fitted with."""
        if (str(name), str(version)) != self.segmenter:
            raise LesionFusionError(f"this classifier fuses lesion evidence from {self.segmenter[0]} "
                                    f"{self.segmenter[1]}, not from {name} {version}")

    def probability(self, classifier_probability: float, evidence: LesionEvidence | None) -> float:
        """The fused probability. Raises LesionFusionError without evidence or with another segmenter's."""
        if evidence is None:
            raise LesionFusionError(f"this classifier fuses lesion evidence from {self.segmenter[0]} "
                                    f"{self.segmenter[1]} and none was given")
        self.check_segmenter(*evidence.segmenter)
        if self.candidates is not None:
            got = evidence.candidates.model if evidence.candidates is not None else None
            if got != self.candidates:
                raise LesionFusionError(f"this classifier fuses the scores of candidate model "
                                        f"{' '.join(self.candidates)}, "
                                        f"{'and none were given' if got is None else 'not of ' + ' '.join(got)}")
        return self.probability_of(classifier_probability, evidence.features(self.features, self.pool_spacing_mm))

    def probability_of(self, classifier_probability: float, features: np.ndarray) -> float:
        """The fused probability from the classifier's probability and pooled ``self.features`` (no checks)."""
        names = (CLASSIFIER_TERM, *self.features)
        x = [logit(classifier_probability)[()], *np.asarray(features, dtype=np.float64)]
        z = self.intercept + sum(self.coefficients[k] * v for k, v in zip(names, x, strict=True))
        return float(1.0 / (1.0 + np.exp(-z)))


__all__ = ["ALL_FEATURES", "CANDIDATE_FEATURES", "CLASSIFIER_TERM", "FEATURES", "FEATURES_V1", "FEATURES_V2",
           "FEATURES_V3", "FEATURE_SETS", "LATEST", "POOL_SPACING_MM", "pool_step",
           "TOP_K", "WITHOUT_CANDIDATES", "LesionEvidence", "LesionFusion", "LesionFusionError", "SliceEvidence", "logit",
           "map_evidence", "newest_set", "pooled_features", "series_features", "slice_evidence"]
