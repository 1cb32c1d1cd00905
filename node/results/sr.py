"""Build the node's SR documents (TID 1500 measurement report in a Comprehensive 3D SR) and the SR + SEG pair.

`build_results` returns the SR and SEG for a processed series (and, with a verdict, the key-images KOS);
`build_skipped_sr` returns a short SR saying, coded, that the series was not processed and why. All UIDs come from `result_uid`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from node.results import codes
from node.results.codes import ResultKind, SegmentNumber, SkipReason
from node.results.content import (
    AlgorithmIdentity,
    Findings,
    ResultSet,
    algorithm_template,
    call,
    check_sources,
    content_datetime_of,
    converting,
    observation_context,
    text_item,
    with_type2_attributes,
)
from node.results.errors import ResultsError
from node.results.geometry import (
    VoxelSize,
    largest_region,
    outline,
    polygon_area,
    voxel_size,
    with_slice_thickness,
)
from node.results.kos import build_key_images_kos
from node.results.seg import build_seg
from node.results.uids import is_valid_uid, result_uid

KEY_SLICE_COUNT = 3
_SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every SR Storage SOP class


class Superseded(NamedTuple):
    """An earlier result object that a new version replaces (all four UIDs; the SOP class tells SR from SEG)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def _superseded(items: Sequence[Sequence[str]]) -> list[Superseded]:
    checked = []
    for n, item in enumerate(items):
        if len(item) != 4:
            raise ResultsError(
                f"superseded[{n}] must be (study UID, series UID, SOP instance UID, SOP class UID), got {len(item)} values"
            )
        entry = Superseded(*(str(v) for v in item))
        if not all(is_valid_uid(v) for v in entry):
            raise ResultsError(f"superseded[{n}] holds an invalid UID")
        checked.append(entry)
    return checked


def _predecessor(entry: Superseded) -> Dataset:
    ds = Dataset()  # the four attributes highdicom reads from a previous version
    ds.StudyInstanceUID = entry.study_uid
    ds.SeriesInstanceUID = entry.series_uid
    ds.SOPInstanceUID = entry.sop_instance_uid
    ds.SOPClassUID = entry.sop_class_uid
    return ds


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept.from_code(code)


def _tracking(uid: str, label: str) -> hd.sr.TrackingIdentifier:
    return call("tracking identifier", hd.sr.TrackingIdentifier, uid=uid, identifier=label)


def _roi_slice(findings: Findings, key: Sequence[int]) -> int:
    """The key slice with the largest lesion area; if no key slice shows lesion, the slice with the most."""
    areas = findings.lesion.sum(axis=(1, 2))
    candidates = [i for i in key if areas[i] > 0] or range(len(areas))
    return max(candidates, key=lambda i: (int(areas[i]), -i))


def _classification_group(
    sources: Sequence[Dataset], findings: Findings, algorithm: AlgorithmIdentity, key: Sequence[int], uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    alg = algorithm_template(algorithm)
    if findings.probability is None or findings.threshold is None:
        raise ResultsError("a classification group needs a probability and a threshold")
    with converting("building the classification group", sources):
        key_images = [hd.sr.SourceImageForMeasurement.from_source_image(sources[i]) for i in key]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, "Pneumonia classification"),
            algorithm_id=alg,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=_coded(codes.PNEUMONIA),
                    value=_coded(codes.PRESENT if findings.pneumonia else codes.ABSENT),
                )
            ],
            measurements=[
                hd.sr.Measurement(
                    name=_coded(codes.PNEUMONIA_PROBABILITY),
                    value=findings.probability,
                    unit=_coded(codes.UNIT_NONE),
                    algorithm_id=alg,
                    referenced_images=key_images,
                ),
                hd.sr.Measurement(
                    name=_coded(codes.DECISION_THRESHOLD),
                    value=findings.threshold,
                    unit=_coded(codes.UNIT_NONE),
                    algorithm_id=alg,
                ),
            ],
        )
        group[0].ContentSequence.extend(_model_note_items(findings))
    return group


