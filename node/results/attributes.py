"""Which source attributes reach a result object, and whether each is valid enough to be copied (one boundary).

highdicom copies every root attribute of the Patient and Study modules of the first source (Patient, General
Study, Patient Study, Clinical Trial Subject/Study: PatientWeight, PatientAge, AdmittingDiagnosesDescription ...)
into the SR/SEG as it stands. `malformed_copied(ds)` names those that would make the result unwritable or
unreadable under strict validation: a VR other than the dictionary's, bytes that do not decode, several values
where one is allowed, a value pydicom's own validator refuses for its VR, or a value outside the node's stricter
rules (`content._valid_copied`: real dates, M/F/O, nnnY ages). The caller empties (Type 2) or drops them.

highdicom also copies the first source's Specific Character Set and refuses values DICOM allows or senders use:
value 1 empty in a multi-valued set (the usual Japanese ``\\ISO 2022 IR 87``), "ISO_IR 6", Korean "ISO 2022 IR
149" (highdicom 0.28 lists it as IR 159), misspelt terms. `charset_repair(ds)` says what the result carries
instead (`CharsetRepair`); without it every result of such a series fails to build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.valuerep import validate_value

# Beyond what highdicom's module tables name: what the node itself checks by keyword (see content._TYPE2_COPIED).
ALWAYS_CHECKED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)


@functools.cache
def _modules_copied(sop_class_uid: str) -> tuple[str, ...]:
    """Root-level keywords of the Patient and Study IE modules of ``sop_class_uid``'s IOD (highdicom's tables,
    the ones its ``copy_patient_and_study_information`` walks); () when the IOD is unknown to highdicom."""
    try:  # highdicom's own tables (private module, pinned version); fall back to the fixed list
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )

        iod = get_sop_class_iod_map()[sop_class_uid]
        attributes = get_module_attribute_map()
        keywords = [
            str(item["keyword"])
            for module in get_iod_module_map()[iod]
            if module["ie"] in ("Patient", "Study")
            for item in attributes[module["key"]]
            if len(item["path"]) == 0
        ]
    except (ImportError, KeyError):
        return ()
    return tuple(dict.fromkeys(keywords))


def copied_keywords(ds: Dataset) -> tuple[str, ...]:
    """The attributes of ``ds`` that reach a result built from it."""
    return tuple(dict.fromkeys((*ALWAYS_CHECKED, *_modules_copied(str(ds.get("SOPClassUID", ""))))))


def malformed_copied(ds: Dataset, node_rule: Callable[[str, object], bool]) -> list[str]:
    """Keywords among `copied_keywords` present in ``ds`` whose value would not survive strict writing and
    reading (module docstring); ``node_rule(keyword, value)`` adds the node's own rules."""
    return [keyword for keyword in copied_keywords(ds) if keyword in ds and not _valid(ds, keyword, node_rule)]


def _valid(ds: Dataset, keyword: str, node_rule: Callable[[str, object], bool]) -> bool:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return True
    raw = ds.get_item(tag)
    expected = dictionary_VR(tag)
    if raw is None:
        return True
    if raw.VR is not None and " or " not in expected and str(raw.VR) != expected:
        return False  # copied as is, it would carry the wrong VR into the result
    if expected == "SQ":
        return True  # sequences (e.g. OtherPatientIDsSequence) are left to highdicom
    try:
        value = ds[tag].value
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not decode for the VR
        return False
    values: Iterable[object] = value if _multi(value) else [value]
    if _multi(value) and dictionary_VM(tag) == "1":
        return False
    try:
        for item in values:
            validate_value(expected, item, RAISE)
    except Exception:  # noqa: BLE001 - the validator raises ValueError; conversions inside it others
        return False
    if isinstance(raw, RawDataElement) and raw.value is not None and b"\x00" in raw.value.rstrip(b"\x00"):
        return False  # an embedded NUL: not a character of any text VR's repertoire
    return node_rule(keyword, value)


UTF8 = "ISO_IR 192"


@dataclass(frozen=True)
class CharsetRepair:
    """The Specific Character Set a result carries instead of its source's: ``values`` () for the default
    repertoire (no attribute); ``transcode`` when the source's text must first be decoded with its own set (the
    result is then written in UTF-8), False when ``values`` is only a spelling of the same set."""

    values: tuple[str, ...]
    transcode: bool


def charset_repair(ds: Dataset) -> CharsetRepair | None:
    """None when highdicom takes ``ds``'s Specific Character Set as it stands (or it is absent); else the repair.
    Value 1 empty in a multi-valued set is ISO 2022 IR 6 (PS3.3 C.12.1.1.2), and "ISO_IR 6" or an empty value
    alone is the default repertoire: those are respelt. Anything else highdicom refuses becomes UTF-8, which
    holds every character the source's set can."""
    if "SpecificCharacterSet" not in ds:
        return None
    try:
        value = ds["SpecificCharacterSet"].value
    except Exception:  # noqa: BLE001 - a malformed element: pydicom decodes its text as the default repertoire
        return CharsetRepair((UTF8,), True)
    given = [str(v).strip() for v in value] if _multi(value) else [str(value or "").strip()]
    values = list(given)
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    if values in ([], [""], ["ISO_IR 6"]):
        return CharsetRepair((), False)
    if _highdicom_takes(values):
        return None if values == given else CharsetRepair(tuple(values), False)
    return CharsetRepair((UTF8,), True)


def _highdicom_takes(values: list[str]) -> bool:
    try:  # highdicom's own rule, the one its SR/SEG/KOS constructors apply (private module, pinned version)
        from highdicom.valuerep import _check_specific_character_set
    except ImportError:
        return values == [UTF8]
    try:
        _check_specific_character_set(values[0] if len(values) == 1 else values)
    except ValueError:
        return False
    return True


def _multi(value: object) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


__all__ = ["ALWAYS_CHECKED", "UTF8", "CharsetRepair", "charset_repair", "copied_keywords", "malformed_copied"]
