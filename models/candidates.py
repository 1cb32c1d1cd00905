"""The candidate stage: a small CNN that scores each lesion candidate the U-Net marks, shared by node and training.

The U-Net's lesion probability is a per-pixel answer; the classifier's series verdict misses small faint lesions,
and pooling the U-Net's probabilities (`models.lesion_evidence` v2) cannot tell a faint lesion from a vessel or a
partial-volume rim at the same probability. The candidate stage looks at each thing the U-Net marks as a whole:

* **Candidates** (`extract`): the 3-D components (26-connected) of the lesion-in-lungs probability ``lp`` ≥ 0.5 on
  the segmenter's model grid, ``lp`` being the lesion probability of a pixel whose lung + lesion probability is
  ≥ 0.5 (0 elsewhere; `lesion_in_lungs`). For each: a 32 × 32 patch centred on its peak pixel, on the peak slice
  and the slices either side (zero beyond the volume), with three channels per slice — the U-Net's two windowed
  input channels and ``lp`` — so 9 channels; and two numbers: log(1 + its voxels) and its peak probability.
* **Scores** (`CandidateModel.score`): a CNN (3 blocks of two 3 × 3 convolutions, 16/32/64 filters, ReLU, 2 × 2
  max-pooling; global average pooling; the two numbers joined; dense 32; sigmoid) gives each candidate the
  probability that it is a lesion. Trained by `training.candidates` on components of phantoms the U-Net never
  saw, labelled true when ≥ 30 % of a component's voxels lie in the reference lesion mask (`LABEL_OVERLAP`).
* **Series features** (`CandidateEvidence.features`, feature set v3 of `models.lesion_evidence`):
  ``max_candidate_score`` (0 with no candidate) and ``log1p_candidates_p50`` (log(1 + candidates scoring ≥ 0.5)).

Measured while developing it (training/README.md): on two development sets new to every model, U-Net 1.1.0's v2
features plus these two raised accuracy from 93.0 to 95.2 % and from 90.1 to 94.5 %. Cost: ~27 ms per 40-slice
series on 2 CPU cores (labelling, patches, CNN).

A candidate model's card names the segmenter (name, version) whose outputs it was trained on; `check_segmenter`
refuses any other (`models.registry.Registry.candidates_for` pairs them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import ModelError

THRESHOLD = 0.5  # lp at or above it belongs to a candidate
HALF = 16  # half the patch side (patches are 2·HALF square)
CONTEXT = 1  # slices either side of the peak slice
LABEL_OVERLAP = 0.3  # training label: a candidate is a lesion when this share of its voxels is
SCORE_COUNT = 0.5  # candidates scoring at or above it are counted (log1p_candidates_p50)
FEATURES = ("max_candidate_score", "log1p_candidates_p50")
SCALARS = ("log1p_voxels", "peak_probability")


class CandidateError(ModelError):
    """A candidate model that does not fit its inputs (another segmenter, another grid or channel count)."""


def lesion_in_lungs(probabilities: np.ndarray) -> np.ndarray:
    """(slices, grid, grid) float32 from a U-Net softmax (…, 3: background, lung, lesion): the lesion probability
    where lung + lesion ≥ 0.5, else 0."""
    p = np.asarray(probabilities, dtype=np.float32)
    return np.where((p[..., 1] + p[..., 2]) >= 0.5, p[..., 2], np.float32(0.0)).astype(np.float32, copy=False)


def patch_channels(input_channels: int) -> int:
    """Channels of a candidate patch for a U-Net with ``input_channels``: (inputs + lp) × the slices."""
    return (input_channels + 1) * (2 * CONTEXT + 1)


@dataclass(frozen=True)
class Candidates:
    """The components of one series (first axis: the candidates, in label order): patches (n, 2·HALF, 2·HALF,
    channels) float32, scalars (n, 2) float32 (`SCALARS`), voxels, peak probability and the peak's (slice, row,
    column) on the model grid, and the labelled volume (component k + 1 ↔ candidate k; for training labels)."""

    patches: np.ndarray
    scalars: np.ndarray
    voxels: np.ndarray
    peaks: np.ndarray
    centres: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.voxels)


def extract(x: np.ndarray, lp: np.ndarray) -> Candidates:
    """The candidates of one series: ``x`` the U-Net's windowed input (slices, grid, grid, channels), ``lp`` its
    lesion-in-lungs probability (slices, grid, grid). See the module docstring."""
    from scipy import ndimage

    x = np.asarray(x, dtype=np.float32)
    lp = np.asarray(lp, dtype=np.float32)
    if x.shape[:3] != lp.shape:
        raise CandidateError(f"inputs {x.shape} and lesion probabilities {lp.shape} differ in shape")
    labels, n = ndimage.label(lp >= THRESHOLD, structure=np.ones((3, 3, 3), bool))
    channels = patch_channels(x.shape[-1])
    side = 2 * HALF
    patches = np.zeros((n, side, side, channels), np.float32)
    voxels, peaks = np.zeros(n, np.int64), np.zeros(n, np.float32)
    centres = np.zeros((n, 3), np.int64)
    if n:
        volume = np.concatenate([x, lp[..., None]], axis=-1)
        padded = np.pad(volume, ((CONTEXT, CONTEXT), (HALF, HALF), (HALF, HALF), (0, 0)))
        for i, box in enumerate(ndimage.find_objects(labels)):
            inside = labels[box] == i + 1
            values = np.where(inside, lp[box], np.float32(0.0))
            k, a, b = np.unravel_index(int(np.argmax(values)), values.shape)
            k, a, b = k + box[0].start, a + box[1].start, b + box[2].start
            # padded[k : k + 2·CONTEXT + 1] is slices k − CONTEXT … k + CONTEXT of the volume
            patch = padded[k : k + 2 * CONTEXT + 1, a : a + side, b : b + side]
            patches[i] = patch.transpose(1, 2, 0, 3).reshape(side, side, channels)
            voxels[i], peaks[i], centres[i] = int(inside.sum()), float(values.max()), (k, a, b)
    scalars = np.column_stack([np.log1p(voxels), peaks]).astype(np.float32)
    return Candidates(patches, scalars, voxels, peaks, centres, labels)


@dataclass(frozen=True)
class CandidateEvidence:
    """One series' candidates as a candidate model (name, version) scored them (first axis: the candidates)."""

    model: tuple[str, str]
    scores: np.ndarray
    voxels: np.ndarray
    peaks: np.ndarray

    def features(self, names: Sequence[str] = FEATURES) -> np.ndarray:
        """(len(names),) float64: see the module docstring. Raises KeyError on an unknown name."""
        values = {"max_candidate_score": float(np.max(self.scores, initial=0.0)),
                  "log1p_candidates_p50": float(np.log1p(int((self.scores >= SCORE_COUNT).sum())))}
        return np.array([values[n] for n in names], dtype=np.float64)

    def describe(self) -> str:
        """For the SR (ASCII, no patient data)."""
        best = float(np.max(self.scores, initial=0.0))
        return (f"{self.model[0]} {self.model[1]}: {len(self.scores)} lesion candidates, "
                f"{int((self.scores >= SCORE_COUNT).sum())} scoring >= {SCORE_COUNT}, best score {best:.3f}")