def _model_note_items(findings: Findings) -> list[hd.sr.TextContentItem]:
    """TEXT items naming the clinical inputs fused (one each, "age: 63 years"), those missing, the image evidence
    fused, the calibration of the probability, the operating point and the verdict's scope (what was checked on this
    series, and what was not), as far as ``findings.notes`` give them."""
    notes = findings.notes
    if notes is None:
        return []
    items = [text_item(codes.FUSION_INPUT, f"{name}: {value}") for name, value in notes.fusion_inputs]
    items += [text_item(codes.FUSION_MISSING, name) for name in notes.missing_inputs]
    items += [text_item(codes.FUSION_EVIDENCE, f"{name}: {value}") for name, value in notes.fused_evidence]
    if notes.calibration:
        items.append(text_item(codes.CALIBRATION, notes.calibration))
    if notes.operating_point:
        items.append(text_item(codes.OPERATING_POINT, notes.operating_point))
    items += [text_item(codes.SCOPE, line) for line in notes.scope]
    return items


def _volume_group(
    seg: Dataset, mask: np.ndarray, segment: SegmentNumber, algorithm: AlgorithmIdentity, voxel: VoxelSize, uid: str
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """A TID 1411 group measuring the volume of ``mask``, the SEG's ``segment`` (lungs or lesion)."""
    lesion = segment is SegmentNumber.LESION
    alg = algorithm_template(algorithm)
    volume_ml = float(mask.sum()) * voxel.volume_ml
    with converting(f"building the {'lesion' if lesion else 'lung'} volume group"):
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, "Lesion" if lesion else "Lungs"),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, int(segment)),
            finding_type=_coded(codes.LESION if lesion else codes.LUNG),
            finding_category=_coded(
                codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE if lesion else codes.ANATOMICAL_STRUCTURE
            ),
            finding_sites=[hd.sr.FindingSite(anatomic_location=_coded(codes.LUNG))],
            algorithm_id=alg,
            measurements=[
                hd.sr.Measurement(
                    name=_coded(codes.VOLUME),
                    value=volume_ml,
                    unit=_coded(codes.UNIT_MILLILITER),
                    algorithm_id=alg,
                )
            ],
        )


def _lesion_outline_group(
    source: Dataset, mask: np.ndarray, algorithm: AlgorithmIdentity, voxel: VoxelSize, uid: str
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    points = outline(largest_region(mask))
    alg = algorithm_template(algorithm)
    with converting("building the lesion outline group"):
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, "Largest lesion outline"),
            referenced_region=region,
            finding_type=_coded(codes.LESION),
            finding_category=_coded(codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
            # No finding site here (TID 1410 makes it optional; the lesion-volume group names the lung): OHIF would
            # show it as a second label line "363698007: Lung".
            algorithm_id=alg,
            measurements=[
                hd.sr.Measurement(
                    name=_coded(codes.LESION_AREA),
                    value=polygon_area(points, voxel),
                    unit=_coded(codes.UNIT_SQUARE_MILLIMETER),
                    algorithm_id=alg,
                )
            ],
        )


def _document(
    sources: Sequence[Dataset],
    evidence: Sequence[Dataset],
    report: hd.sr.MeasurementReport,
    algorithm: AlgorithmIdentity,
    *,
    series_uid: str,
    sop_uid: str,
    when: dt.datetime,
    series_version: int,
    predecessors: Sequence[Superseded] = (),
    series_description: str = codes.SR_SERIES_DESCRIPTION,
) -> hd.sr.Comprehensive3DSR:
    previous = [_predecessor(p) for p in predecessors
                if p.sop_class_uid.startswith(_SR_STORAGE_PREFIX) and p.sop_class_uid != codes.KOS_SOP_CLASS_UID]
    with converting("building the SR document", sources):
        return hd.sr.Comprehensive3DSR(
            evidence=list(evidence),
            content=report,
            series_instance_uid=series_uid,
            series_number=codes.versioned_number(codes.SR_SERIES_NUMBER, series_version),
            sop_instance_uid=sop_uid,
            instance_number=max(int(series_version), 1),
            manufacturer=algorithm.manufacturer,
            is_complete=True,
            previous_versions=previous or None,
            series_description=series_description,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            coding_schemes=[codes.private_coding_scheme()],
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )


