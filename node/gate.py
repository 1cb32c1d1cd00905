"""The validity gate: refuse, with a coded reason, series a pipeline cannot judge — before any pixel is read.

`check_series(instances, settings, expected_count=...)` looks at index rows (modality, SOP class, frames, frame of
reference, geometry, spacing, tilt, count), `check_header(ds)` at one instance's header (contrast, orientation,
image type, patient age, pixel spacing) and `check_size(ds, slices)` at the series' size against the worker's
memory budget; each returns None when the series may go on, else a `GateRefusal` naming the `SkipReason` and a
one-line detail that never quotes a header value. Pixel decodability is the last check and happens when the
worker loads the series (a `PreprocessError` there is also a refusal); the image-based scope check follows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.multival import MultiValue

from models.clinical import header_value, patient_age_years
from node.config import CT_IMAGE_STORAGE, GateSection
from node.results import SkipReason
from node.stack import analyse_stack

SUPPORTED_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE})  # single-frame CT: what models.preprocess stacks


@dataclass(frozen=True)
class GateRefusal:
    reason: SkipReason
    detail: str


_SUPINE_COSINE = 0.8  # the column direction within ~37° of the patient's posterior (+y): how the models saw it
_PLANE_COSINE = 0.95  # a slice normal within ~18° of the left-right (front-back) axis is called sagittal (coronal)


def check_series(
    instances: Sequence[Any], settings: GateSection, *, expected_count: int | None = None
) -> GateRefusal | None:
    """Check modality, SOP class, frames, geometry, spacing, tilt and slice count from index rows."""
    return _check_instances(instances, settings, expected_count) or _check_stack(instances, settings)


def _check_instances(instances: Sequence[Any], settings: GateSection, expected_count: int | None) -> GateRefusal | None:
    """What each row says on its own: study, modality, frames, SOP class; and whether the announced count arrived."""
    if len(studies := {getattr(r, "study_uid", None) for r in instances}) > 1:  # one study per series (PS3.3 C.7.3)
        return GateRefusal(SkipReason.MULTIPLE_STUDIES, f"the series' instances name {len(studies)} different "
                                                        "studies (a SeriesInstanceUID reused by a sender): images "
                                                        "of two studies are never judged together")
    modalities = sorted({str(r.modality or "?") for r in instances})
    if not instances or any(m not in settings.modalities for m in modalities):
        return GateRefusal(SkipReason.NOT_CT, f"modality {'/'.join(modalities) or 'none'}; the models judge "
                                              f"{'/'.join(settings.modalities)} only")
    if any((r.number_of_frames or 1) > 1 for r in instances):
        return GateRefusal(SkipReason.MULTI_FRAME, "multi-frame (enhanced) images are not supported yet")
    if any(r.sop_class_uid not in SUPPORTED_SOP_CLASSES for r in instances):
        return GateRefusal(SkipReason.NOT_ORIGINAL_AXIAL, "only CT Image Storage instances can be analysed "
                                                          "(secondary capture or other SOP classes found)")
    if expected_count and len(instances) < expected_count:
        return GateRefusal(SkipReason.INCOMPLETE_SERIES,
                           f"{len(instances)} of the {expected_count} instances the series announces arrived")
    return None


def _check_stack(instances: Sequence[Any], settings: GateSection) -> GateRefusal | None:
    """What the rows say together: one frame of reference and orientation, enough evenly spaced, untilted slices."""
    stack = analyse_stack(instances)
    missing_for = sum(1 for r in instances if not r.frame_of_reference_uid)
    if missing_for:
        return GateRefusal(SkipReason.MISSING_GEOMETRY, f"{missing_for} instances lack FrameOfReferenceUID")
    if stack.missing_geometry:
        return GateRefusal(SkipReason.MISSING_GEOMETRY,
                           f"{stack.missing_geometry} instances lack ImagePositionPatient/ImageOrientationPatient")
    if stack.frames_of_reference > 1:
        return GateRefusal(SkipReason.MULTIPLE_FRAMES_OF_REFERENCE,
                           f"{stack.frames_of_reference} frames of reference in one series")
    if stack.orientations > 1:
        return GateRefusal(SkipReason.MIXED_ORIENTATION, f"{stack.orientations} image orientations in one series")
    if stack.count < settings.min_slices:
        return GateRefusal(SkipReason.TOO_FEW_SLICES, f"{stack.count} slices; at least {settings.min_slices} needed")
    if stack.duplicates:
        return GateRefusal(SkipReason.UNEVEN_SPACING, f"{stack.duplicates} duplicate slice positions")
    if not stack.even(settings.spacing_tolerance_mm):
        return GateRefusal(
            SkipReason.UNEVEN_SPACING,
            f"slice gaps vary by up to {stack.worst_deviation_mm:.2f} mm around {stack.spacing_mm:.2f} mm "
            f"(a missing slice or uneven spacing)",
        )
    if stack.tilt_degrees > settings.max_tilt_degrees:
        return GateRefusal(
            SkipReason.GANTRY_TILT,
            f"slices are sheared by {stack.tilt_degrees:.1f} degrees (gantry tilt); the models need an orthogonal "
            f"stack (at most {settings.max_tilt_degrees:g} degrees)",
        )
    return None


def check_header(ds: Any, settings: GateSection | None = None) -> GateRefusal | None:
    """Check one instance's header (``ds``: a pydicom Dataset read without pixels) for what the models need. With
    ``settings.refuse_contrast`` a series whose Contrast/Bolus Agent is filled in is out of scope: every model card
    says contrast was absent from training, and enhanced vessels (200–400 HU) look like consolidation to it."""
    if (settings is None or settings.refuse_contrast) and _contrast_recorded(ds):
        return GateRefusal(SkipReason.OUT_OF_SCOPE, "contrast-enhanced series (Contrast/Bolus Agent, route, "
                                                    "ingredient, volume, dose or flow rate is set): the models were "
                                                    "trained on non-contrast CT only")
    if (turned := _not_axial(ds) or _turned(ds)) is not None:
        return GateRefusal(SkipReason.OUT_OF_SCOPE, turned)
    if (kind := _image_kind(ds)) is not None:
        return GateRefusal(SkipReason.NOT_ORIGINAL_AXIAL, kind)
    age = header_age_years(ds)
    if age is not None and age < MIN_AGE_YEARS:
        return GateRefusal(SkipReason.OUT_OF_SCOPE, f"the patient is a child (under {MIN_AGE_YEARS:g} years by the "
                                                    f"header): the models were trained on adults only")
    spacing = header_value(ds, "PixelSpacing")  # a malformed value (bytes that do not fit its VR) reads as None
    try:
        ok = spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return GateRefusal(SkipReason.MISSING_GEOMETRY, "PixelSpacing is missing or not two positive numbers")
    for keyword in ("Rows", "Columns"):
        value = header_value(ds, keyword)
        if not isinstance(value, int) or value < 16:
            return GateRefusal(SkipReason.NOT_ORIGINAL_AXIAL, f"{keyword} is missing or below 16")
    return None


def check_size(ds: Any, slices: int, settings: GateSection) -> GateRefusal | None:
    """Refuse a series whose ``slices`` × Rows × Columns (from the header ``ds``) is over
    ``settings.max_series_megavoxels``: the worker holds it whole (~13 bytes per voxel at its peak), so a 2,000
    slice series of 512² would take ~7 GB and end the worker, again at every attempt."""
    try:
        voxels = slices * int(ds.Rows) * int(ds.Columns)
    except Exception:  # noqa: BLE001 - absent or malformed: check_header refuses such a header
        return None  # check_header refuses a header without them
    if voxels > settings.max_series_megavoxels * 1e6:
        return GateRefusal(SkipReason.TOO_LARGE, f"{voxels / 1e6:.0f} million voxels ({slices} slices); the node "
                                                 f"analyses at most {settings.max_series_megavoxels:g} million")
    return None


# a series the gate passed that still cannot be made a volume: models.preprocess.PreprocessError.kind → its code
_UNLOADABLE = {
    "pixels": SkipReason.UNDECODABLE_PIXELS,
    "geometry": SkipReason.MISSING_GEOMETRY,
    "mixed_geometry": SkipReason.MIXED_GEOMETRY,
    "orientation": SkipReason.MIXED_ORIENTATION,
    "frame_of_reference": SkipReason.MULTIPLE_FRAMES_OF_REFERENCE,
    "spacing": SkipReason.UNEVEN_SPACING,
}


def unloadable(exc: Any) -> GateRefusal:
    """The refusal for a series whose volume could not be built (``exc``: a `models.preprocess.PreprocessError`,
    whose message names files by index, never a header value): coded by what failed."""
    return GateRefusal(_UNLOADABLE.get(getattr(exc, "kind", ""), SkipReason.UNDECODABLE_PIXELS), str(exc)[:200])


_NO_CONTRAST = frozenset({"NONE", "NO", "N", "NIL", "0", "NO CONTRAST", "WITHOUT CONTRAST", "NON-CONTRAST"})


def _named(ds: Any, keyword: str, meaning_none: frozenset[str] = frozenset()) -> bool:
    """Whether ``ds`` carries a non-empty text value for ``keyword`` other than one of ``meaning_none`` (what
    scanners write for "no agent"); a malformed value counts as named."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - bytes that do not decode: something is there
        return True
    text = str(value or "").strip().upper()
    return bool(text) and text not in meaning_none


