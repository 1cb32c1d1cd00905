"""Inputs of the result builders (algorithm identity, findings) and the highdicom content items shared by SR and SEG.

Layering (highdicom `sr/` style): codes → content → seg → sr; nothing here imports the builders.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node.results import codes
from node.results.attributes import CharsetRepair, charset_repair, decoded, malformed_copied, padded_names
from node.results.errors import ResultsError
from node.results.uids import UID_PREFIX, check_root, is_valid_uid
from node.states import NODE_MANUFACTURER

_LO_MAX = 64
T = TypeVar("T")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who produced a result: model name and version (LO, ≤ 64 characters), manufacturer, coded family, and the
    UID root its result UIDs and device UID are made under (the site's, or pydicom's by default).

    Raises `ResultsError` naming the field for an empty or over-long value.
    """

    name: str
    version: str
    manufacturer: str = NODE_MANUFACTURER
    family: Code = codes.ARTIFICIAL_INTELLIGENCE
    uid_root: str = UID_PREFIX

    def __post_init__(self) -> None:
        for name in ("name", "version", "manufacturer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > _LO_MAX or "\\" in value:
                raise ResultsError(
                    f"AlgorithmIdentity.{name} must be 1-{_LO_MAX} characters without a backslash"
                )
        if not isinstance(self.family, Code):
            raise ResultsError("AlgorithmIdentity.family must be a pydicom Code")
        check_root(self.uid_root, "AlgorithmIdentity.uid_root")

    @property
    def model_key(self) -> str:
        """The model identity that result UIDs derive from: ``name@version`` (two models never share UIDs)."""
        return f"{self.name}@{self.version}"

    @property
    def device_uid(self) -> str:
        """A stable UID naming this algorithm as an SR device observer."""
        return str(
            generate_uid(
                prefix=self.uid_root, entropy_srcs=[repr(("device", self.manufacturer, self.model_key))]
            )
        )


def _mask(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ResultsError(
            f"Findings.{name} must be a non-empty (slices, rows, columns) array, got shape {arr.shape}"
        )
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
            raise ResultsError(f"Findings.{name} must be boolean (or integers 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


@dataclass(frozen=True)
class ModelNotes:
    """How a verdict was reached, for the SR: the clinical inputs the model fused (name, value as text) and those
    it reads but were missing, the image evidence fused (name, value: the image classifier's own probability and
    the segmenter's lesion evidence, for a lesion-fusing version), how the probability is calibrated, and the
    operating point (threshold rule). Texts must not carry patient identifiers (age and sex are the inputs
    themselves, not identifiers)."""

    fusion_inputs: tuple[tuple[str, str], ...] = ()
    missing_inputs: tuple[str, ...] = ()
    calibration: str | None = None
    operating_point: str | None = None
    fused_evidence: tuple[tuple[str, str], ...] = ()
    scope: tuple[str, ...] = ()  # what the verdict's scope is and what was checked on this series (and what not)

    def __post_init__(self) -> None:
        for pairs in ("fusion_inputs", "fused_evidence"):
            for name, value in getattr(self, pairs):
                if not (isinstance(name, str) and name.strip() and isinstance(value, str) and value.strip()):
                    raise ResultsError(f"ModelNotes.{pairs} must be (name, value) pairs of non-empty strings")
        for name in ("missing_inputs", "scope"):
            if not all(isinstance(n, str) and n.strip() for n in getattr(self, name)):
                raise ResultsError(f"ModelNotes.{name} must be non-empty strings")
        for name in ("calibration", "operating_point"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ResultsError(f"ModelNotes.{name} must be a non-empty string or None")


@dataclass(frozen=True, eq=False)
class Findings:
    """Model outputs for one series, in the order of the source slices.

    ``probability`` and ``threshold`` lie in [0, 1], or are both None when no classifier ran (a measurement-only
    pipeline); ``attention`` has one finite weight per slice (None: each slice's share of the lung mask);
    ``lungs`` and ``lesion`` are boolean masks of shape (slices, rows, columns) on the source grid; ``notes``
    (optional) say which clinical inputs were fused, the calibration and the operating point. Raises
    `ResultsError` naming the field that breaks this.
    """

    probability: float | None
    threshold: float | None
    attention: np.ndarray | None
    lungs: np.ndarray
    lesion: np.ndarray = field(repr=False)
    notes: ModelNotes | None = None

    def __post_init__(self) -> None:
        if (self.probability is None) != (self.threshold is None):
            raise ResultsError("Findings.probability and Findings.threshold are given together or not at all")
        for name in ("probability", "threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ResultsError(f"Findings.{name} must be a number, got {type(value).__name__}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ResultsError(f"Findings.{name} must lie in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        lungs, lesion = _mask(self.lungs, "lungs"), _mask(self.lesion, "lesion")
        if lungs.shape != lesion.shape:
            raise ResultsError(
                f"Findings.lesion shape {lesion.shape} differs from Findings.lungs {lungs.shape}"
            )
        if self.attention is None:
            area = lungs.sum(axis=(1, 2)).astype(float)
            attention = area / area.sum() if area.sum() > 0 else np.full(lungs.shape[0], 1.0 / lungs.shape[0])
        else:
            attention = np.asarray(self.attention, dtype=float)
        if attention.ndim != 1 or not np.all(np.isfinite(attention)):
            raise ResultsError("Findings.attention must be a 1-D array of finite weights")
        if attention.shape[0] != lungs.shape[0]:
            raise ResultsError(
                f"Findings.attention has {attention.shape[0]} weights for {lungs.shape[0]} slices"
            )
        if self.notes is not None and not isinstance(self.notes, ModelNotes):
            raise ResultsError(f"Findings.notes must be ModelNotes or None, got {type(self.notes).__name__}")
        object.__setattr__(self, "attention", attention)
        object.__setattr__(self, "lungs", lungs)
        object.__setattr__(self, "lesion", lesion)

    @property
    def classified(self) -> bool:
        """Whether a classifier gave a probability (False for measurement-only findings)."""
        return self.probability is not None

    @property
    def pneumonia(self) -> bool:
        """The decision: probability at or above the threshold (False when no classifier ran)."""
        return self.probability is not None and self.threshold is not None and self.probability >= self.threshold

    def key_slices(self, k: int = 3) -> list[int]:
        """Indices of the ``k`` slices with the highest attention (ties: lower index first), highest first."""
        attention = np.asarray(self.attention)
        order = np.lexsort((np.arange(attention.size), -attention))
        return [int(i) for i in order[:k]]


@dataclass(frozen=True)
class ResultSet:
    """The objects built for one processed series: the SR, the SEG when segmentation ran, and with a verdict the
    key-images KOS naming the slices that drove it."""

    sr: Dataset
    seg: Dataset | None
    key_images: Dataset | None = None


# Patient/study values a library message may echo (e.g. "'X' is not a valid PatientSexValues"): scrubbed from
# ResultsError messages, which end up in logs.
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "InstitutionName",
)
# Type 2 attributes highdicom copies from the first source with plain attribute access.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def scrub(message: str, sources: Sequence[Dataset]) -> str:
    """``message`` with every patient/study identifying value found in ``sources`` replaced by ``[removed]``: the
    whole value and each value of a multi-valued one, as ``str`` gives it and as ``repr`` escapes it (libraries
    quote ``{value!r}``), quoted or not."""
    values: set[str] = set()
    for ds in sources:
        for keyword in _IDENTIFYING:
            value = ds.get(keyword)
            items = [value, *value] if isinstance(value, (list, tuple, MultiValue)) else [value]
            for item in items:
                text = str(item).strip() if item is not None else ""
                # every group's trailing delimiters dropped: a superset of the names padded_names copies trimmed
                trimmed = "=".join(group.rstrip("^") for group in text.split("="))
                values.update(form for t in (text, trimmed) if t for form in (t, repr(t)[1:-1]))
    for value in sorted(values, key=len, reverse=True):
        quoted = [f"'{value}'", f'"{value}"'] + ([value] if len(value) >= 3 else [])
        for form in quoted:
            message = message.replace(form, "[removed]")
    return message


@contextmanager
def converting(step: str, sources: Sequence[Dataset] = ()) -> Iterator[None]:
    """Turn highdicom/pydicom errors raised inside the block into `ResultsError` naming ``step``; the library
    message is kept with any identifying value of ``sources`` scrubbed from it (see `scrub`)."""
    try:
        yield
    except ResultsError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        detail = scrub(str(exc), sources)
        raise ResultsError(f"{step} failed: {type(exc).__name__}: {detail}") from exc


def call(step: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call ``fn`` with errors converted as by `converting`."""
    with converting(step):
        return fn(*args, **kwargs)


_DATE_RE = re.compile(r"^\d{8}\Z")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?\Z")
_AGE_RE = re.compile(r"^\d{3}[DWMY]\Z")


def _valid_date(value: object) -> bool:
    text = str(value).strip()
    if not _DATE_RE.match(text):
        return False
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _valid_time(value: object) -> bool:
    text = str(value).strip()
    if not _TIME_RE.match(text):
        return False
    hh, mm, ss = int(text[:2]), int(text[2:4] or 0), int(text[4:6] or 0)
    return hh < 24 and mm < 60 and ss < 61


# Copied attributes with enumerated values (PS3.3 C.7.1.1, C.7.2.2), whose other values senders do write
# (PregnancyStatus 0, SmokingStatus "N"): copied, each made every result invalid (dciodvfy: "Unrecognized
# enumerated value"). All Type 3: left out.
_ENUMERATED = {
    "PregnancyStatus": ("1", "2", "3", "4"),
    "SmokingStatus": ("YES", "NO", "UNKNOWN"),
    "QualityControlSubject": ("YES", "NO"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
}


def _valid_copied(keyword: str, value: object) -> bool:
    """Whether a value highdicom copies from the sources into the result is valid for its VR (else it is
    replaced by an empty value: a result is never lost because a source attribute is malformed). Each value of a
    multi-valued attribute is checked; how many values it may have is `attributes.malformed_copied`'s check."""
    if isinstance(value, (list, tuple, MultiValue)):
        return all(_valid_copied(keyword, item) for item in value)  # as many as the VM allows (attributes)
    if value is None or value == "":
        return True
    text = str(value)
    if keyword.endswith("Date"):
        return _valid_date(text)
    if keyword.endswith("Time"):
        return _valid_time(text)
    if keyword == "PatientSex":
        return text.strip() in ("M", "F", "O")
    if keyword in _ENUMERATED:
        return text.strip() in _ENUMERATED[keyword]
    if keyword == "PatientAge":
        return bool(_AGE_RE.match(text.strip()))
    limits = {"PatientID": 64, "AccessionNumber": 16, "StudyID": 16}
    if keyword in limits:
        return len(text) <= limits[keyword] and "\\" not in text
    if dictionary_VR(keyword) == "PN":  # up to 3 component groups of up to 5 components (PS3.5 6.2.1.1)
        groups = text.split("=")
        return len(groups) <= 3 and all(len(group) <= 64 and group.count("^") <= 4 for group in groups)
    return True


def with_type2_attributes(sources: Sequence[Dataset]) -> list[Dataset]:
    """``sources`` with the first instance replaced, if needed, by a header-only copy in which the patient/study
    attributes highdicom copies are present (Type 2: empty when absent) and valid for their VR (a malformed value
    — a date like ``19950000``, a two-valued sex — becomes empty; a name padded with empty components is trimmed,
    `attributes.padded_names`), and whose Specific Character Set highdicom
    takes (`attributes.charset_repair`: respelt, or the text decoded and the set made UTF-8); the inputs are not
    modified."""
    first = sources[0]
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in first]
    names = {k: v for k, v in padded_names(first).items() if _valid_copied(k, v)}  # "DOE^JOHN^^^^^" → "DOE^JOHN"
    invalid = [k for k in malformed_copied(first, _valid_copied) if k not in names]  # every attribute copied
    charset = charset_repair(first)
    if not missing and not invalid and not names and charset is None:
        return list(sources)
    header = Dataset()
    for tag in first.keys():  # noqa: SIM118 - raw elements as read: converting a malformed one would raise
        if tag != 0x7FE00010:  # PixelData
            header[tag] = first.get_item(tag)
    if hasattr(first, "file_meta"):
        header.file_meta = first.file_meta
    for keyword in missing + invalid:
        if keyword in _TYPE2_COPIED:
            if keyword in header:
                del header[keyword]  # the malformed element first: setattr would keep its (maybe wrong) VR
            setattr(header, keyword, "")
        elif keyword in header:
            del header[keyword]
    for keyword, name in names.items():
        del header[keyword]  # the source's element, shared: setting its value would change the source
        setattr(header, keyword, name)
    if charset is not None:
        _repair_charset(header, charset)
    return [header, *sources[1:]]


def _repair_charset(header: Dataset, charset: CharsetRepair) -> None:
    """``header`` in the Specific Character Set ``charset`` names, its text decoded first when it is transcoded."""
    if charset.transcode:
        _decode_text(header)  # with the source's own set, before the set changes
        for keyword in _TYPE2_COPIED:
            if keyword not in header:
                setattr(header, keyword, "")  # dropped as unconvertible: Type 2 stays, empty
    if "SpecificCharacterSet" in header:  # absent when the source declared none (`attributes._undeclared_8bit`)
        del header.SpecificCharacterSet  # shared with the source: setting its value would change the source's set
    if charset.values:
        header.SpecificCharacterSet = list(charset.values) if len(charset.values) > 1 else charset.values[0]


def _decode_text(header: Dataset) -> None:
    """Every element of ``header`` converted from its raw bytes with the character set it was sent in (sequence
    items too; `attributes.decoded`); an element whose bytes do not convert, or whose text still holds an escape
    sequence, is dropped, not carried into a result in another set."""
    for tag in list(header.keys()):
        try:
            header[tag] = decoded(header, tag)
        except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not convert
            del header[tag]


def _raw_value(ds: Dataset, keyword: str) -> object:
    """The attribute's value as text, without pydicom's VR conversion raising on malformed bytes."""
    try:
        return ds[keyword].value
    except (ValueError, TypeError, OverflowError):
        return "\x00invalid"


def check_sources(sources: Sequence[Dataset]) -> str:
    """Check the sources are one series of single-frame instances; return its Series Instance UID."""
    if isinstance(sources, Dataset) or len(sources) == 0:
        raise ResultsError("sources must be a non-empty sequence of datasets")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if any(keyword not in ds for ds in sources):
            raise ResultsError(f"a source instance lacks {keyword}")
    series_uid = str(sources[0].SeriesInstanceUID)
    if any(ds.SeriesInstanceUID != series_uid for ds in sources):
        raise ResultsError("sources belong to more than one series")
    if not is_valid_uid(series_uid):
        raise ResultsError("sources carry an invalid SeriesInstanceUID")
    if len({ds.SOPInstanceUID for ds in sources}) != len(sources):
        raise ResultsError("sources hold the same SOP instance more than once")
    return series_uid


def content_datetime_of(
    sources: Sequence[Dataset], content_datetime: dt.datetime | None, fallback: dt.datetime | None = None
) -> dt.datetime:
    """The content date/time for a result: the one given, else the first valid Content, Acquisition, Series or
    Study date (and its time, when valid) of the first source, so the same inputs rebuild the same object; else
    ``fallback`` (the worker passes the series' first receive time, which is stored and so stable across
    retries). Malformed dates and times are passed over, never an error. Raises `ResultsError` only when
    nothing usable is there and no fallback is given."""
    if content_datetime is not None:
        if not isinstance(content_datetime, dt.datetime):
            raise ResultsError("content_datetime must be a datetime.datetime")
        return content_datetime
    first = sources[0]
    for prefix in ("Content", "Acquisition", "Series", "Study"):
        date = _raw_value(first, f"{prefix}Date") if f"{prefix}Date" in first else None
        if not date or not _valid_date(date):
            continue
        day = dt.datetime.strptime(str(date).strip(), "%Y%m%d")
        time = _raw_value(first, f"{prefix}Time") if f"{prefix}Time" in first else None
        if time and _valid_time(time):
            clock = str(time).strip().split(".")[0].ljust(6, "0")
            return day.replace(hour=int(clock[:2]), minute=int(clock[2:4]), second=min(int(clock[4:6]), 59))
        return day
    if fallback is not None:
        if not isinstance(fallback, dt.datetime):
            raise ResultsError("fallback must be a datetime.datetime")
        return fallback.replace(microsecond=0)
    raise ResultsError("sources carry no valid date; pass content_datetime or fallback")


def algorithm_sequence(algorithm: AlgorithmIdentity) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (SEG segment descriptions)."""
    return call(
        "algorithm identification",
        hd.AlgorithmIdentificationSequence,
        name=algorithm.name,
        family=algorithm.family,
        version=algorithm.version,
        source=algorithm.manufacturer,
    )


def algorithm_template(algorithm: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification (SR measurements and groups)."""
    return call(
        "algorithm identification",
        hd.sr.AlgorithmIdentification,
        name=algorithm.name,
        version=algorithm.version,
        family=algorithm.family,
        manufacturer=algorithm.manufacturer,
    )


def observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    """TID 1001 naming the algorithm as the device observer."""
    with converting("observation context"):
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}"[:_LO_MAX],
        )
        return hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
                observer_identifying_attributes=device,
            )
        )


def text_item(name: Code, text: str) -> hd.sr.TextContentItem:
    """A TEXT content item CONTAINed by its parent."""
    return call(
        "text content item",
        hd.sr.TextContentItem,
        name=name,
        value=text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