def build_results(
    sources: Sequence[Dataset],
    findings: Findings,
    algorithm: AlgorithmIdentity,
    *,
    series_version: int = 1,
    superseded: Sequence[Sequence[str]] = (),
    content_datetime: dt.datetime | None = None,
    fallback_datetime: dt.datetime | None = None,
) -> ResultSet:
    """Return the SR (TID 1500) and SEG (lungs, lesion) for one processed series.

    ``sources`` are the series' single-frame CT instances in slice order, the order of the ``findings`` arrays.
    With a classifier's findings the SR states the pneumonia verdict and probability; measurement-only findings
    (no probability) give an SR with the lung volume instead and no verdict. ``superseded`` lists earlier result
    objects this version replaces as `Superseded` 4-tuples; SRs among them become the SR's Predecessor Documents,
    and all are named in a note. The content date/time is ``content_datetime``, else taken from the sources, else
    ``fallback_datetime`` (see `content_datetime_of`), so the same inputs give the same objects (and UIDs).
    Raises `ResultsError` naming the problem.
    """
    series_uid = check_sources(sources)
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in sources):
        raise ResultsError("sources must be single-frame instances (multi-frame CT is not supported)")
    sources = with_type2_attributes(sources)
    if findings.lungs.shape[0] != len(sources):
        raise ResultsError(
            f"findings cover {findings.lungs.shape[0]} slices but there are {len(sources)} sources"
        )
    predecessors = _superseded(superseded)
    when = content_datetime_of(sources, content_datetime, fallback_datetime)
    voxel = voxel_size(sources)
    sources = with_slice_thickness(sources, voxel.slice_mm)

    def uid(kind: ResultKind) -> str:
        return result_uid(series_uid, series_version, algorithm.model_key, kind, algorithm.uid_root)

    seg = build_seg(
        sources,
        findings,
        algorithm,
        series_uid=series_uid,
        series_version=series_version,
        content_datetime=when,
    )
    key = findings.key_slices(KEY_SLICE_COUNT)
    # With a verdict, a key-images KOS names the slices that drove it and this SR; the SR names the KOS back (a
    # note, and the KOS in its evidence). Both UIDs are deterministic, so each can name the other before it exists.
    key_images = None
    if findings.classified:
        key_images = _key_images_reference(sources[0], uid(ResultKind.KEY_IMAGES_SERIES), uid(ResultKind.KEY_IMAGES))
    notes = _notes(key_images, len(key), predecessors)
    groups, library = _measurement_groups(sources, findings, algorithm, seg, voxel, key, notes, uid)
    with converting("building the measurement report", sources):
        report = hd.sr.MeasurementReport(
            observation_context=observation_context(algorithm),
            procedure_reported=_coded(codes.CT_OF_CHEST),
            imaging_measurements=groups,
            referenced_images=[sources[i] for i in library],
        )
    sr = _document(
        sources,
        [*sources, seg, *([key_images] if key_images is not None else [])],
        report,
        algorithm,
        series_uid=uid(ResultKind.SR_SERIES),
        sop_uid=uid(ResultKind.SR),
        when=when,
        series_version=series_version,
        predecessors=predecessors,
        series_description=(
            codes.SR_SERIES_DESCRIPTION if findings.classified else codes.LUNG_VOLUME_SR_SERIES_DESCRIPTION
        ),
    )
    kos = None
    if key_images is not None:
        kos = build_key_images_kos(sources, key, sr, algorithm, series_uid=str(key_images.SeriesInstanceUID),
                                   sop_uid=str(key_images.SOPInstanceUID), series_version=series_version, when=when)
    return ResultSet(sr=sr, seg=seg, key_images=kos)


_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def _notes(key_images: Dataset | None, key_count: int, predecessors: Sequence[Superseded]) -> list[hd.sr.TextContentItem]:
    """The SR's comments: not for clinical use, where the key-images KOS is, and each object this one supersedes."""
    notes = [text_item(codes.COMMENT, codes.NOT_FOR_CLINICAL_USE)]
    if key_images is not None:
        notes.append(text_item(codes.COMMENT, (
            f"Key images: Key Object Selection {key_images.SOPInstanceUID} ('{codes.KEY_IMAGES_SERIES_DESCRIPTION}', "
            f"series {key_images.SeriesInstanceUID}) names the {key_count} slices that weighed most in this verdict.")))
    notes += [
        text_item(codes.SUPERSEDES, f"SOP Instance {p.sop_instance_uid} (SOP Class {p.sop_class_uid})")
        for p in predecessors
    ]
    return notes


