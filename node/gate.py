"""The validity gate: refuse, with a coded reason, series the models cannot judge — before any pixel is read.

`check_series(instances, settings)` returns None when the series may go to inference, else a `GateRefusal`
naming the `SkipReason` and a one-line detail. Pixel decodability is the last check and happens when the worker
loads the series (a `PreprocessError` there is also a refusal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.config import GateSection
from node.results import SkipReason
from node.stack import analyse_stack


@dataclass(frozen=True)
class GateRefusal:
    reason: SkipReason
    detail: str


def check_series(instances: Sequence[Any], settings: GateSection) -> GateRefusal | None:
    """Check modality, frame of reference, orientation, spacing and slice count from index rows."""
    modalities = sorted({str(r.modality or "?") for r in instances})
    if not instances or any(m not in settings.modalities for m in modalities):
        return GateRefusal(SkipReason.NOT_CT, f"modality {'/'.join(modalities) or 'none'}; the models judge "
                                              f"{'/'.join(settings.modalities)} only")
    if any((r.number_of_frames or 1) > 1 for r in instances):
        return GateRefusal(SkipReason.MULTI_FRAME, "multi-frame (enhanced) images are not supported yet")
    stack = analyse_stack(instances)
    if stack.frames_of_reference > 1:
        return GateRefusal(SkipReason.MULTIPLE_FRAMES_OF_REFERENCE,
                           f"{stack.frames_of_reference} frames of reference in one series")
    if stack.orientations > 1:
        return GateRefusal(SkipReason.MIXED_ORIENTATION, f"{stack.orientations} image orientations in one series")
    if stack.count < settings.min_slices:
        return GateRefusal(SkipReason.TOO_FEW_SLICES, f"{stack.count} slices; at least {settings.min_slices} needed")
    if stack.missing_geometry:
        return GateRefusal(SkipReason.UNEVEN_SPACING,
                           f"{stack.missing_geometry} instances lack ImagePositionPatient/ImageOrientationPatient")
    if stack.duplicates:
        return GateRefusal(SkipReason.UNEVEN_SPACING, f"{stack.duplicates} duplicate slice positions")
    if not stack.even(settings.spacing_tolerance_mm):
        return GateRefusal(
            SkipReason.UNEVEN_SPACING,
            f"slice gaps vary by up to {stack.worst_deviation_mm:.2f} mm around {stack.spacing_mm:.2f} mm "
            f"(a missing slice or uneven spacing)",
        )
    return None
