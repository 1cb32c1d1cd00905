"""The inference seam: a warm model pair (classifier + U-Net) that pipelines call, loaded once per process.

`ModelRunner` is the abstract seam (tests plug in fakes); `RegistryRunner` loads the shipped TensorFlow models
from `models.registry`, after choosing the device they run on (`models.device.select_device`; its `DeviceChoice` is
the runner's ``device``). Each call takes a `models.preprocess.Volume` and returns plain arrays. The classifier's
clinical inputs come from the series' header (`models.clinical.from_header`: age, sex, symptoms named in the
request text); `model_notes` says for the SR which were fused, which were missing, the calibration and the
operating point. A lesion-fusing classifier version (`models.lesion_evidence`) also fuses the segmenter's lesion
evidence, which pipelines pass from `segment` to `classify`; `RegistryRunner` refuses to pair it with any other
segmenter version than the one its coefficients were fitted with, and loads the candidate model whose scores a v3
fusion takes (`models.candidates`: run by `segment`, over the whole series).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.device import DeviceChoice
from models.preprocess import Volume
from node.results import AlgorithmIdentity, ModelNotes

if TYPE_CHECKING:
    from models.lesion_evidence import LesionEvidence
    from models.registry import ClassifierOutput


@dataclass(frozen=True)
class Segmentation:
    """Boolean (slices, rows, columns) masks on the volume's grid, and the segmenter's lesion evidence (None from
    a runner without the shipped segmenter, e.g. a test fake)."""

    lungs: np.ndarray
    lesion: np.ndarray
    evidence: LesionEvidence | None = None


@dataclass(frozen=True)
class Classification:
    """Pneumonia probability and decision threshold in [0, 1], one attention weight per slice, and (optional)
    what the SR should say about the clinical inputs, calibration and operating point."""

    probability: float
    threshold: float
    attention: np.ndarray
    notes: ModelNotes | None = None


class ModelRunner(ABC):
    """Warm models. ``algorithm`` names the classifier + U-Net pair, ``segmenter_version`` the U-Net alone,
    ``device`` what they run on (None: not known, e.g. a fake), ``min_matrix`` the smallest in-plane matrix the
    classifier's card says it was validated on (0: no limit stated, e.g. a fake)."""

    algorithm: AlgorithmIdentity
    segmenter_version: str = "unknown"
    device: DeviceChoice | None = None
    min_matrix: int = 0

    @abstractmethod
    def segment(self, volume: Volume) -> Segmentation: ...

    @abstractmethod
    def classify(self, volume: Volume, lesion: LesionEvidence | None = None) -> Classification:
        """``lesion``: the series' `Segmentation.evidence`, fused by lesion-fusing classifier versions."""


class RegistryRunner(ModelRunner):
    """The shipped TensorFlow classifier + U-Net from `models.registry`, loaded once per process."""

    def __init__(self, classifier_version: str | None = None, segmenter_version: str | None = None,
                 weights_dir: Path | None = None, *, device: str = "auto", gpu_index: int | None = None,
                 mixed_precision: bool = False) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banners are not operator logs
        from models.device import select_device
        from models.registry import Registry

        self.device = select_device(device, gpu_index, mixed_precision)  # before TensorFlow starts its runtime
        registry = Registry(weights_dir, mixed_precision=self.device.mixed_precision)
        self.classifier = registry.classifier(classifier_version)
        self.segmenter = registry.segmenter_for(self.classifier, segmenter_version)  # a fusing one: its own
        self.segmenter_version = self.segmenter.version
        self.min_matrix = self.classifier.min_matrix
        self.candidates = registry.candidates_for(self.classifier)  # None unless the fusion takes their scores
        if self.classifier.fusion is not None:
            from models.lesion_evidence import LesionFusionError
            from models.registry import RegistryError

            try:
                self.classifier.fusion.check_segmenter(self.segmenter.name, self.segmenter.version)
            except LesionFusionError as exc:
                raise RegistryError(f"classifier {self.classifier.version}: {exc} "
                                    "(worker.segmenter_version must name that one)") from exc
            if self.candidates is not None:
                from models.candidates import CandidateError

                try:
                    self.candidates.check_segmenter(self.segmenter.name, self.segmenter.version)
                except CandidateError as exc:
                    raise RegistryError(f"classifier {self.classifier.version}: {exc}") from exc
        self.classifier.warm()  # TensorFlow traces each graph on its first call: do it now, not on a series
        self.segmenter.warm()
        if self.candidates is not None:
            self.candidates.warm()
        stage = f"+cand-{self.candidates.version}" if self.candidates is not None else ""
        self.algorithm = AlgorithmIdentity(
            name="pacs-ai-node pneumonia CT",
            version=f"cls-{self.classifier.version}+seg-{self.segmenter.version}{stage}",
        )

    def segment(self, volume: Volume) -> Segmentation:
        seg = self.segmenter.predict(volume, self.candidates)
        return Segmentation(lungs=seg.lungs, lesion=seg.lesion, evidence=seg.evidence)

    def classify(self, volume: Volume, lesion: LesionEvidence | None = None) -> Classification:
        cls = self.classifier.predict(volume, clinical=clinical_of(volume), lesion=lesion)
        return classification(cls, self.classifier.card)


