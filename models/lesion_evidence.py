"""The segmenter's lesion evidence, and its late fusion with the classifier (classifier versions that carry it).

The classifier misses small faint lesions that the U-Net still marks (docs/evaluation: the lesion-evidence arm).
A classifier version whose card has a ``lesion_fusion`` block reports, instead of its own calibrated probability,
a logistic regression over that probability's logit and four numbers the segmenter's softmax gives per series:

* ``max_lesion_logit``: the logit of the largest lesion probability inside the lungs (lung + lesion ≥ 0.5);
* ``log1p_lesion_px``: log(1 + lesion pixels), a pixel being lesion at p ≥ 0.5 inside the lungs;
* ``log1p_max_slice_px``: log(1 + the most lesion pixels on one slice);
* ``log1p_lesion_slices``: log(1 + the slices with any lesion pixel);

all on the segmenter's model grid (so they do not depend on the source matrix). The per-slice part
(`slice_evidence`: the largest probability and the pixel count of each slice) is computed where the U-Net runs —
`models.registry.Segmenter.predict` and, while a series arrives, `models.streaming.SliceModels` — and
`LesionEvidence.features` pools it at completion. `training.crossval.lesion` computes the same features for the
evaluation arm, and `training.lesion_fusion` fits a version's ``lesion_fusion`` block.

The coefficients were fitted with one segmenter's outputs: `LesionFusion.check_segmenter` refuses any other
segmenter name or version, and a fusing classifier refuses to give a verdict without evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import ModelError

FEATURES = ("max_lesion_logit", "log1p_lesion_px", "log1p_max_slice_px", "log1p_lesion_slices")
CLASSIFIER_TERM = "classifier_logit"  # the calibrated classifier probability's logit, the regression's first input
_EPS = 1e-6


class LesionFusionError(ModelError):
    """A ``lesion_fusion`` block that cannot be used: malformed, another segmenter, or no evidence given."""


def logit(p: Any) -> np.ndarray:
    """log(p / (1 − p)) with p clipped to [1e-6, 1 − 1e-6] (float64)."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)))


def slice_evidence(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice of a U-Net softmax (slices, grid, grid, 3: background, lung, lesion): the largest lesion
    probability inside the lungs (float32) and the lesion pixels (p ≥ 0.5 inside the lungs, int64)."""
    p = np.asarray(probabilities, dtype=np.float32)
    lungs = (p[..., 1] + p[..., 2]) >= 0.5
    lesion_p = np.where(lungs, p[..., 2], np.float32(0.0))
    return lesion_p.max(axis=(1, 2), initial=0.0).astype(np.float32), (lesion_p >= 0.5).sum(axis=(1, 2)).astype(np.int64)


def pooled_features(max_probability: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(len(FEATURES),) float64 from per-slice evidence (see the module docstring)."""
    px = np.asarray(pixels, dtype=np.int64)
    top = float(np.max(max_probability, initial=0.0))
    return np.array([logit(top)[()], np.log1p(px.sum()), np.log1p(px.max(initial=0)), np.log1p((px > 0).sum())],
                    dtype=np.float64)


def series_features(probabilities: np.ndarray) -> np.ndarray:
    """`pooled_features` of one series' U-Net softmax (slices, grid, grid, 3)."""
    return pooled_features(*slice_evidence(probabilities))


@dataclass(frozen=True)
class LesionEvidence:
    """One series' per-slice lesion evidence (volume order) from segmenter ``segmenter`` = (name, version) on its
    ``grid``² model grid."""

    max_probability: np.ndarray
    pixels: np.ndarray
    segmenter: tuple[str, str]
    grid: int

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, segmenter: tuple[str, str]) -> LesionEvidence:
        top, px = slice_evidence(probabilities)
        return cls(top, px, segmenter, int(np.shape(probabilities)[1]))

    def features(self) -> np.ndarray:
        return pooled_features(self.max_probability, self.pixels)

    def describe(self) -> str:
        """For the SR: what the segmenter saw (no patient data; counts on the model grid). ASCII only: the SR's
        text values are in the default character repertoire."""
        px = np.asarray(self.pixels)
        top = float(np.max(self.max_probability, initial=0.0))
        return (f"{self.segmenter[0]} {self.segmenter[1]}: largest lesion probability {top:.3f} in the lungs, "
                f"{int(px.sum())} lesion pixels on {int((px > 0).sum())} of {len(px)} slices "
                f"(on the {self.grid} x {self.grid} model grid)")


@dataclass(frozen=True)
class LesionFusion:
    """A classifier card's ``lesion_fusion`` block: P = sigmoid(intercept + c₀·logit(p_classifier) + Σ cᵢ·featureᵢ)
    with the segmenter (name, version) whose outputs the coefficients were fitted on."""

    segmenter: tuple[str, str]
    coefficients: dict[str, float]
    intercept: float
    fitted_on: str

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> LesionFusion | None:
        """The card's block, None when it has none. Raises LesionFusionError when it is malformed."""
        block = card.get("lesion_fusion")
        if block is None:
            return None
        try:
            seg = block["segmenter"]
            coefficients = {str(k): float(v) for k, v in block["coefficients"].items()}
            fusion = cls((str(seg["name"]), str(seg["version"])), coefficients, float(block["intercept"]),
                         str(block.get("fitted_on", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LesionFusionError(f"model card {card.get('name')} {card.get('version')}: bad lesion_fusion: {exc}") from exc
        expected = {CLASSIFIER_TERM, *FEATURES}
        if set(coefficients) != expected:
            raise LesionFusionError(f"model card {card.get('name')} {card.get('version')}: lesion_fusion coefficients "
                                    f"must be exactly {sorted(expected)}, got {sorted(coefficients)}")
        if not all(np.isfinite([*coefficients.values(), fusion.intercept])):
            raise LesionFusionError(f"model card {card.get('name')} {card.get('version')}: non-finite lesion_fusion")
        return fusion

    def to_card(self) -> dict[str, Any]:
        return {"segmenter": {"name": self.segmenter[0], "version": self.segmenter[1]},
                "features": [CLASSIFIER_TERM, *FEATURES], "coefficients": dict(self.coefficients),
                "intercept": self.intercept, "fitted_on": self.fitted_on}

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
        return self.probability_of(classifier_probability, evidence.features())

    def probability_of(self, classifier_probability: float, features: np.ndarray) -> float:
        """The fused probability from the classifier's probability and pooled `FEATURES` (no checks)."""
        x = [logit(classifier_probability)[()], *np.asarray(features, dtype=np.float64)]
        z = self.intercept + sum(self.coefficients[k] * v for k, v in zip((CLASSIFIER_TERM, *FEATURES), x, strict=True))
        return float(1.0 / (1.0 + np.exp(-z)))


__all__ = ["CLASSIFIER_TERM", "FEATURES", "LesionEvidence", "LesionFusion", "LesionFusionError", "logit",
           "pooled_features", "series_features", "slice_evidence"]
