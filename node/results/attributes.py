"""Which source attributes reach a result object, and whether each is valid enough to be copied (one boundary).

highdicom copies every root attribute of the Patient and Study modules of the first source (Patient, General
Study, Patient Study, Clinical Trial Subject/Study: PatientWeight, PatientAge, AdmittingDiagnosesDescription ...)
into the SR/SEG as it stands, and its equipment (Manufacturer, InstitutionName ...) into a Contributing Equipment
item. `malformed_copied(ds)` names those that would make the result unwritable or unreadable under strict
validation: a VR other than the dictionary's, bytes that do not decode (or text that still holds an escape
sequence once decoded, `decoded`), more values than the dictionary's VM allows, a value pydicom's own validator
refuses for its VR, a control character in a one-line text (`_valid_value`), a Type 3 sequence that is empty or
whose items lack what they need (`_items_complete`), or a value outside the node's stricter rules
(`content._valid_copied`: real dates, M/F/O, nnnY ages, enumerations). The caller empties (Type 2) or drops them.

highdicom also copies the first source's Specific Character Set and refuses values DICOM allows or senders use:
value 1 empty in a multi-valued set (the usual Japanese ``\\ISO 2022 IR 87``), "ISO_IR 6", Korean "ISO 2022 IR
149" (highdicom 0.28 lists it as IR 159), misspelt terms. `charset_repair(ds)` says what the result carries
instead (`CharsetRepair`); without it every result of such a series fails to build. Text beyond ASCII sent
without a declared set is declared ISO_IR 100, the set pydicom reads it in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName, validate_value

# Beyond what highdicom's module tables name: what the node itself checks by keyword (see content._TYPE2_COPIED).
ALWAYS_CHECKED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)

# What highdicom copies from the first source into each result's Contributing Equipment Sequence
# (`ContributingEquipment.for_image_acquisition`); with a wrong VR (PN, US ...) the result was unwritable.
EQUIPMENT_COPIED = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "InstitutionName",
    "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
)


@functools.cache
def _module_items(sop_class_uid: str) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """(path, keyword, type) of each attribute of the Patient and Study IE modules of ``sop_class_uid``'s IOD
    (highdicom's tables, the ones its ``copy_patient_and_study_information`` walks; path () at the root); () when
    the IOD is unknown to highdicom."""
    try:  # highdicom's own tables (private module, pinned version); fall back to the fixed list
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )

        iod = get_sop_class_iod_map()[sop_class_uid]
        attributes = get_module_attribute_map()
        return tuple(
            (tuple(str(p) for p in item["path"]), str(item["keyword"]), str(item["type"]))
            for module in get_iod_module_map()[iod]
            if module["ie"] in ("Patient", "Study")
            for item in attributes[module["key"]]
        )
    except (ImportError, KeyError):
        return ()


@functools.cache
def _modules_copied(sop_class_uid: str) -> dict[str, str]:
    """Root-level keywords of `_module_items`, each with its type ("1", "2C", "3" ...; the first module naming a
    keyword decides)."""
    types: dict[str, str] = {}
    for path, keyword, kind in _module_items(sop_class_uid):
        if not path:
            types.setdefault(keyword, kind)
    return types


@functools.cache
def _required_in_items(sop_class_uid: str, sequence: str) -> tuple[str, ...]:
    """The Type 1 attributes of each item of the root-level ``sequence`` (`_module_items`)."""
    return tuple(dict.fromkeys(k for path, k, kind in _module_items(sop_class_uid) if path == (sequence,) and kind == "1"))


def copied_keywords(ds: Dataset) -> tuple[str, ...]:
    """The attributes of ``ds`` that reach a result built from it."""
    return tuple(dict.fromkeys((*ALWAYS_CHECKED, *EQUIPMENT_COPIED, *_modules_copied(_sop_class(ds)))))


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID", ""))


def malformed_copied(ds: Dataset, node_rule: Callable[[str, object], bool]) -> list[str]:
    """Keywords among `copied_keywords` present in ``ds`` whose value would not survive strict writing and
    reading (module docstring); ``node_rule(keyword, value)`` adds the node's own rules."""
    malformed = [keyword for keyword in copied_keywords(ds) if keyword in ds and not _valid(ds, keyword, node_rule)]
    if _identity_removed_unexplained(ds, malformed):
        malformed.append("PatientIdentityRemoved")
    return malformed


def padded_names(ds: Dataset) -> dict[str, str]:
    """Keyword → the same name without its trailing empty components, for each single-valued Person Name among
    `copied_keywords` that holds more than five components per group only because it is padded with delimiters
    ("DOE^JOHN^^^^^": some systems write names so). PS3.5 6.2.1.1 lets trailing empty components be omitted, so
    the trimmed name is the same name, valid; blanked as malformed instead, the results would carry an empty
    Patient's Name beside the source's. A name with text in a sixth component is not here (it stays malformed)."""
    names: dict[str, str] = {}
    for keyword in copied_keywords(ds):
        tag = tag_for_keyword(keyword)
        if tag is None or keyword not in ds or dictionary_VR(tag) != "PN":
            continue
        try:
            value = decoded(ds, tag).value
        except Exception:  # noqa: BLE001 - bytes that do not decode are malformed_copied's to judge
            continue
        if not isinstance(value, (str, PersonName)):
            continue
        groups = str(value).split("=")
        if all(group.count("^") <= 4 for group in groups):
            continue
        trimmed = [group.rstrip("^") if group.count("^") > 4 else group for group in groups]
        if all(group.count("^") <= 4 for group in trimmed):
            names[keyword] = "=".join(trimmed)
    return names


_DEIDENTIFICATION_METHODS = ("DeidentificationMethod", "DeidentificationMethodCodeSequence")


def _identity_removed_unexplained(ds: Dataset, malformed: Sequence[str]) -> bool:
    """Whether ``ds`` says Patient Identity Removed YES without a De-identification Method or its Code Sequence
    that reaches the result (one is Type 1C then, PS3.3 C.7.1.1; de-identified public CTs, CQ500's say, lack both):
    copied, the YES made every result an invalid object. Dropping it (Type 3) says nothing false."""
    if "PatientIdentityRemoved" not in ds or "PatientIdentityRemoved" in malformed:
        return False
    try:
        if str(ds.PatientIdentityRemoved).strip().upper() != "YES":
            return False
        return not any(keyword in ds and keyword not in malformed and ds[keyword].value
                       for keyword in _DEIDENTIFICATION_METHODS)
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not decode
        return True


def _valid(ds: Dataset, keyword: str, node_rule: Callable[[str, object], bool]) -> bool:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return True
    raw = ds.get_item(tag)
    expected = dictionary_VR(tag)
    if raw is None:
        return True
    if raw.VR is not None and " or " not in expected and str(raw.VR) not in (expected, "UN"):
        return False  # copied as is, it would carry the wrong VR into the result
    if expected == "SQ":  # the items (OtherPatientIDsSequence's) are left to highdicom
        if raw.VR == "UN" and not _known_once_read(ds, tag):
            return False
        kind = _modules_copied(_sop_class(ds)).get(keyword, "")
        if not _has_items(ds, tag):
            return kind.startswith("2")
        return kind != "3" or _items_complete(ds[tag].value, _required_in_items(_sop_class(ds), keyword))
    try:
        element = decoded(ds, tag)
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not decode for the VR
        return False
    if element.VR == "UN" and expected != "UN":
        return False  # an explicit UN that pydicom leaves UN (config.replace_un_with_known_vr off): unreadable text
    value = element.value
    values = _values(value)
    if not _vm_allows(dictionary_VM(tag), len(values)) or not all(_valid_value(expected, v) for v in values):
        return False
    if isinstance(raw, RawDataElement) and raw.value is not None and b"\x00" in raw.value.rstrip(b"\x00"):
        return False  # an embedded NUL: not a character of any text VR's repertoire
    return node_rule(keyword, value)


def _has_items(ds: Dataset, tag: int) -> bool:
    """Whether the sequence holds an item. Senders write empty Type 3 sequences (Referenced Study, Procedure Code
    ...), which may be absent but not empty ("one or more Items shall be included", PS3.3): copied, each made
    every result invalid (dciodvfy: "Bad Sequence number of Items 0"). Only a Type 2 (2C) one may stay empty."""
    try:
        return len(ds[tag].value) > 0
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not parse as a sequence
        return False


def _items_complete(items: Sequence[Dataset], required: Sequence[str]) -> bool:
    """Whether every item holds a value for each of ``required`` and, as a code item, a Coding Scheme Designator
    with a Code Value or Long Code Value (1C, PS3.3 Table 8.8-1). Senders write items without them (a RIS's
    procedure code without its scheme): copied, such a Type 3 sequence made every result invalid (dciodvfy:
    "Missing attribute Type 1C Conditional Element=<CodingSchemeDesignator>"); it is left out instead."""
    try:
        for item in items:
            if any(keyword not in item or item[keyword].value in (None, "") for keyword in required):
                return False
            if (item.get("CodeValue") or item.get("LongCodeValue")) and not item.get("CodingSchemeDesignator"):
                return False
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not decode for the VR
        return False
    return True


def _known_once_read(ds: Dataset, tag: int) -> bool:
    """Whether an element sent as explicit UN (a sender or converter that did not know the tag: TCIA's CTP writes
    whole headers so) reads as its dictionary VR: pydicom converts it on access (``replace_un_with_known_vr``)."""
    try:
        return str(ds[tag].VR) != "UN"
    except Exception:  # noqa: BLE001 - pydicom raises many types on bytes that do not parse for the VR
        return False


# One-line text VRs whose repertoire has no control character but ESC (PS3.5 Table 6.2-1), which pydicom's validator
# does not check: a TAB, CR/LF or FF sent there (RIS-filled descriptions, institution names) made every result
# invalid (dciodvfy: "Character invalid for this VR"). ESC never reaches here: `decoded` refuses text holding one.
_NO_CONTROL = ("SH", "LO", "UC")


def _valid_value(vr: str, value: object) -> bool:
    """Whether pydicom's validator takes one value for ``vr``, and it holds no control character where ``vr``
    allows none. DS and IS are checked in their text form (the string as received), the only type its validator
    takes for them."""
    if vr in _NO_CONTROL and any(ord(c) < 0x20 for c in str(value)):
        return False
    text = str(value) if isinstance(value, (DSfloat, DSdecimal, IS)) else value
    try:
        validate_value(vr, text, RAISE)
    except Exception:  # noqa: BLE001 - the validator raises ValueError; conversions inside it others
        return False
    return True


def _vm_allows(vm: str, count: int) -> bool:
    """Whether ``count`` values meet a data dictionary VM ("1", "1-3", "1-n", "2-2n" ...); no value always does."""
    if count == 0:
        return True
    first, _, last = vm.partition("-")
    if not last:
        return count == int(first)
    if last.endswith("n"):
        return count >= int(first) and count % int(last[:-1] or 1) == 0
    return int(first) <= count <= int(last)


# ESC $ ) A: GB 2312 designated to G1, the escape sequence of ISO 2022 IR 58 (PS3.3 Table C.12-4; PS3.5 Annex K)
_GB2312 = "\x1b$)A"


def decoded(ds: Dataset, tag: int) -> DataElement:
    """``ds[tag]`` converted from its raw bytes as pydicom converts it (sequence items too), except text sent in
    ISO 2022 IR 58, whose escape sequences are removed: pydicom decodes such a run with Python's gb2312 codec
    (up to the next escape), which passes the designation through as the four ASCII characters it is made of, so
    removing them from the text is removing them from the bytes before gb2312. Raises what pydicom raises on bytes
    that do not convert, and ValueError for text that still holds an escape (ESC, 1BH) then: no character of any
    repertoire once decoded, and never in a UTF-8 value (PS3.5 6.1.2.5.3)."""
    element = ds[tag]
    if element.VR == "SQ":
        for item in element.value:
            for item_tag in list(item.keys()):
                item[item_tag] = decoded(item, item_tag)
        return element
    texts = [v for v in _values(element.value) if isinstance(v, (str, PersonName))]
    if any(_GB2312 in str(v) for v in texts) and "iso_ir_58" in _encodings(ds):
        repaired = [str(v).replace(_GB2312, "") for v in texts]
        element = DataElement(element.tag, element.VR, repaired if len(repaired) > 1 else repaired[0])
        texts = [str(v) for v in _values(element.value)]
    if any("\x1b" in str(v) for v in texts):
        raise ValueError(f"{element.keyword or element.tag} still holds an escape sequence once decoded")
    return element


def _encodings(ds: Dataset) -> list[str]:
    charset = ds._character_set  # pydicom's own reading of the set, inherited by sequence items
    return [charset] if isinstance(charset, str) else list(charset)


UTF8 = "ISO_IR 192"
LATIN1 = "ISO_IR 100"
IR58 = "ISO 2022 IR 58"


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
    holds every character the source's set can; so does ISO 2022 IR 58 (GB 2312), which pydicom writes without
    its escape sequences (its text is decoded by `decoded`). Text beyond ASCII under the default repertoire (no
    set declared, or "ISO_IR 6") gets ISO_IR 100, the set pydicom read it in (`_undeclared_8bit`)."""
    if "SpecificCharacterSet" not in ds:
        return CharsetRepair((LATIN1,), False) if _undeclared_8bit(ds) else None
    try:
        value = ds["SpecificCharacterSet"].value
    except Exception:  # noqa: BLE001 - a malformed element: pydicom decodes its text as the default repertoire
        return CharsetRepair((UTF8,), True)
    given = [str(v).strip() for v in value] if _multi(value) else [str(value or "").strip()]
    values = list(given)
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    if values in ([], [""], ["ISO_IR 6"]):
        return CharsetRepair((LATIN1,), False) if _undeclared_8bit(ds) else CharsetRepair((), False)
    if _highdicom_takes(values) and IR58 not in values:  # pydicom writes IR 58 without its escape sequences
        return None if values == given else CharsetRepair(tuple(values), False)
    return CharsetRepair((UTF8,), True)


def _undeclared_8bit(ds: Dataset) -> bool:
    """Whether a text value among `copied_keywords` (sequence items too) holds a character beyond ASCII although
    ``ds`` declares only the default repertoire. Senders do write Latin-1 so (older modalities, RIS-filled names):
    pydicom reads such bytes as ISO 8859-1, its default encoding, and writes them back the same, so a result
    that only copied them said the default repertoire over 8-bit bytes (dciodvfy: "Character invalid for
    character repertoire"). Declaring ISO_IR 100 keeps the bytes as sent and says how the node read them."""
    for keyword in copied_keywords(ds):
        tag = tag_for_keyword(keyword)
        if tag is None or keyword not in ds:
            continue
        try:
            element = decoded(ds, tag)
        except Exception:  # noqa: BLE001 - bytes that do not decode are malformed_copied's to judge
            continue
        if _beyond_ascii(element):
            return True
    return False


def _beyond_ascii(element: DataElement) -> bool:
    if element.VR == "SQ":
        return any(_beyond_ascii(item[tag]) for item in element.value for tag in item.keys())  # noqa: SIM118
    return any(isinstance(v, (str, PersonName)) and not str(v).isascii() for v in _values(element.value))


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
    return isinstance(value, (list, tuple, MultiValue))


def _values(value: object) -> Sequence[object]:
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


__all__ = [
    "ALWAYS_CHECKED", "EQUIPMENT_COPIED", "IR58", "LATIN1", "UTF8", "CharsetRepair", "charset_repair", "copied_keywords",
    "decoded", "malformed_copied", "padded_names",
]
