"""Streaming inference, model side: the per-slice part of both models, and the series-level remainder.

`SliceModels(classifier, segmenter)` splits the loaded models without changing a weight:

- per slice (`SliceModels.work`, run while a series is still arriving): decode (`models.preprocess.read_file`),
  resize to each model's grid, window, the U-Net's softmax resampled to lung and lesion masks on the source grid
  and reduced to the slice's lesion evidence (`models.lesion_evidence.slice_evidence`), and the classifier's
  slice encoder — the Keras
  sub-model ``slice_encoder`` of the trained classifier, whose output is (slices, features) before any layer mixes
  slices (``unfold`` → slice head and gated attention pooling);
- per series (`SliceModels.segment` / `.classify`, at completion): the masks stacked in the volume's order (and,
  with a candidate model, the candidate stage over the whole series: `models.candidates` needs 3-D components, so
  each slice keeps its lesion-in-lungs probability on the model grid until then), and
  the classifier's *head* — a Keras model over the trained model's own layers from the
  ``unfold`` output (slice features) plus the clinical input to the outputs, so pooling and fusion are the same
  layers and weights.

Equivalence with `models.registry` (tests/unit/test_prefetch.py): same weights, same layers, but other batch
compositions and graph boundaries than the one-call path, so oneDNN's kernels round differently — the probability
and attention agree within 1e-6 (absolute; a few float32 ulps in practice), the U-Net softmax within 1e-3 of the
batch-of-32 path, so a mask pixel can only differ where the probability lies within that of the 0.5 threshold (on
the test phantoms the SEG frames are identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.candidates import CandidateModel, lesion_in_lungs
from models.clinical import ClinicalInputs
from models.lesion_evidence import LesionEvidence, SliceEvidence, map_evidence
from models.preprocess import (
    PreprocessError,
    Volume,
    _Slice,
    masks_to_source,
    read_file,
    resize_slices,
    window,
)
from models.registry import Classifier, ClassifierOutput, InferenceError, Segmenter, SegmenterOutput

ENCODER_LAYER = "slice_encoder"  # the classifier's per-slice CNN (models.classifier.build_slice_encoder)
CHUNK = 16  # files per model call (SliceModels.work)
UNFOLD_LAYER = "unfold"  # (B*S, F) → (B, S, F): the first layer after which slices are pooled together


@dataclass(frozen=True)
class FileWork:
    """One source file's per-slice results, its slices in `read_file` order: header (pixels dropped), decoded
    slices (HU), the classifier's slice features (n, F), the U-Net's lung and lesion masks on the source grid
    (n, rows, cols; as `Segmenter.predict` makes them), each model grid's resized HU (n, grid, grid) keyed by
    grid size, the U-Net's lesion evidence per slice (`models.lesion_evidence.SliceEvidence`) and, when a candidate
    model runs at completion, the lesion-in-lungs probability (n, grid, grid) (`models.candidates.lesion_in_lungs`)."""

    header: Any
    slices: list[_Slice]
    features: np.ndarray
    lungs: np.ndarray
    lesion: np.ndarray
    grids: dict[int, np.ndarray]
    evidence: SliceEvidence
    lesion_map: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(sum(s.pixels.nbytes for s in self.slices) + self.features.nbytes + self.lungs.nbytes
                   + self.lesion.nbytes + sum(g.nbytes for g in self.grids.values()) + self.evidence.nbytes
                   + (self.lesion_map.nbytes if self.lesion_map is not None else 0))


class SliceModels:
    """The per-slice and per-series halves of a loaded classifier + U-Net pair (see the module docstring)."""

    def __init__(self, classifier: Classifier, segmenter: Segmenter, candidates: CandidateModel | None = None) -> None:
        import keras
        import tensorflow as tf

        self.classifier, self.segmenter, self.candidates = classifier, segmenter, candidates
        model = classifier._m.model
        encoder = model.get_layer(ENCODER_LAYER)
        others = [t for t in model.inputs if t.name != "slices"]
        if [t.name for t in others] != ["clinical"]:
            raise InferenceError(f"the classifier's inputs {[t.name for t in model.inputs]} have no streaming split")
        head = keras.Model([model.get_layer(UNFOLD_LAYER).output, *others], model.output)
        self.cls_grid, self.seg_grid = classifier.preprocess.grid, segmenter.preprocess.grid
        g, c = self.cls_grid, classifier.preprocess.channels
        self._encode = tf.function(lambda s: encoder(s, training=False), autograph=False,
                                   input_signature=[tf.TensorSpec((None, g, g, c), tf.float32)])
        features, clinical = head.inputs[0].shape[-1], head.inputs[1].shape[-1]
        self._head = tf.function(lambda f, k: head([f, k], training=False), autograph=False,
                                 input_signature=[tf.TensorSpec((1, None, features), tf.float32),
                                                  tf.TensorSpec((1, clinical), tf.float32)])
        self._features = int(features)

    def warm(self) -> None:
        """Trace the per-slice graphs and the head on blank inputs, so the first series does not pay for it."""
        g, c = self.cls_grid, self.classifier.preprocess.channels
        self._encode(np.zeros((CHUNK, g, g, c), np.float32))
        self.segmenter.warm(CHUNK)
        if self.candidates is not None:
            self.candidates.warm()
        self._head(np.zeros((1, 2, self._features), np.float32),
                   self.classifier.fusion_input()[1].astype(np.float32))

    def work(self, files: Sequence[tuple[Any, list[_Slice]]]) -> list[FileWork]:
        """Per-slice results for decoded files (``read_file`` output), in model calls of at most `CHUNK` files:
        one call over a whole series' missing slices takes ~1.3× as long (oneDNN sets up kernels for every new
        batch shape, and large batches leave the caches), so calls keep to a few shapes that stay warm."""
        out: list[FileWork | None] = [None] * len(files)
        by_shape: dict[tuple[int, ...], list[int]] = {}  # a call stacks its slices: one matrix size per call
        for i, (_, slices) in enumerate(files):
            by_shape.setdefault(slices[0].pixels.shape, []).append(i)
        for group in by_shape.values():
            for a in range(0, len(group), CHUNK):
                part = group[a : a + CHUNK]
                for i, fw in zip(part, self._work([files[i] for i in part]), strict=True):
                    out[i] = fw
        return cast(list[FileWork], out)

    def _work(self, files: Sequence[tuple[Any, list[_Slice]]]) -> list[FileWork]:
        pixels = np.stack([s.pixels for _, slices in files for s in slices]).astype(np.float32, copy=False)
        from models.preprocess import HU_MAX, HU_MIN

        pixels = np.clip(pixels, HU_MIN, HU_MAX)  # as load_series does before any model sees the slices
        grids = {g: resize_slices(pixels, g) for g in {self.cls_grid, self.seg_grid}}
        try:
            features = np.asarray(self._encode(window(grids[self.cls_grid], self.classifier.preprocess)))
            probs = np.asarray(self.segmenter._fn(window(grids[self.seg_grid], self.segmenter.preprocess)))
        except Exception as exc:  # TensorFlow errors must not leak past the model boundary
            raise InferenceError(f"per-slice inference failed on {len(pixels)} slices: {exc}") from exc
        shape = pixels.shape[1:]  # one size per call (`work`); load_series refuses a series of several
        lungs = masks_to_source(probs[..., 1] + probs[..., 2], shape)
        lesion = masks_to_source(probs[..., 2], shape) & lungs
        lesion_map = lesion_in_lungs(probs)
        evidence = map_evidence(lesion_map)
        lp = lesion_map if self.candidates is not None else None  # kept for the candidate stage at completion
        out, a = [], 0
        for header, slices in files:
            b = a + len(slices)
            out.append(FileWork(header, slices, features[a:b], lungs[a:b], lesion[a:b],
                                {g: v[a:b] for g, v in grids.items()}, evidence.take(slice(a, b)),
                                lp[a:b] if lp is not None else None))
            a = b
        return out

    def read(self, paths: Sequence[str | Path]) -> list[FileWork]:
        """Decode ``paths`` and compute their per-slice results. Raises PreprocessError / InferenceError."""
        return self.work([read_file(i, p) for i, p in enumerate(paths)])

    # -- per series ------------------------------------------------------------------------------------------
    @staticmethod
    def _at(volume: Volume, work: Sequence[FileWork]) -> list[tuple[FileWork, int]]:
        """(file's results, index in it) of every slice of ``volume`` in the volume's order (matched by SOP UID
        and frame). Raises PreprocessError when a slice has none."""
        at: dict[tuple[str, int | None], tuple[FileWork, int]] = {}
        for fw in work:
            for j, s in enumerate(fw.slices):
                at[(s.sop_uid, s.frame)] = (fw, j)
        rows = []
        for key in zip(volume.sop_instance_uids, volume.frame_numbers, strict=True):
            if key not in at:
                raise PreprocessError("a slice of the volume has no per-slice result")
            rows.append(at[key])
        return rows

    @classmethod
    def _in_volume_order(cls, volume: Volume, work: Sequence[FileWork], attr: str, grid: int | None = None) -> np.ndarray:
        """``attr`` of every slice of ``volume`` stacked in the volume's order."""
        return np.stack([(fw.grids[grid] if grid is not None else getattr(fw, attr))[j] for fw, j in cls._at(volume, work)])

    def attach(self, volume: Volume, work: Sequence[FileWork]) -> None:
        """Put the resized slices on ``volume`` (`models.preprocess.volume_grid`'s cache), so no stage resizes."""
        for g in {self.cls_grid, self.seg_grid}:
            volume._cache[("grid", g)] = self._in_volume_order(volume, work, "grids", g)

    def segment(self, volume: Volume, work: Sequence[FileWork]) -> SegmenterOutput:
        """Lung and lesion masks on the source grid and the lesion evidence, as `Segmenter.predict` makes them
        (per slice, already; the candidate stage over the series)."""
        lungs, lesion = (self._in_volume_order(volume, work, k) for k in ("lungs", "lesion"))
        if lungs.shape != volume.hu.shape:
            raise InferenceError(f"per-slice masks {lungs.shape} do not match the volume {volume.hu.shape}")
        scored = None
        if self.candidates is not None:
            if any(fw.lesion_map is None for fw in work):
                raise InferenceError("per-slice work without the lesion map the candidate stage needs")
            x = window(self._in_volume_order(volume, work, "grids", self.seg_grid), self.segmenter.preprocess)
            scored = self.segmenter.candidate_evidence(self.candidates, x,
                                                       self._in_volume_order(volume, work, "lesion_map"))
        evidence = LesionEvidence(SliceEvidence.stack([(fw.evidence, j) for fw, j in self._at(volume, work)]),
                                  (self.segmenter.name, self.segmenter.version), self.seg_grid, scored,
                                  slice_spacing_mm=volume.spacing[0])
        return SegmenterOutput(lungs=lungs, lesion=lesion, evidence=evidence)

    def classify(self, volume: Volume, work: Sequence[FileWork], *, clinical: ClinicalInputs | None = None,
                 lesion: LesionEvidence | None = None) -> ClassifierOutput:
        """The classifier's head over the slice features: attention pooling, fusion with the same clinical
        encoding, the same calibration and the same lesion fusion as `Classifier.predict`."""
        features = self._in_volume_order(volume, work, "features")[None]
        given, clin = self.classifier.fusion_input(clinical)
        try:
            out = self._head(features.astype(np.float32, copy=False), clin.astype(np.float32, copy=False))
            raw = float(np.asarray(out["probability"]).reshape(-1)[0])
            att = np.asarray(out["attention"], dtype=np.float32).reshape(-1)
        except Exception as exc:  # TensorFlow errors must not leak past the model boundary
            raise InferenceError(f"classifier head failed on {features.shape}: {exc}") from exc
        return self.classifier.output(raw, att, given, volume.shape[0], lesion)


def reindexed(fw: FileWork, index: int) -> tuple[Any, list[_Slice]]:
    """``fw``'s header and slices as `models.preprocess.read_file(index, …)` would return them."""
    return fw.header, [replace(s, ds_index=index) for s in fw.slices]
