"""Source-grid geometry for results: voxel size from the source headers and lesion outlines from masks.

Outlines follow pixel edges in DICOM image coordinates ((column, row), the top-left corner of the top-left pixel
is (0, 0)), so the polygon encloses exactly the pixels of the region and its area is exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from node.results.errors import ResultsError


@dataclass(frozen=True)
class VoxelSize:
    """Voxel edge lengths in mm: between rows, between columns, between slices."""

    row_mm: float
    column_mm: float
    slice_mm: float

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_mm * self.column_mm

    @property
    def volume_ml(self) -> float:
        return self.row_mm * self.column_mm * self.slice_mm / 1000.0


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise ResultsError(f"source instance lacks {keyword}")
    try:
        arr = np.asarray([float(v) for v in (value if count > 1 else [value])], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"source instance has an unreadable {keyword}") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise ResultsError(f"source instance has an invalid {keyword}")
    return arr


def voxel_size(sources: Sequence[Dataset]) -> VoxelSize:
    """Voxel size of a sorted single-frame series: PixelSpacing, and the slice distance from the positions
    projected on the slice normal (one slice: SpacingBetweenSlices, else SliceThickness).

    Raises `ResultsError` if an attribute is missing or the spacing is not positive.
    """
    row_mm, column_mm = _floats(sources[0], "PixelSpacing", 2)
    if len(sources) > 1:
        orientation = _floats(sources[0], "ImageOrientationPatient", 6)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array([_floats(ds, "ImagePositionPatient", 3) @ normal for ds in sources])
        slice_mm = float(np.median(np.abs(np.diff(positions))))
    elif "SpacingBetweenSlices" in sources[0]:
        slice_mm = float(_floats(sources[0], "SpacingBetweenSlices", 1)[0])
    else:
        slice_mm = float(_floats(sources[0], "SliceThickness", 1)[0])
    size = VoxelSize(float(row_mm), float(column_mm), slice_mm)
    if min(size.row_mm, size.column_mm, size.slice_mm) <= 0:
        raise ResultsError(f"source geometry gives a non-positive voxel size {size}")
    return size


def with_slice_thickness(sources: Sequence[Dataset], slice_mm: float) -> list[Dataset]:
    """``sources`` with an empty, absent, unreadable or non-positive SliceThickness (Type 2: empty is valid) given
    ``slice_mm``, the measured slice distance, and an unreadable or non-positive SpacingBetweenSlices dropped, in
    header copies (the inputs are not modified; pixel data is shared). highdicom reads SliceThickness as a number
    for the SEG's pixel measures and the SR's image library: without it the build failed, and the job died after
    three model runs with a "processing failed" report. It copies both into the SEG's Pixel Measures, where zero
    and negative values are invalid (dciodvfy: "Value is zero", "Not permitted to be negative"; some senders write
    a negative SpacingBetweenSlices for a stack in descending order); without SpacingBetweenSlices highdicom
    computes it from the positions."""
    out = []
    for ds in sources:
        thickness_ok = _positive(ds, "SliceThickness")
        spacing_ok = "SpacingBetweenSlices" not in ds or _positive(ds, "SpacingBetweenSlices")
        if thickness_ok and spacing_ok:
            out.append(ds)
            continue
        dropped = {0x00180050, 0x00180088} if not spacing_ok else {0x00180050}
        copy = Dataset()
        for tag in ds.keys():  # noqa: SIM118 - raw elements as read: converting a malformed one would raise
            if tag not in dropped or (tag == 0x00180050 and thickness_ok):
                copy[tag] = ds.get_item(tag)
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        if not thickness_ok:
            copy.SliceThickness = round(float(slice_mm), 6)
        out.append(copy)
    return out


def _positive(ds: Dataset, keyword: str) -> bool:
    """Whether ``ds``'s ``keyword`` reads as one finite number above zero."""
    try:
        value = float(ds.get(keyword))
    except Exception:  # noqa: BLE001 - absent, empty, several values, or bytes that do not decode for the VR
        return False
    return bool(np.isfinite(value) and value > 0)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a 2-D mask with its holes filled (empty if the mask is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1), dtype=bool)


def outline(region: np.ndarray) -> np.ndarray:
    """Closed polyline (first point == last point) along the pixel edges around a filled 4-connected region.

    Returns an (n, 2) float array of (column, row) image coordinates, corners only, clockwise on screen.
    Raises `ResultsError` for an empty region.
    """
    if not region.any():
        raise ResultsError("cannot outline an empty region")
    padded = np.pad(region, 1)
    inside = padded[1:-1, 1:-1]
    nexts: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # Directed boundary edges with the region on their right (y grows downwards), as (x, y) vertices.
    sides = (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),  # top
        (padded[1:-1, 2:], (1, 0), (1, 1)),  # right
        (padded[2:, 1:-1], (1, 1), (0, 1)),  # bottom
        (padded[1:-1, :-2], (0, 1), (0, 0)),  # left
    )
    for neighbour, (ax, ay), (bx, by) in sides:
        for r, c in zip(*np.nonzero(inside & ~neighbour), strict=True):
            nexts[(int(c) + ax, int(r) + ay)].append((int(c) + bx, int(r) + by))
    # Hierholzer: one closed walk over every boundary edge (it touches itself where pixels meet at a corner).
    start = min(nexts, key=lambda v: (v[1], v[0]))
    stack, walk = [start], []
    while stack:
        vertex = stack[-1]
        if nexts[vertex]:
            stack.append(nexts[vertex].pop())
        else:
            walk.append(stack.pop())
    walk.reverse()
    points = np.asarray(walk, dtype=float)
    steps = np.diff(points, axis=0)
    turning = np.any(steps[1:] != steps[:-1], axis=1)
    corners = np.concatenate([[True], turning, [True]])
    return points[corners]


def polygon_area(points: np.ndarray, voxel: VoxelSize) -> float:
    """Area in mm² enclosed by a closed (column, row) polyline, by the shoelace formula."""
    x, y = points[:, 0], points[:, 1]
    pixels = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    return pixels * voxel.pixel_area_mm2
