"""Validity gate: each refusal reason from index rows alone, and a clean series passing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom import Dataset

from node.config import GateSection
from node.gate import check_header, check_series, check_size
from node.results import SkipReason

SETTINGS = GateSection(min_slices=16, spacing_tolerance_mm=0.05)


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def rows(n=20, spacing=2.5, skip=(), modality="CT", orientation="1\\0\\0\\0\\1\\0", for_uid="1.9", tilt_mm=0.0,
         **over):
    """Index-like rows of an axial stack; ``tilt_mm`` shifts each slice's origin in y per slice (gantry tilt)."""
    out = []
    for i in range(n):
        if i in skip:
            continue
        out.append(SimpleNamespace(
            modality=modality, image_position=f"-10\\{-10 + i * tilt_mm}\\{i * spacing}", image_orientation=orientation,
            frame_of_reference_uid=for_uid, **{"number_of_frames": None, "sop_class_uid": CT_IMAGE, **over},
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
    assert refusal.reason is SkipReason.MISSING_GEOMETRY and "lack ImagePositionPatient" in refusal.detail


@pytest.mark.parametrize(
    ("series", "reason", "says"),
    [
        (rows(for_uid=None), SkipReason.MISSING_GEOMETRY, "FrameOfReferenceUID"),
        (rows(for_uid=""), SkipReason.MISSING_GEOMETRY, "FrameOfReferenceUID"),
        (rows(tilt_mm=0.5), SkipReason.GANTRY_TILT, "11.3 degrees"),  # atan(0.5 / 2.5)
        (rows(sop_class_uid="1.2.840.10008.5.1.4.1.1.7"), SkipReason.NOT_ORIGINAL_AXIAL, "CT Image Storage"),
    ],
)
def test_what_the_pipeline_needs_is_checked_before_inference(series, reason, says):
    refusal = check_series(series, SETTINGS)
    assert refusal is not None and refusal.reason is reason
    assert says in refusal.detail


def test_a_tilt_within_tolerance_passes_and_the_tolerance_is_configurable():
    assert check_series(rows(tilt_mm=0.01), SETTINGS) is None  # 0.23 degrees
    strict = GateSection(min_slices=16, max_tilt_degrees=0.1)
    assert check_series(rows(tilt_mm=0.01), strict).reason is SkipReason.GANTRY_TILT


def test_a_known_expected_count_not_reached_is_refused_as_incomplete():
    refusal = check_series(rows(n=20), SETTINGS, expected_count=30)
    assert refusal.reason is SkipReason.INCOMPLETE_SERIES and "20 of the 30" in refusal.detail
    assert check_series(rows(n=20), SETTINGS, expected_count=20) is None


def _header(**over):
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 512
    for keyword, value in over.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"PixelSpacing": None}, SkipReason.MISSING_GEOMETRY),
        ({"PixelSpacing": [0, 0.7]}, SkipReason.MISSING_GEOMETRY),
        ({"PixelSpacing": [0.7]}, SkipReason.MISSING_GEOMETRY),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, SkipReason.NOT_ORIGINAL_AXIAL),
        ({"Rows": 8}, SkipReason.NOT_ORIGINAL_AXIAL),
    ],
)
def test_header_checks(over, reason):
    assert check_header(_header()) is None
    refusal = check_header(_header(**over))
    assert refusal is not None and refusal.reason is reason


@pytest.mark.parametrize(("keyword", "raw"), [("ImageType", b"ab"), ("ImageType", b"abc"), ("Rows", b"abc"),
                                              ("Columns", b"abc"), ("PixelSpacing", b"abc")])
def test_a_malformed_header_value_is_a_coded_refusal_not_a_crash(tmp_path, keyword, raw):
    """Found by this session's second review: ImageType, Rows, Columns or PixelSpacing written as US whose bytes do
    not fit (3 bytes: pydicom's BytesLengthException) or fit as a number (ImageType as one US) made check_header
    raise; through the worker every attempt failed and the PACS got "processing failed" instead of a coded reason.
    Such a value now refuses the series with a reason naming the attribute, before any model runs."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from tests.ctgen import write_ct_series

    path = write_ct_series(tmp_path / "s", slices=1, size=32, seed=91).paths[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, "US", len(raw), raw, 0, False, True)
    refusal = check_header(ds, GateSection())
    assert refusal is not None and keyword in refusal.detail
    check_size(ds, 10, GateSection())  # answers (None: check_header refuses such a header), never raises
