"""Build the node's Key Object Selection documents: the key-images note sent with a verdict, and the IHE IOCM
rejection note that withdraws superseded result objects.

`build_key_images_kos` names the slices that drove the classifier's verdict (titled "For Referring Provider",
113002) and the SR stating it; the SR names the note in turn (a note and its evidence), so a viewer or a person
reading either finds the other. The rest of these notes is about the rejection note (`build_rejection_kos`).

When a late instance forces a new result version, the SR and SEG of the version it replaces are withdrawn with an
IOCM "Rejection Note" (IHE RAD TF Imaging Object Change Management, transaction RAD-66 Rejection Note Stored) sent
to the same destinations. What this module relies on, and how it meets it:

- The note is a Key Object Selection Document (SOP class 1.2.840.10008.5.1.4.1.1.88.59, modality KO) built by
  highdicom's `hd.ko.KeyObjectSelectionDocument` with TID 2010 content (`hd.ko.KeyObjectSelection`).
- Its document title (root concept name, from CID 7010) is (113001, DCM, "Rejected for Quality Reasons"): an IOCM
  Image Manager (dcm4chee-arc: `StoreServiceEJB`, which matches a stored KO's ConceptNameCodeSequence against its
  configured rejection codes) hides the referenced instances on receipt.
- It lies in the study of the instances it rejects (one study per note), with the Patient and General Study
  modules copied from them, in a series of its own (never one of the rejected series).
- It references exactly the rejected instances, each both in the Current Requested Procedure Evidence Sequence
  (study → series → SOP class/instance; the list the Image Manager acts on) and as a CONTAINS item in the content
  tree (IMAGE for the SEG, COMPOSITE for the SR, as highdicom chooses by the presence of Rows/Columns).
- TID 2010 rows left optional and how they are used: no Document Title Modifier (the CID 7011 quality reasons -
  artefacts, exposure, positioning, equipment failures - do not describe a superseded version, and the modifier
  is optional for this title); a Key Object Description (113012, DCM) says in words why the objects are withdrawn,
  without patient data; a device observer context names the algorithm, as in the SR.
- The note is deterministic: UIDs from `result_uid` (kinds KOS and KOS_SERIES of the new version), content date
  and time from the caller or from the rejected objects, and none of the clock-based Type 3 attributes highdicom
  adds (Instance Creation Date/Time, Contribution DateTime), so the same inputs give the same bytes and a retried
  delivery stores the same instance again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from node.results import codes
from node.results.codes import ResultKind
from node.results.content import AlgorithmIdentity, converting, with_type2_attributes
from node.results.errors import ResultsError
from node.results.uids import is_valid_uid, result_uid

_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_LO_MAX = 64
# The content date/time when neither the caller nor any rejected object gives a readable one: fixed, so a rebuild
# is still byte-identical (ContentDate/ContentTime are Type 1 in the Key Object Document module).
FALLBACK_DATETIME = dt.datetime(1970, 1, 1)


def _references(superseded: Sequence[Dataset]) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP instance, SOP class) UIDs of each rejected object; raises `ResultsError` naming the item
    and attribute that is missing or invalid (never its value)."""
    if isinstance(superseded, Dataset) or not isinstance(superseded, Sequence) or len(superseded) == 0:
        raise ResultsError("superseded must be a non-empty sequence of datasets")
    references = []
    for n, ds in enumerate(superseded):
        if not isinstance(ds, Dataset):
            raise ResultsError(f"superseded[{n}] must be a pydicom Dataset, got {type(ds).__name__}")
        values = []
        for keyword in _REFERENCE_KEYWORDS:
            if keyword not in ds:
                raise ResultsError(f"superseded[{n}] lacks {keyword}")
            try:
                value = ds[keyword].value
            except (ValueError, TypeError) as exc:  # strict reading refuses a malformed UI value on access
                raise ResultsError(f"superseded[{n}] carries an invalid {keyword}") from exc
            if not is_valid_uid(value):
                raise ResultsError(f"superseded[{n}] carries an invalid {keyword}")
            values.append(str(value))
        references.append((values[0], values[1], values[2], values[3]))
    if len({ref[0] for ref in references}) > 1:
        raise ResultsError(
            "superseded objects belong to more than one study (a rejection note covers one study)"
        )
    if len({ref[2] for ref in references}) != len(references):
        raise ResultsError("superseded holds the same SOP instance more than once")
    return references


def _datetime_of(ds: Dataset, prefix: str) -> dt.datetime | None:
    """``ds``'s <prefix>Date/<prefix>Time as a datetime (to the second), or None if absent or unreadable."""
    try:
        date, time = ds.get(f"{prefix}Date"), ds.get(f"{prefix}Time")
        if not date:
            return None
        day = dt.datetime.strptime(str(date), "%Y%m%d")
        clock = str(time or "").split(".")[0]
        if len(clock) not in (0, 2, 4, 6) or not (clock.isdigit() or clock == ""):
            return None
        clock = clock.ljust(6, "0")
        return day.replace(hour=int(clock[:2]), minute=int(clock[2:4]), second=int(clock[4:6]))
    except (ValueError, TypeError, OverflowError):  # malformed; strict reading raises on access too
        return None


def _content_datetime(superseded: Sequence[Dataset], given: dt.datetime | None) -> dt.datetime:
    """``given``; else the latest readable Content date/time of the rejected objects; else their latest Study
    date/time; else `FALLBACK_DATETIME`. Never fails for a missing or malformed date."""
    if given is not None:
        if not isinstance(given, dt.datetime):
            raise ResultsError("content_datetime must be a datetime.datetime")
        return given
    for prefix in ("Content", "Study"):
        found = [when for ds in superseded if (when := _datetime_of(ds, prefix)) is not None]
        if found:
            return max(found)
    return FALLBACK_DATETIME