# The rest of the Contrast/Bolus Module: an injector-linked scanner fills in route, volume, flow rate, ingredient
# even where the agent's name (Type 2) is left empty or was blanked by an anonymiser.
_CONTRAST_TEXT = ("ContrastBolusRoute", "ContrastBolusIngredient")
_CONTRAST_AMOUNTS = ("ContrastBolusVolume", "ContrastBolusTotalDose", "ContrastBolusIngredientConcentration",
                     "ContrastFlowRate")


def _contrast_recorded(ds: Any) -> bool:
    """Whether the header records a contrast agent: named (ContrastBolusAgent, or a coded agent), a route or
    ingredient other than "none", or an amount above zero (a malformed one counts as recorded)."""
    if _named(ds, "ContrastBolusAgent", _NO_CONTRAST) or any(_named(ds, k, _NO_CONTRAST) for k in _CONTRAST_TEXT):
        return True
    try:
        if ds.get("ContrastBolusAgentSequence"):
            return True
        amounts = [ds.get(k) for k in _CONTRAST_AMOUNTS]
        values = [v for a in amounts if a is not None and str(a).strip()
                  for v in (a if isinstance(a, (list, tuple, MultiValue)) else [a])]
        return any(not float(v) <= 0.0 for v in values)  # NaN: malformed, so recorded
    except Exception:  # noqa: BLE001 - bytes that do not fit the VR: something is there
        return True


