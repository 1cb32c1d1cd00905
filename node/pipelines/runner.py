"""The inference seam: a warm model pair (classifier + U-Net) that pipelines call, loaded once per process.

`ModelRunner` is the abstract seam (tests plug in fakes); `RegistryRunner` loads the shipped TensorFlow models
from `models.registry`, after choosing the device they run on (`models.device.select_device`; its `DeviceChoice` is
the runner's ``device``). Each call takes a `models.preprocess.Volume` and returns plain arrays.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.device import DeviceChoice
from models.preprocess import Volume
from node.results import AlgorithmIdentity


@dataclass(frozen=True)
class Segmentation:
    """Boolean (slices, rows, columns) masks on the volume's grid."""

    lungs: np.ndarray
    lesion: np.ndarray


@dataclass(frozen=True)
class Classification:
    """Pneumonia probability and decision threshold in [0, 1], one attention weight per slice."""

    probability: float
    threshold: float
    attention: np.ndarray


class ModelRunner(ABC):
    """Warm models. ``algorithm`` names the classifier + U-Net pair, ``segmenter_version`` the U-Net alone,
    ``device`` what they run on (None: not known, e.g. a fake)."""

    algorithm: AlgorithmIdentity
    segmenter_version: str = "unknown"
    device: DeviceChoice | None = None

    @abstractmethod
    def segment(self, volume: Volume) -> Segmentation: ...

    @abstractmethod
    def classify(self, volume: Volume) -> Classification: ...


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
        self.segmenter = registry.segmenter(segmenter_version)
        self.segmenter_version = self.segmenter.version
        self.algorithm = AlgorithmIdentity(
            name="pacs-ai-node pneumonia CT",
            version=f"cls-{self.classifier.version}+seg-{self.segmenter.version}",
        )

    def segment(self, volume: Volume) -> Segmentation:
        seg = self.segmenter.predict(volume)
        return Segmentation(lungs=seg.lungs, lesion=seg.lesion)

    def classify(self, volume: Volume) -> Classification:
        cls = self.classifier.predict(volume, age=volume.patient_age, sex=volume.patient_sex)
        return Classification(float(cls.probability), float(cls.threshold), np.asarray(cls.attention))
