"""Routing: which model pipeline, if any, a completed series goes to.

`read_header(path, ...)` reads what routes match on from one instance's header (no pixel data); `route(header,
routes, manufacturer)` applies, in order, the built-in exclusions — objects this node made, non-image objects
(SR, SEG, KOS, RT, waveforms, presentation states…), localizers, secondary-capture screens — and then the config's
ordered ``[[routes]]``: the first route whose every condition holds decides. A series no route matches is
*unrouted*. Only a `Decision` with a pipeline leads to a result; every other decision produces no object at all
(so a PACS that forwards everything back reaches a fixed point). Header values never leave this module: the
decision carries only the route's name and a coded label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from models.clinical import header_value
from node.config import IGNORE, PipelineName, Route

# SOP classes that carry no image the models could read (prefixes of the Storage SOP class UIDs).
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, KOS
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation, surfaces
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG…)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
)
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and multi-frame SC: screenshots, dose screens
_HEADER_KEYWORDS = [
    "Modality", "SOPClassUID", "ImageType", "BodyPartExamined", "SeriesDescription", "ProtocolName",
    "SliceThickness", "Manufacturer", "Rows", "Columns",
]


class Builtin(StrEnum):
    """Exclusions applied before any route, and the label of a series no route matched."""

    OWN_RESULT = "[own-result]"
    NON_IMAGE = "[non-image]"
    LOCALIZER = "[localizer]"
    SCREEN = "[screen]"
    UNREADABLE = "[unreadable]"
    UNROUTED = "[unrouted]"


@dataclass(frozen=True)
class SeriesHeader:
    """What routes match on, from one instance of the series (upper-cased where DICOM compares codes)."""

    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    body_part: str
    series_description: str
    protocol_name: str
    slice_thickness_mm: float | None
    manufacturer: str
    has_pixels: bool
    calling_ae: str
    slices: int


@dataclass(frozen=True)
class Decision:
    """``label`` is the deciding route's name or a `Builtin`; ``pipeline`` is None for every outcome but a run."""

    label: str
    pipeline: PipelineName | None

    @property
    def metric_pipeline(self) -> str:
        return self.pipeline.value if self.pipeline is not None else "none"


_MAX_TEXT = 256  # characters of a text the route patterns search: LO/SH values hold 64 at most


def _text(value: object) -> str:
    """A header value as route patterns see it, cut to `_MAX_TEXT`: a peer's megabyte-long SeriesDescription would
    otherwise make a pattern like ``.*x.*`` quadratic on the completion sweeper's thread."""
    return str(value).strip()[:_MAX_TEXT] if value is not None else ""


def _values(value: Any) -> list[Any]:
    """A header value as a list of its values: a multi-valued one's values, a single value (a string, or a number
    where a faulty writer's VR made one: ImageType as US) as one, none for None."""
    if value is None:
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]


def read_header(path: str | Path, *, calling_ae: str | None, slices: int) -> SeriesHeader | None:
    """The routing header of the instance at ``path``; None when the file is not DICOM. A file that cannot be
    opened or read (`OSError`: a spool on NFS that blipped, too many open files, a missing file) raises: that says
    nothing about the series, which must not be ignored for it. A value whose bytes do not fit its VR reads as
    absent (`models.clinical.header_value`): not a reason for the series to fail every sweep and never complete."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_KEYWORDS)
    except OSError:
        raise
    except (InvalidDicomError, EOFError, ValueError, TypeError, AttributeError):
        return None
    values = _values(header_value(ds, "ImageType"))
    try:
        thickness: float | None = float(header_value(ds, "SliceThickness"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        thickness = None
    return SeriesHeader(
        modality=_text(header_value(ds, "Modality")).upper(),
        sop_class_uid=_text(header_value(ds, "SOPClassUID")),
        image_type=tuple(_text(v).upper() for v in values),
        body_part=_text(header_value(ds, "BodyPartExamined")).upper(),
        series_description=_text(header_value(ds, "SeriesDescription")),
        protocol_name=_text(header_value(ds, "ProtocolName")),
        slice_thickness_mm=thickness,
        manufacturer=_text(header_value(ds, "Manufacturer")),
        has_pixels="Rows" in ds and "Columns" in ds,
        calling_ae=calling_ae or "",
        slices=slices,
    )


def builtin_exclusion(header: SeriesHeader, manufacturer: str) -> Builtin | None:
    """The built-in rule that keeps ``header``'s series away from every pipeline, or None."""
    if header.manufacturer == manufacturer:
        return Builtin.OWN_RESULT
    if header.sop_class_uid.startswith(_NON_IMAGE_PREFIXES) or not header.has_pixels:
        return Builtin.NON_IMAGE
    if "LOCALIZER" in header.image_type:
        return Builtin.LOCALIZER
    if header.sop_class_uid.startswith(_SECONDARY_CAPTURE_PREFIX) or {"SECONDARY", "SCREEN SAVE"} & set(
        header.image_type
    ):
        return Builtin.SCREEN
    return None


def _in(value: str, allowed: Sequence[str]) -> bool:
    return value.upper() in {a.strip().upper() for a in allowed}


def _search(pattern: str | None, text: str) -> bool:
    return pattern is None or re.search(pattern, text, re.IGNORECASE) is not None


def matches(rule: Route, header: SeriesHeader) -> bool:
    """Whether every condition of ``rule`` holds for ``header``."""
    thickness = header.slice_thickness_mm
    checks = (
        not rule.modality or _in(header.modality, rule.modality),
        not rule.sop_class or header.sop_class_uid in rule.sop_class,
        all(_in(v, header.image_type) for v in rule.image_type),
        not any(_in(v, header.image_type) for v in rule.image_type_not),
        not rule.body_part or _in(header.body_part, rule.body_part),
        _search(rule.series_description, header.series_description),
        _search(rule.protocol_name, header.protocol_name),
        not rule.calling_ae or header.calling_ae in rule.calling_ae,
        rule.min_slices is None or header.slices >= rule.min_slices,
        rule.max_slices is None or header.slices <= rule.max_slices,
        rule.min_slice_thickness_mm is None or (thickness is not None and thickness >= rule.min_slice_thickness_mm),
        rule.max_slice_thickness_mm is None or (thickness is not None and thickness <= rule.max_slice_thickness_mm),
    )
    return all(checks)


def route(header: SeriesHeader | None, routes: Sequence[Route], manufacturer: str) -> Decision:
    """The decision for a completed series whose header is ``header`` (None: unreadable)."""
    if header is None:
        return Decision(Builtin.UNREADABLE.value, None)
    excluded = builtin_exclusion(header, manufacturer)
    if excluded is not None:
        return Decision(excluded.value, None)
    for rule in routes:
        if matches(rule, header):
            pipeline = None if rule.pipeline == IGNORE else PipelineName(rule.pipeline)
            return Decision(rule.name, pipeline)
    return Decision(Builtin.UNROUTED.value, None)