def clinical_of(volume: Volume) -> Any:
    """The clinical inputs the series' header offers (`models.clinical.from_header`)."""
    from models.clinical import from_header

    header = volume.datasets[0] if volume.datasets else None
    return from_header(header, age=volume.patient_age, sex=volume.patient_sex)


def classification(cls: ClassifierOutput, card: dict[str, Any]) -> Classification:
    """A classifier output as the pipeline's `Classification`, with the SR's notes on it."""
    return Classification(float(cls.probability), float(cls.threshold), np.asarray(cls.attention),
                          notes=model_notes(cls, card))


_SOURCES = {"age": "DICOM header", "sex": "DICOM header"}


def _pooling(out: ClassifierOutput) -> str:
    """How the fusion read a thin-slice series' evidence (`models.lesion_evidence` pooling), or "" (every slice)."""
    if out.lesion is None or out.fusion is None or (step := out.lesion.step(out.fusion.pool_spacing_mm)) == 1:
        return ""
    spacing = out.lesion.slice_spacing_mm
    assert spacing is not None  # a step above 1 needs a known spacing
    return (f"; fused as the mean of {step} interleaved series of one slice in {step} ({step * spacing:.1f} mm "
            f"apart, the spacing the fusion was fitted at)")


def model_notes(out: ClassifierOutput, card: dict[str, Any]) -> ModelNotes:
    """The SR's account of one classification: each clinical input the version reads, present (with its value and
    source) or missing; the calibration; the operating point (threshold and the rule that chose it)."""
    clinical = out.clinical
    fused = tuple(
        (name, f"{clinical.describe(name)} (from {_SOURCES.get(name, 'request text in the DICOM header')})")
        for name in out.clinical_used if clinical is not None and clinical.value(name) is not None
    )
    missing = tuple(n for n in out.clinical_used if clinical is None or clinical.value(n) is None)
    evidence: tuple[tuple[str, str], ...] = ()
    if out.fusion is not None and out.lesion is not None and out.classifier_probability is not None:
        evidence = (("image classifier", f"probability {out.classifier_probability:.3f} (calibrated, before the "
                     "lesion fusion)"),
                    ("segmenter lesion evidence", out.lesion.describe() + _pooling(out)))
    version = f"{card.get('name', 'classifier')} {card.get('version', '')}".strip()
    cal = out.calibration or {}
    subject = "The image classifier's probability" if out.fusion is not None else "The probability"
    if cal.get("method") == "temperature":
        calibration = (f"{subject} is calibrated: temperature scaling (T = {float(cal['temperature']):.3f}) "
                       f"fitted on {cal.get('fitted_on', 'the validation split')}; uncalibrated output "
                       f"{out.raw_probability:.3f}.")
    else:
        calibration = f"{subject} is the model's uncalibrated output ({version} has no calibration)."
    if out.fusion is not None:
        calibration += (" The reported probability is the lesion fusion's logistic regression, itself fitted as a "
                        f"probability on {out.fusion.fitted_on or 'a validation set'}.")
    metrics = card.get("metrics") or {}
    # A lesion-fusing version's validation metrics are in-sample (its fusion was fitted there): quote its test.
    which = "test" if out.fusion is not None and metrics.get("test") else "validation"
    val = metrics.get(which) or {}
    perf = ""
    if isinstance(val.get("sensitivity"), float) and isinstance(val.get("specificity"), float):
        perf = f"; {which} sensitivity {100 * val['sensitivity']:.0f} %, specificity {100 * val['specificity']:.0f} %"
    fusion = ""
    if out.fusion is not None:
        fusion = (f"The probability fuses the image classifier's with the lesion evidence of {out.fusion.segmenter[0]} "
                  f"{out.fusion.segmenter[1]}. ")
    operating = (f"{fusion}Pneumonia reported when the probability is at or above {out.threshold:.3f} "
                 f"({card.get('threshold_rule', 'Youden J on the validation set')}){perf}.")
    return ModelNotes(fusion_inputs=fused, missing_inputs=missing, calibration=calibration, operating_point=operating,
                      fused_evidence=evidence)