def _inputs(channels: int) -> tuple[Any, Any]:
    import keras

    return (keras.Input((2 * HALF, 2 * HALF, channels), name="patch"),
            keras.Input((len(SCALARS),), name="scalars"))


def build_model(channels: int, name: str = "candidates") -> Any:
    """The candidate CNN (untrained): inputs ``patch`` (2·HALF, 2·HALF, channels) and ``scalars`` (2,), output
    the probability that the candidate is a lesion."""
    import keras

    patch, scalars = _inputs(channels)
    h = patch
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Concatenate()([h, scalars])
    h = keras.layers.Dense(32, activation="relu")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="score")(h)
    return keras.Model({"patch": patch, "scalars": scalars}, out, name=name)


def average(members: Sequence[Any], channels: int) -> Any:
    """One model with `build_model`'s inputs whose score is the mean of ``members``' scores (an ensemble saved
    and loaded as one file; the node runs it like a single CNN). One member is returned as it is."""
    import keras

    if len(members) == 1:
        return members[0]
    patch, scalars = _inputs(channels)
    scores = [m({"patch": patch, "scalars": scalars}) for m in members]
    return keras.Model({"patch": patch, "scalars": scalars}, keras.layers.Average(name="score")(scores),
                       name="candidates")


class CandidateModel:
    """A trained candidate CNN loaded by `models.registry` (its ``_LoadedModel``): ``score`` runs the stage."""

    batch_size = 256

    def __init__(self, loaded: Any) -> None:
        import tensorflow as tf

        self._m = loaded
        self.name, self.version, self.card = loaded.name, loaded.version, loaded.card
        seg = loaded.card.get("segmenter") or {}
        self.segmenter = (str(seg.get("name", "")), str(seg.get("version", "")))
        self.grid = loaded.preprocess.grid
        self.channels = patch_channels(loaded.preprocess.channels)
        model = loaded.model
        side = 2 * HALF
        self._fn = tf.function(
            lambda p, s: model({"patch": p, "scalars": s}, training=False), autograph=False,
            input_signature=[tf.TensorSpec((None, side, side, self.channels), tf.float32),
                             tf.TensorSpec((None, len(SCALARS)), tf.float32)],
        )

    def check_segmenter(self, name: str, version: str) -> None:
        """Raises CandidateError unless (name, version) is the segmenter this model was trained over."""
        if (str(name), str(version)) != self.segmenter:
            raise CandidateError(f"candidate model {self.version} was trained on the outputs of "
                                 f"{' '.join(self.segmenter)}, not of {name} {version}")

    def warm(self) -> None:
        side = 2 * HALF
        self._fn(np.zeros((1, side, side, self.channels), np.float32), np.zeros((1, len(SCALARS)), np.float32))

    def scores(self, candidates: Candidates) -> np.ndarray:
        """(n,) float32: each candidate's score."""
        if not len(candidates):
            return np.zeros(0, np.float32)
        if candidates.patches.shape[-1] != self.channels:
            raise CandidateError(f"candidate model {self.version} takes {self.channels}-channel patches, "
                                 f"got {candidates.patches.shape[-1]}")
        from models.registry import InferenceError

        try:
            parts = [np.asarray(self._fn(candidates.patches[a : a + self.batch_size],
                                         candidates.scalars[a : a + self.batch_size])).reshape(-1)
                     for a in range(0, len(candidates), self.batch_size)]
        except Exception as exc:  # TensorFlow errors must not leak past the model boundary
            raise InferenceError(f"candidates {self.version} failed on {len(candidates)} candidates: {exc}") from exc
        return np.concatenate(parts).astype(np.float32)

    def score(self, x: np.ndarray, lp: np.ndarray) -> CandidateEvidence:
        """Extract and score one series' candidates (``x``, ``lp`` as `extract` takes them)."""
        if lp.shape[1:] != (self.grid, self.grid):
            raise CandidateError(f"candidate model {self.version} works on a {self.grid}² grid, got {lp.shape[1:]}")
        found = extract(x, lp)
        return CandidateEvidence((self.name, self.version), self.scores(found), found.voxels, found.peaks)


__all__ = ["CONTEXT", "FEATURES", "HALF", "LABEL_OVERLAP", "SCALARS", "SCORE_COUNT", "THRESHOLD", "CandidateError",
           "CandidateEvidence", "CandidateModel", "Candidates", "average", "build_model", "extract", "lesion_in_lungs",
           "patch_channels"]