def header_age_years(ds: Any) -> float | None:
    """The patient's age in years as the gate reads it: `models.clinical.patient_age_years`, the reader the
    classifier's clinical input uses too (PatientAge, loosely written forms included; else the dates)."""
    return patient_age_years(ds)


MIN_AGE_YEARS = 18.0  # every model card's training data: adults of 18–95 years; no child was ever seen

# ImageType values (any position) that mark a projection or rendering, not a slice of anatomy: a maximum-intensity
# slab turns vessels into bright tubes (a normal chest phantom's probability went 0.03 → 0.995), a minimum one
# darkens the lungs.
_PROJECTIONS = frozenset({"MIP", "MINIP", "MIN IP", "MINIMUM IP", "MAXIP", "MAX IP", "MNIP", "MAXIMUM", "MINIMUM",
                          "PROJECTION IMAGE", "VOLUME_RENDER", "VOLUME RENDER", "VRT", "SSD", "SURFACE", "CPR",
                          "CURVED"})
# Averaged slabs: every training, fitting and test phantom is point-sampled along z (no slice profile), and averaging
# slices makes partial-volume rims (diaphragm, heart, vessels, apices) the models read as ground glass: 2-, 3- and
# 5-slice averages of ~1.2 mm slices called 10 of 10 normal phantoms pneumonia (0.996), the same slices unaveraged
# 0-1 of 10 (tests/unit/test_robustness_gate.py; the classifier 2.4.0 card's limitations).
_AVERAGED = frozenset({"AVERAGE", "AVERAGE IP", "AVG", "AVG IP", "AVGIP", "MEAN"})


def _image_kind(ds: Any) -> str | None:
    """Why ImageType says these are not slices of anatomy the models can read (a scout, a projection), or None."""
    try:
        image_type = ds.get("ImageType")
        values = {str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type or [])}
    except Exception:  # noqa: BLE001 - bytes that do not fit the VR, or a number: nothing says what the images are
        return "ImageType cannot be read (malformed): whether these are original slices cannot be told"
    if "LOCALIZER" in values:
        return "the series is a localizer (scout)"
    if values & _PROJECTIONS:
        return ("the images are a projection (MIP/MinIP slab or rendering), not slices: the models read original "
                "axial slices only")
    if values & _AVERAGED:
        return ("the images are averaged slabs: the models were trained on single slices without a slice profile "
                "and read averaged slabs as pneumonia")
    return None


def _not_axial(ds: Any) -> str | None:
    """Why the slices are not axial (sagittal, coronal, oblique beyond ~37°: what `models.scope` calls axial), or
    None. Checked before `_turned`, which only tells apart the ways an axial slice can be turned in-plane."""
    try:
        ori = [float(v) for v in ds.ImageOrientationPatient]
        row, col = ori[:3], ori[3:6]
    except Exception:  # noqa: BLE001 - absent or malformed: left to the stack checks
        return None
    if len(row) != 3 or len(col) != 3:
        return None
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    length = math.sqrt(sum(v * v for v in normal))
    if not math.isfinite(length) or length < 0.5 or abs(normal[2]) / length >= _SUPINE_COSINE:
        return None  # a malformed orientation is left to the stack checks
    off = math.degrees(math.acos(min(1.0, abs(normal[2]) / length)))
    plane = ("sagittal" if abs(normal[0]) / length >= _PLANE_COSINE else "coronal"
             if abs(normal[1]) / length >= _PLANE_COSINE else f"oblique, {off:.0f} degrees off axial")
    return f"not an axial series: the slices are {plane}; the models read axial slices only"


def _turned(ds: Any) -> str | None:
    """Why the images are turned in-plane in a way the models never saw, or None. They were trained on supine
    slices (columns running from anterior to posterior) with left-right flips: a feet-first series flipped left to
    right is fine, a prone one (upside down) or a decubitus one (on its side) is not. A missing or malformed
    orientation is left to the stack checks."""
    try:
        col_y = float(ds.ImageOrientationPatient[4])
    except Exception:  # noqa: BLE001 - absent or malformed: left to the stack checks
        return None
    if col_y >= _SUPINE_COSINE:
        return None
    position = "upside down (prone)" if col_y <= -_SUPINE_COSINE else "on their side (decubitus)"
    return (f"the images are turned {position}: the models were trained on supine slices only (columns running "
            f"anterior to posterior)")
