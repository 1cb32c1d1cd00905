"""Slice-stack geometry from index rows: is a series an evenly spaced stack, and if not, why not.

`analyse_stack(rows)` reads only the indexed ImagePositionPatient / ImageOrientationPatient /
FrameOfReferenceUID strings (no file access) and returns a `Stack` describing orientation consistency, frames of
reference, duplicate positions and spacing. Completion uses it to decide early; the validity gate to refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stack:
    count: int
    frames_of_reference: int
    orientations: int  # distinct orientations (0 when none is known)
    missing_geometry: int  # instances without position or orientation
    duplicates: int  # slices sharing a position along the normal
    spacing_mm: float | None  # median gap
    worst_deviation_mm: float | None  # largest |gap - median|
    tilt_degrees: float = 0.0  # angle between the slice normal and the line the slice origins lie on (gantry tilt)

    def even(self, tolerance_mm: float) -> bool:
        """One orientation, full geometry, no duplicates, every gap within ``tolerance_mm`` of the median."""
        return (
            self.count >= 2
            and self.orientations == 1
            and self.missing_geometry == 0
            and self.duplicates == 0
            and self.worst_deviation_mm is not None
            and self.worst_deviation_mm <= tolerance_mm
        )


def _floats(text: str | None, n: int) -> np.ndarray | None:
    if not text:
        return None
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=float)
    except ValueError:
        return None
    return values if values.shape == (n,) and np.all(np.isfinite(values)) else None


def analyse_stack(rows: Sequence[Any]) -> Stack:
    """Describe the stack formed by ``rows`` (objects with image_position, image_orientation,
    frame_of_reference_uid attributes, e.g. index rows)."""
    positions = []
    orientations: list[np.ndarray] = []
    missing = 0
    for row in rows:
        pos = _floats(row.image_position, 3)
        ori = _floats(row.image_orientation, 6)
        if pos is None or ori is None:
            missing += 1
            continue
        positions.append(pos)
        if not any(np.allclose(ori, o, atol=1e-3) for o in orientations):
            orientations.append(ori)
    frames = {row.frame_of_reference_uid for row in rows if row.frame_of_reference_uid}
    base = dict(count=len(rows), frames_of_reference=len(frames), orientations=len(orientations),
                missing_geometry=missing)
    if len(orientations) != 1 or len(positions) < 2:
        return Stack(**base, duplicates=0, spacing_mm=None, worst_deviation_mm=None)
    ori = orientations[0]
    normal = np.cross(ori[:3], ori[3:])
    along = np.sort(np.array(positions) @ normal)
    gaps = np.diff(along)
    duplicates = int(np.count_nonzero(gaps < 1e-3))
    real = gaps[gaps >= 1e-3]
    if len(real) == 0:
        return Stack(**base, duplicates=duplicates, spacing_mm=None, worst_deviation_mm=None)
    median = float(np.median(real))
    worst = float(np.max(np.abs(real - median)))
    return Stack(**base, duplicates=duplicates, spacing_mm=median, worst_deviation_mm=worst,
                 tilt_degrees=_tilt_degrees(np.array(positions), normal))


def _tilt_degrees(positions: np.ndarray, normal: np.ndarray) -> float:
    """How far the slice origins drift in-plane per mm along the normal, as an angle: 0 for an orthogonal stack,
    the gantry tilt for a tilted acquisition whose images were not resampled."""
    order = np.argsort(positions @ normal)
    first, last = positions[order[0]], positions[order[-1]]
    step = last - first
    along = float(step @ normal)
    if abs(along) < 1e-6:
        return 0.0
    in_plane = float(np.linalg.norm(step - along * normal))
    return float(np.degrees(np.arctan2(in_plane, abs(along))))
