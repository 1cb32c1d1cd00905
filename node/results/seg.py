"""Build the BINARY Segmentation (segment 1 lungs, segment 2 lesion) on the source slices with highdicom."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset

from node.results import codes
from node.results.codes import ResultKind, SegmentNumber
from node.results.content import AlgorithmIdentity, Findings, algorithm_sequence, converting
from node.results.errors import ResultsError
from node.results.uids import result_uid

LUNGS_RGB = (80, 160, 255)
LESION_RGB = (255, 40, 40)


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, with a cheaper overlap check for the one array form `build_seg` passes.

    For a 4-D uint8 stack of binary segments highdicom decides SegmentsOverlap from ``pixel_array.sum(axis=-1)``:
    a uint8 → uint64 reduction over a last axis of length 2, ~0.4 s of the ~1.3 s an SR + SEG of 120 × 512² slices
    take to build. Here the same answer (and the same error for a non-binary array) comes from pairwise
    ``logical_and`` of the segment planes, ~20× faster; every other array form goes to highdicom's own check.
    highdicom is pinned (pyproject.toml), and tests/unit/test_results_seg_overlap.py compares both checks and the
    bytes of a SEG built through each; docs/upstream-highdicom.md is the change we offer upstream.
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: np.ndarray,
                                    segmentation_type: hd.seg.SegmentationTypeValues, dtype: type) -> Any:
        if not (isinstance(pixel_array, np.ndarray) and pixel_array.dtype == np.uint8 and pixel_array.ndim == 4
                and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
                and pixel_array.shape[-1] == len(segment_numbers) > 1):
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        if pixel_array.max() > 1:
            raise ValueError("When passing a 4D stack of segments with an integer pixel type, the pixel array "
                             "must be binary.")
        return pixel_array, overlap_of(pixel_array)


def overlap_of(stack: np.ndarray) -> hd.seg.SegmentsOverlapValues:
    """YES when any pixel belongs to two or more of the binary (…, segments) planes, else NO."""
    seen = stack[..., 0]
    for k in range(1, stack.shape[-1]):
        plane = stack[..., k]
        if np.logical_and(seen, plane).any():
            return hd.seg.SegmentsOverlapValues.YES
        seen = np.logical_or(seen, plane)
    return hd.seg.SegmentsOverlapValues.NO


def _segment(
    number: SegmentNumber,
    label: str,
    category: hd.sr.CodedConcept,
    kind: hd.sr.CodedConcept,
    rgb: tuple[int, int, int],
    algorithm: AlgorithmIdentity,
    tracking_uid: str,
    anatomic_regions: Sequence[hd.sr.CodedConcept] | None = None,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=int(number),
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_sequence(algorithm),
        tracking_uid=tracking_uid,
        tracking_id=label,
        anatomic_regions=anatomic_regions,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def build_seg(
    sources: Sequence[Dataset],
    findings: Findings,
    algorithm: AlgorithmIdentity,
    *,
    series_uid: str,
    series_version: int,
    content_datetime: dt.datetime,
) -> Dataset:
    """Return the SEG for ``findings`` on ``sources`` (one frame per source slice and segment, none omitted).

    UIDs (series, instance, tracking, dimension organization) derive from `result_uid`, so the same inputs give
    the same object. Raises `ResultsError` if the masks do not fit the sources or highdicom rejects the input.
    """
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    expected = (len(sources), rows, columns)
    if findings.lungs.shape != expected:
        raise ResultsError(f"mask shape {findings.lungs.shape} does not match the sources {expected}")

    def uid(kind: ResultKind) -> str:
        return result_uid(series_uid, series_version, algorithm.model_key, kind, algorithm.uid_root)

    with converting("building the SEG", sources):
        lung = hd.sr.CodedConcept.from_code(codes.LUNG)
        segments = [
            _segment(
                SegmentNumber.LUNGS,
                "Lungs",
                hd.sr.CodedConcept.from_code(codes.ANATOMICAL_STRUCTURE),
                lung,
                LUNGS_RGB,
                algorithm,
                uid(ResultKind.TRACKING_LUNGS),
            ),
            _segment(
                SegmentNumber.LESION,
                "Lesion",
                hd.sr.CodedConcept.from_code(codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
                hd.sr.CodedConcept.from_code(codes.LESION),
                LESION_RGB,
                algorithm,
                uid(ResultKind.TRACKING_LESION),
                anatomic_regions=[lung],
            ),
        ]
        pixels = np.stack([findings.lungs, findings.lesion], axis=-1).astype(np.uint8)
        seg = _Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=uid(ResultKind.SEG_SERIES),
            series_number=codes.versioned_number(codes.SEG_SERIES_NUMBER, series_version),
            sop_instance_uid=uid(ResultKind.SEG),
            instance_number=max(int(series_version), 1),
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number="none",
            series_description=codes.SEG_SERIES_DESCRIPTION,
            content_label="AI_LUNG_LESION",
            content_description="AI lungs and lesion (NOT FOR CLINICAL USE)",
            content_creator_name=None,
            omit_empty_frames=False,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            series_date=content_datetime.date(),
            series_time=content_datetime.time(),
            content_qualification=hd.ContentQualificationValues.RESEARCH,
        )
        # highdicom draws a random Dimension Organization UID; a fixed one keeps a rebuilt SEG identical.
        dimension_uid = uid(ResultKind.SEG_DIMENSION_ORGANIZATION)
        for item in seg.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = dimension_uid
        for item in seg.DimensionIndexSequence:
            item.DimensionOrganizationUID = dimension_uid
    return seg