def _measurement_groups(
    sources: Sequence[Dataset],
    findings: Findings,
    algorithm: AlgorithmIdentity,
    seg: Dataset,
    voxel: VoxelSize,
    key: Sequence[int],
    notes: Sequence[hd.sr.TextContentItem],
    uid: Callable[[ResultKind], str],
) -> tuple[list[_Group], list[int]]:
    """The report's measurement groups (the verdict or the lung volume, carrying ``notes``; the lesion volume; the
    lesion outline first when there is a lesion) and the slices its image library lists."""
    first: hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    if findings.classified:
        first = _classification_group(sources, findings, algorithm, key, uid(ResultKind.TRACKING_CLASSIFICATION))
    else:
        first = _volume_group(seg, findings.lungs, SegmentNumber.LUNGS, algorithm, voxel,
                              uid(ResultKind.TRACKING_LUNG_VOLUME))
    first[0].ContentSequence.extend(notes)
    groups: list[_Group] = [first]
    groups.append(
        _volume_group(seg, findings.lesion, SegmentNumber.LESION, algorithm, voxel, uid(ResultKind.TRACKING_LESION))
    )
    library = list(key)
    if findings.lesion.any():
        roi = _roi_slice(findings, key)
        # The outline group goes first: OHIF's SR viewport (3.13) opens on the first measurement group and draws
        # nothing when that group has no image region.
        groups.insert(
            0,
            _lesion_outline_group(
                sources[roi], findings.lesion[roi], algorithm, voxel, uid(ResultKind.TRACKING_LESION_OUTLINE)
            ),
        )
        if roi not in library:
            library.append(roi)
    return groups, library


def _key_images_reference(source: Dataset, series_uid: str, sop_uid: str) -> Dataset:
    """The four UIDs by which the SR's evidence names its key-images KOS (built after the SR, which it references)."""
    ds = Dataset()
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.SOPClassUID = codes.KOS_SOP_CLASS_UID
    return ds


def build_skipped_sr(
    sources: Sequence[Dataset],
    reason: SkipReason,
    detail: str,
    algorithm: AlgorithmIdentity,
    *,
    series_version: int = 1,
    content_datetime: dt.datetime | None = None,
    fallback_datetime: dt.datetime | None = None,
) -> Dataset:
    """Return a TID 1500 SR saying, coded, that the AI did not process the series: ``reason`` as a coded value,
    ``detail`` as text, plus the not-for-clinical-use note. Lives in the same SR series as `build_results`' SR,
    with its own SOP Instance UID. Raises `ResultsError` naming the problem.
    """
    if not isinstance(reason, SkipReason):
        raise ResultsError(f"reason must be a SkipReason, got {type(reason).__name__}")
    if not isinstance(detail, str) or not detail.strip():
        raise ResultsError("detail must be a non-empty string")
    series_uid = check_sources(sources)
    sources = with_type2_attributes(sources)
    when = content_datetime_of(sources, content_datetime, fallback_datetime)

    def uid(kind: ResultKind) -> str:
        return result_uid(series_uid, series_version, algorithm.model_key, kind, algorithm.uid_root)

    with converting("building the skipped-series report"):
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid(ResultKind.TRACKING_SKIPPED), "AI analysis not performed"),
            algorithm_id=algorithm_template(algorithm),
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=_coded(codes.AI_ANALYSIS_STATUS), value=_coded(codes.NOT_PROCESSED)
                ),
                hd.sr.QualitativeEvaluation(name=_coded(codes.SKIP_REASON), value=_coded(reason.code)),
            ],
        )
        group[0].ContentSequence.extend(
            [text_item(codes.SKIP_DETAIL, detail), text_item(codes.COMMENT, codes.NOT_FOR_CLINICAL_USE)]
        )
        # Only a series the node could see is a chest CT is reported as one.
        chest = reason not in (SkipReason.NOT_CT, SkipReason.OUT_OF_SCOPE, SkipReason.NOT_ORIGINAL_AXIAL)
        procedure = codes.CT_OF_CHEST if chest else codes.IMAGING_PROCEDURE
        report = hd.sr.MeasurementReport(
            observation_context=observation_context(algorithm),
            procedure_reported=_coded(procedure),
            imaging_measurements=[group],
        )
    return _document(
        sources,
        sources,
        report,
        algorithm,
        series_uid=uid(ResultKind.SR_SERIES),
        sop_uid=uid(ResultKind.SKIPPED_SR),
        when=when,
        series_version=series_version,
    )
