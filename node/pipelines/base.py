"""The pipeline contract and the scope check the chest pipelines share."""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from models.preprocess import Volume
from node.config import GateSection, PipelineName
from node.gate import MIN_AGE_YEARS, GateRefusal, header_age_years
from node.pipelines.runner import ModelRunner
from node.results import AlgorithmIdentity, Findings, SkipReason, build_results


class Pipeline(ABC):
    """A named model pipeline. `analyse` runs the models and returns `Findings` or a `GateRefusal` (never a
    verdict on a volume outside the model's scope); `build` returns the result objects as (kind, dataset)."""

    name: PipelineName

    @abstractmethod
    def algorithm(self, runner: ModelRunner) -> AlgorithmIdentity:
        """Who made this pipeline's results (result UIDs derive from it, so pipelines never share UIDs)."""

    @abstractmethod
    def analyse(self, volume: Volume, runner: ModelRunner, settings: GateSection) -> Findings | GateRefusal: ...

    def build(
        self,
        sources: Sequence[Dataset],
        findings: Findings,
        algorithm: AlgorithmIdentity,
        *,
        series_version: int,
        superseded: Sequence[Sequence[str]],
        fallback_datetime: dt.datetime,
    ) -> list[tuple[str, Dataset]]:
        """The TID 1500 SR (a verdict when ``findings`` carry a probability, measurements otherwise), the SEG, and
        with a verdict the key-images KOS."""
        built = build_results(sources, findings, algorithm, series_version=series_version, superseded=superseded,
                              fallback_datetime=fallback_datetime)
        objects = [("sr", built.sr)] + ([("seg", built.seg)] if built.seg is not None else [])
        return objects + ([("key-images", built.key_images)] if built.key_images is not None else [])


def matrix_refusal(volume: Volume, min_matrix: int, settings: GateSection) -> GateRefusal | None:
    """A refusal (with the scope check on) when the in-plane matrix is below ``min_matrix``, the smallest the
    classifier was validated on (`ModelRunner.min_matrix`), else None. Checked before any model runs: the shipped
    classifier 2.4.0 called normal chest phantoms pneumonia 18 of 60 times at 128 px, 7 of 40 at 192 px, 2 of 60 at
    256 px (its card's ``validated_acquisition``: 256, the smallest its fusion was fitted and tested on)."""
    side = max(volume.shape[1:])
    if not settings.scope_check or side >= min_matrix:
        return None
    return GateRefusal(SkipReason.OUT_OF_SCOPE, f"outside the model's scope: a {volume.shape[1]} x {volume.shape[2]} "
                                                f"matrix, below the {min_matrix} the models were validated on")


def scope_notes(volume: Volume, min_matrix: int, settings: GateSection) -> tuple[str, ...]:
    """The SR's account of a verdict's scope (its AI-SCOPE items): what the models were validated on, what the node
    checked on this series before giving the verdict, and — so that a reader sees the gap — what it did not or could
    not check: contrast is read from the header only, a check switched off in ``[gate]``, an age the header lacks."""
    matrix = f"an in-plane matrix of at least {min_matrix} px" if min_matrix else "no smallest matrix stated"
    lines = [f"Validated scope: adults ({MIN_AGE_YEARS:g} years or older), non-contrast axial chest CT, single-frame ORIGINAL slices, "
             f"{matrix}; the models were trained and tested on synthetic phantoms only."]
    checked = (f"Checked on this series before the verdict: modality, image type (no MIP, MinIP, average or "
               f"localizer), axial supine slices of one study and frame of reference, evenly spaced and untilted (at "
               f"least {settings.min_slices}), patient age where the header gives it")
    if settings.scope_check:
        matrix_check = f", the {min_matrix} px matrix" if min_matrix else ""
        lines.append(f"{checked}{matrix_check}, and from the image a whole chest cross-section with both lungs, in "
                     "Hounsfield units.")
    else:
        lines.append(f"{checked}. Not checked ([gate] scope_check = false in this node's configuration): whether "
                     "the image is a chest CT in Hounsfield units the models can judge, and the validated matrix.")
    if settings.refuse_contrast and settings.scope_check:
        from models.scope import ENHANCED_HU, ScopeSettings  # scipy: not on a listener's import path

        lines.append("Contrast: checked in the header (Contrast/Bolus Agent empty or none) and in the image (at "
                     f"most {ScopeSettings().max_enhanced_ml:.0f} mL between the lungs at {ENHANCED_HU[0]:.0f} HU or "
                     "more, away from bone); a late or faint enhancement, blood under that, cannot be recognised.")
    elif settings.refuse_contrast:
        lines.append("Contrast: checked in the header only (Contrast/Bolus Agent empty or none; the image check "
                     "needs [gate] scope_check); contrast that was given but not recorded there cannot be recognised.")
    else:
        lines.append("Contrast: not checked ([gate] refuse_contrast = false in this node's configuration); the "
                     "models were trained on non-contrast CT only.")
    header = volume.datasets[0] if volume.datasets else None
    if header is None or header_age_years(header) is None:
        lines.append("Patient age: not in the header (PatientAge, or PatientBirthDate with a study, series or image "
                     "date), so whether the patient is an adult was not checked.")
    return tuple(lines)


def chest_scope_refusal(volume: Volume, lungs: np.ndarray, settings: GateSection) -> GateRefusal | None:
    """A refusal when the image is not a chest CT the models can judge (`models.scope`), else None."""
    if not settings.scope_check:
        return None
    from models.scope import assess_chest_scope, contrast_problem

    verdict = assess_chest_scope(volume, lungs)
    reason = verdict.reason if not verdict.in_scope else (
        contrast_problem(verdict.measures) if settings.refuse_contrast else None)
    if reason is None:
        return None
    return GateRefusal(SkipReason.OUT_OF_SCOPE, f"outside the model's scope: {reason}"[:200])
