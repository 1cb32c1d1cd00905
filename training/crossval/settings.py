"""The settings of a cross-validation run and of the final model, each one frozen object, and the classifier
settings they imply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from training.train import ClassifierSettings

REPORT_DIR = Path("reports") / "crossval"
BOOTSTRAP = 1000
VAL_FRACTION = 0.1


def classifier_settings(
    *,
    seed: int = 0,
    quick: bool = False,
    epochs: int | None = None,
    warmup_steps: int | None = None,
    max_slices: int | None = None,
    slice_labels: bool = True,
    class_weighting: bool = True,
) -> ClassifierSettings:
    """The trainer's default settings; ``quick`` shrinks everything for tests; ``epochs``, ``warmup_steps`` (slice
    warm-up steps) and ``max_slices`` (slices per series per step) set the training budget; without slice labels
    (no lesion masks) the slice warm-up and the slice loss are off, so the series label alone supervises."""
    s = ClassifierSettings(seed=seed)
    if quick:
        s = replace(s, grid=32, epochs=2, max_slices=8, pretrain_steps=4, pretrain_batch=8, widths=(8, 16),
                    features=16)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        s = replace(s, epochs=epochs)
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warm-up steps must be >= 0, got {warmup_steps}")
        s = replace(s, pretrain_steps=warmup_steps)
    if max_slices is not None:
        if max_slices < 1:
            raise ValueError(f"max slices must be >= 1, got {max_slices}")
        s = replace(s, max_slices=max_slices)
    if not slice_labels:
        s = replace(s, pretrain_steps=0, slice_loss_weight=0.0)
    return replace(s, class_weighting=class_weighting)


def settings_dict(s: ClassifierSettings) -> dict[str, Any]:
    """The classifier settings as JSON-ready values (``widths`` a list)."""
    d = asdict(s)
    d["widths"] = list(s.widths)
    return d


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What both subcommands share: the data, the seed, the training budget, the inner validation, the cache.

    Paths keep the type they were given (``run.json`` records them as given).
    """

    data: str | Path
    labels: str | Path | None = None
    seed: int = 0
    quick: bool = False
    epochs: int | None = None
    warmup_steps: int | None = None
    max_slices: int | None = None
    val_fraction: float = VAL_FRACTION
    cache_dir: str | Path | None = None
    allow_unlabelled: bool = False
    progress: bool = True
    class_weighting: bool = True  # the series loss weighted by inverse class frequency (--no-class-weights: off)

    def classifier(self, *, slice_labels: bool) -> ClassifierSettings:
        """The classifier settings for this run (see :func:`classifier_settings`). Raises ValueError."""
        return classifier_settings(seed=self.seed, quick=self.quick, epochs=self.epochs,
                                   warmup_steps=self.warmup_steps, max_slices=self.max_slices,
                                   slice_labels=slice_labels, class_weighting=self.class_weighting)

    def cache(self, default: Path) -> Path:
        """The preprocessed-array cache folder: ``cache_dir`` or ``default``."""
        return Path(self.cache_dir) if self.cache_dir else default


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings(RunSettings):
    """A cross-validation run (``evaluate``): the folds, the report folder, the bootstrap and how folds are shared.

    ``resume`` reuses finished folds in ``out``; ``only_folds`` trains just those folds and writes no report;
    ``weights_dir`` holds the segmenter for the lesion-evidence arm and the example overlays, ``segmenter_version``
    picks one of its versions (default: its default, the newest released); ``command`` is recorded in ``run.json``
    (default: the equivalent command line).
    """

    folds: int = 10
    out: str | Path = REPORT_DIR
    bootstrap: int = BOOTSTRAP
    resume: bool = True
    only_folds: Sequence[int] | None = None
    weights_dir: str | Path | None = None
    segmenter_version: str | None = None
    command: str | None = None
    ablation: bool = True  # also train the image-only arm on the same folds (--no-ablation: skip)
    prevalence: float = 0.10  # the target prevalence of the imbalance section
    lesion_evidence: bool = True  # the classifier + segmenter late-fusion arm (--no-lesion-evidence: skip)

    def command_line(self) -> str:
        """``command``, else the ``evaluate`` command line that repeats this run."""
        if self.command:
            return self.command
        return (f"evaluate --data {self.data} --folds {self.folds} --out {Path(self.out)} --seed {self.seed}"
                + (f" --labels {self.labels}" if self.labels else "") + (" --quick" if self.quick else "")
                + (f" --epochs {self.epochs}" if self.epochs else "")
                + (f" --warmup-steps {self.warmup_steps}" if self.warmup_steps is not None else "")
                + (f" --max-slices {self.max_slices}" if self.max_slices is not None else "")
                + (f" --val-fraction {self.val_fraction}" if self.val_fraction != VAL_FRACTION else "")
                + ("" if self.class_weighting else " --no-class-weights") + ("" if self.ablation else " --no-ablation")
                + ("" if self.lesion_evidence else " --no-lesion-evidence")
                + (f" --segmenter-version {self.segmenter_version}" if self.segmenter_version else "")
                + (f" --prevalence {self.prevalence}" if self.prevalence != 0.10 else ""))


@dataclass(frozen=True, kw_only=True)
class FinalSettings(RunSettings):
    """The model to ship (``train-final``): its folder, the version for its card, the CV metrics to record."""

    out: str | Path
    version: str = "0.0.0-dev"
    cv_metrics: str | Path | None = None