def _observer(algorithm: AlgorithmIdentity) -> hd.sr.ObserverContext:
    """TID 1002 naming the algorithm as the device observer (the same identity as in the SR)."""
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}"[:_LO_MAX],
        ),
    )


def build_rejection_kos(
    superseded: Sequence[Dataset],
    algorithm: AlgorithmIdentity,
    *,
    source_series_uid: str,
    series_version: int,
    content_datetime: dt.datetime | None = None,
) -> Dataset:
    """Return the IOCM rejection note (KOS titled "Rejected for Quality Reasons") withdrawing ``superseded``.

    ``superseded`` are the result objects (SR, SEG) of an earlier version as written, all from one study; the note
    lies in that study, in its own series, and references exactly them. ``series_version`` is the new version that
    replaces them (>= 2); with ``source_series_uid`` and the algorithm it determines the note's UIDs and series
    number. The content date/time is ``content_datetime``, else taken from ``superseded`` (see `_content_datetime`).
    The order of ``superseded`` does not matter: the same objects always give the same bytes.
    Raises `ResultsError` naming the problem; its message never carries patient values.
    """
    if not isinstance(algorithm, AlgorithmIdentity):
        raise ResultsError(f"algorithm must be an AlgorithmIdentity, got {type(algorithm).__name__}")
    if isinstance(series_version, bool) or not isinstance(series_version, int) or series_version < 2:
        raise ResultsError(
            f"series_version must be an int >= 2 (the version that replaces the superseded objects), "
            f"got {series_version!r}"
        )
    references = _references(superseded)
    # Sorted by (series, instance): the document, its evidence and the copied patient/study header do not depend
    # on the order the caller read the files in.
    order = sorted(range(len(references)), key=lambda i: (references[i][1], references[i][2]))
    objects = [superseded[i] for i in order]
    when = _content_datetime(objects, content_datetime)

    def uid(kind: ResultKind) -> str:
        return result_uid(source_series_uid, series_version, algorithm.model_key, kind, algorithm.uid_root)

    series_uid, sop_uid = uid(ResultKind.KOS_SERIES), uid(ResultKind.KOS)
    if any(ref[1] == series_uid for ref in references):
        raise ResultsError(
            "superseded objects lie in the rejection note's own series (pass the objects of an earlier version)"
        )
    description = (
        f"AI results withdrawn: superseded by version {series_version} of the results for this series "
        f"({algorithm.model_key})"
    )
    return _document(
        "building the rejection note", codes.REJECTED_FOR_QUALITY_REASONS, objects, with_type2_attributes(objects),
        algorithm, description=description, series_uid=series_uid, sop_uid=sop_uid,
        series_number=codes.versioned_number(codes.KOS_SERIES_NUMBER, series_version), instance_number=1,
        series_description=codes.KOS_SERIES_DESCRIPTION, when=when,
    )


def _document(
    what: str, title: Code, objects: Sequence[Dataset], evidence: Sequence[Dataset], algorithm: AlgorithmIdentity,
    *, description: str, series_uid: str, sop_uid: str, series_number: int, instance_number: int,
    series_description: str, when: dt.datetime,
) -> Dataset:
    """A KOS titled ``title`` referencing ``objects`` (TID 2010, the algorithm as device observer), without the
    clock-based Type 3 attributes highdicom adds, so the same inputs give the same bytes."""
    with converting(what, objects):
        content = hd.ko.KeyObjectSelection(
            document_title=hd.sr.CodedConcept.from_code(title),
            referenced_objects=list(objects),
            observer_device_context=_observer(algorithm),
            description=description,
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=list(evidence),
            content=content,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            series_description=series_description,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    return _without_clock_attributes(kos)


def _without_clock_attributes(kos: Dataset) -> Dataset:
    """Drop the Type 3 attributes highdicom takes from the clock, so a rebuild is byte-identical."""
    del kos.InstanceCreationDate, kos.InstanceCreationTime
    for item in kos.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return kos


def build_key_images_kos(
    sources: Sequence[Dataset],
    key: Sequence[int],
    sr: Dataset,
    algorithm: AlgorithmIdentity,
    *,
    series_uid: str,
    sop_uid: str,
    series_version: int,
    when: dt.datetime,
) -> Dataset:
    """Return the key-images note for a radiologist: a KOS titled "For Referring Provider" (113002) in the source
    study, naming the slices ``sources[i] for i in key`` (the classifier's highest attention, highest first) and
    the ``sr`` that states the verdict, with a description saying why they were chosen and that the AI is not for
    clinical use. UIDs, series number and content date/time come from the caller (the SR's), so the same inputs
    give the same bytes. Raises `ResultsError`; its message never carries patient values."""
    if not key or len(set(key)) != len(key) or not all(0 <= i < len(sources) for i in key):
        raise ResultsError(f"key must name distinct slices of the {len(sources)} sources")
    objects = [sources[i] for i in key] + [sr]
    description = (
        f"Key images: the {len(key)} slices that weighed most in the AI's pneumonia assessment (highest attention "
        f"first), with its report. {algorithm.name} {algorithm.version}. Not for clinical use."
    )
    return _document(
        "building the key-images note", codes.FOR_REFERRING_PROVIDER, objects,
        [*with_type2_attributes([sources[i] for i in key]), sr], algorithm, description=description,
        series_uid=series_uid, sop_uid=sop_uid,
        series_number=codes.versioned_number(codes.KEY_IMAGES_SERIES_NUMBER, series_version),
        instance_number=max(int(series_version), 1), series_description=codes.KEY_IMAGES_SERIES_DESCRIPTION,
        when=when,
    )
