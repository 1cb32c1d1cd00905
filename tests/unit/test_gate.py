"""Validity gate: each refusal reason from index rows alone, and a clean series passing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node.config import GateSection
from node.gate import check_series
from node.results import SkipReason

SETTINGS = GateSection(min_slices=16, spacing_tolerance_mm=0.05)


def rows(n=20, spacing=2.5, skip=(), modality="CT", orientation="1\\0\\0\\0\\1\\0", for_uid="1.9", **over):
    out = []
    for i in range(n):
        if i in skip:
            continue
        out.append(SimpleNamespace(
            modality=modality, image_position=f"-10\\-10\\{i * spacing}", image_orientation=orientation,
            frame_of_reference_uid=for_uid, **{"number_of_frames": None, **over},
        ))
    return out


def test_clean_series_passes():
    assert check_series(rows(), SETTINGS) is None


def test_oblique_but_even_stack_passes():
    # rows tilted in the axial plane; the slice normal is still z, along which the positions step
    assert check_series(rows(orientation="0.9\\0.43588989\\0\\-0.43588989\\0.9\\0"), SETTINGS) is None


@pytest.mark.parametrize(
    ("series", "reason", "says"),
    [
        (rows(modality="MR"), SkipReason.NOT_CT, "MR"),
        (rows(skip=(7,)), SkipReason.UNEVEN_SPACING, "missing slice"),
        (rows() + rows(n=1), SkipReason.UNEVEN_SPACING, "duplicate"),
        (rows(n=10), SkipReason.TOO_FEW_SLICES, "10 slices"),
        (rows()[:10] + rows(for_uid="1.8")[10:], SkipReason.MULTIPLE_FRAMES_OF_REFERENCE, "2 frames"),
        (rows()[:10] + rows(orientation="0\\1\\0\\0\\0\\-1")[10:], SkipReason.MIXED_ORIENTATION, "2 image"),
        ([], SkipReason.NOT_CT, "none"),
        (rows(number_of_frames=120)[:1], SkipReason.MULTI_FRAME, "multi-frame"),
    ],
)
def test_refusals_name_their_reason(series, reason, says):
    refusal = check_series(series, SETTINGS)
    assert refusal is not None and refusal.reason is reason
    assert says in refusal.detail


def test_missing_geometry_is_refused():
    series = rows()
    series[3].image_position = None
    refusal = check_series(series, SETTINGS)
    assert refusal.reason is SkipReason.UNEVEN_SPACING and "lack ImagePositionPatient" in refusal.detail
