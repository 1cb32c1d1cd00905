"""Senders: how dispatch stores a result set at one destination, one implementation per config ``kind``.

`Sender.send(destination, files)` returns once every file is stored, or raises `TransientSendError` (retry later:
peer down or busy, association refused or lost, HTTP 5xx/429, network errors) or `PermanentSendError` (the peer
refuses these objects: retrying the same bytes cannot help). `DimseSender` is a C-STORE SCU over `node.scu`;
`StowSender` stores with STOW-RS through dicomweb-client. A rejection note (`is_withdrawal`) is sent only once
every other object of the delivery is stored. TLS (DICOM TLS with ``tls = true``, an https:// url) is verified
against the destination's ``ca_file`` with `node.tls`; a failed handshake is transient and its reason is in the
error. Errors added to the tree in node/errors.py::

    SendError
    ├── TransientSendError   the destination cannot take the objects now: retry later
    └── PermanentSendError   the destination refuses the objects, or they cannot be read: dead-letter now
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from ssl import SSLContext
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit
from xml.etree import ElementTree

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import TypeAdapter, ValidationError
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage

from node.config import AETitle, Destination, DestinationKind, without_credentials
from node.errors import ConfigError, SendError
from node.logs import get_logger
from node.scu import NoContextAcceptedError, Peer, StoreResult, read_files, send_datasets
from node.tls import destination_tls_args, requests_tls


class TransientSendError(SendError):
    """The destination cannot take the objects now (down, busy, association refused or lost): retry later."""


class PermanentSendError(SendError):
    """The destination refuses the objects themselves, or they cannot be read: retrying the same bytes won't help."""


# -- C-STORE status classes (PS3.4 B.2.3, PS3.7 C) ---------------------------------------------------------------


class StoreOutcome(StrEnum):
    STORED = "stored"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


_SUCCESS = 0x0000
# Warnings (PS3.7 C.4): general warning, attribute list error, attribute value out of range: stored.
_WARNING_CODES = (0x0001, 0x0107, 0x0116)
_WARNINGS = range(0xB000, 0xC000)  # coercion of data elements, elements discarded, dataset mismatch: stored
# The PACS already holds an instance with this UID. Result UIDs are deterministic per (series, version, model,
# kind), so it holds this object (typically from an attempt whose response was lost): stored, logged as a warning.
_DUPLICATE_SOP_INSTANCE = 0x0111
_REFUSED_DATASET_MISMATCH = range(0xA900, 0xAA00)  # dataset does not match SOP class
_CANNOT_UNDERSTAND = range(0xC000, 0xD000)
_SOP_CLASS_NOT_SUPPORTED = 0x0122
_INVALID_OBJECT_INSTANCE = 0x0117


def classify_store_status(status: int) -> StoreOutcome:
    """What a C-STORE response status (or a STOW-RS Failure Reason) means for a delivery.

    Stored: 0x0000, the warnings 0x0001, 0x0107, 0x0116 and 0xB000-0xBFFF, and 0x0111 duplicate SOP instance.
    Permanent (the objects are refused; resending the same bytes cannot help): 0xA9xx, 0xCxxx, 0x0122 SOP class not
    supported, 0x0117 invalid object instance. Everything else is transient: 0xA7xx out of resources, 0x0213
    resource limitation, 0x0110 processing failure, unknown codes.
    """
    if status in (_SUCCESS, _DUPLICATE_SOP_INSTANCE, *_WARNING_CODES) or status in _WARNINGS:
        return StoreOutcome.STORED
    if (
        status in _REFUSED_DATASET_MISMATCH
        or status in _CANNOT_UNDERSTAND
        or status in (_SOP_CLASS_NOT_SUPPORTED, _INVALID_OBJECT_INSTANCE)
    ):
        return StoreOutcome.PERMANENT
    return StoreOutcome.TRANSIENT


def check_store_results(results: Sequence[StoreResult], expected: int, peer: str, *,
                        unanswered: str = "no C-STORE response", destination: str | None = None) -> None:
    """Raise unless all ``expected`` instances were stored; `PermanentSendError` if any was refused for good (a failure
    status of the permanent class, or no presentation context accepted for its SOP class/transfer syntax). Errors
    begin with ``peer``; a result without a status reads ``unanswered``. A duplicate SOP instance counts as stored
    and is logged as a warning naming ``destination`` (``peer`` when not given)."""
    permanent: list[str] = []
    transient: list[str] = []
    for result in results:
        if result.not_accepted:
            permanent.append(f"{result.sop_uid}: not accepted (no presentation context for its class)")
            continue
        if result.status is None:
            transient.append(f"{result.sop_uid}: {unanswered}")
            continue
        outcome = classify_store_status(result.status)
        if outcome is StoreOutcome.PERMANENT:
            permanent.append(f"{result.sop_uid}: status 0x{result.status:04X}")
        elif outcome is StoreOutcome.TRANSIENT:
            transient.append(f"{result.sop_uid}: status 0x{result.status:04X}")
        elif result.status == _DUPLICATE_SOP_INSTANCE:
            get_logger(component="senders").warning("instance_already_stored", sop_uid=result.sop_uid,
                                                    destination=destination or peer)
    if len(results) < expected:
        transient.append(f"association ended after {len(results)} of {expected} instances")
    if permanent:
        raise PermanentSendError(f"{peer} refused " + "; ".join(permanent + transient))
    if transient:
        raise TransientSendError(f"{peer} did not store " + "; ".join(transient))


# -- withdrawals --------------------------------------------------------------------------------------------------

# Document titles (CID 7010) of an IHE IOCM rejection note: storing one withdraws the instances it references.
# The key-images note ("For Referring Provider", 113002) is a KOS too, but withdraws nothing.
_REJECTION_TITLES = frozenset((code.scheme_designator, code.value) for code in (
    codes.DCM.RejectedForQualityReasons, codes.DCM.RejectedForPatientSafetyReasons,
    codes.DCM.IncorrectModalityWorklistEntry, codes.DCM.DataRetentionPolicyExpired))


def is_withdrawal(ds: Dataset) -> bool:
    """Whether ``ds`` is a rejection note: a Key Object Selection Document whose concept name is a rejection title
    (113001, 113037, 113038, 113039 DCM), as `node.results.kos.build_rejection_kos` builds."""
    if str(ds.get("SOPClassUID", "")) != KeyObjectSelectionDocumentStorage:
        return False
    return any((str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", ""))) in _REJECTION_TITLES
               for item in ds.get("ConceptNameCodeSequence") or [])


NOTE_HELD = ("the rejection note withdrawing the previous version was not sent, so that version's result stays at "
             "the destination beside what it stored of this one")


def _store_withdrawals_last(datasets: Sequence[Dataset], store: Callable[[Sequence[Dataset]], None]) -> None:
    """Store ``datasets`` with ``store``, the rejection notes in a second call once everything else is stored, or an
    IOCM-aware PACS withdraws the previous complete result while the new one is incomplete. When the first call
    fails with notes held back, its error says so (`NOTE_HELD`): a delivery that dies there leaves two versions'
    results at the PACS, which the operator must know."""
    notes = [ds for ds in datasets if is_withdrawal(ds)]
    rest = [ds for ds in datasets if not is_withdrawal(ds)]
    if rest:
        try:
            store(rest)
        except SendError as exc:
            if not notes:
                raise
            kind = PermanentSendError if isinstance(exc, PermanentSendError) else TransientSendError
            raise kind(f"{exc}; {NOTE_HELD}") from exc
    if notes:
        store(notes)


# -- senders ------------------------------------------------------------------------------------------------------


class Sender(abc.ABC):
    """Stores one result set at one destination: the seam between dispatch and the network (fakes in unit tests)."""

    @abc.abstractmethod
    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        """Store every file at ``destination``; return only when all are stored.

        Raises `TransientSendError` when a later attempt may succeed, `PermanentSendError` when it cannot. Any other
        `SendError` counts as transient.
        """


def _read_results(files: Sequence[Path]) -> list[Dataset]:
    """Read the result files to send; a missing or unreadable one is a `PermanentSendError` (resending can't help)."""
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PermanentSendError(f"result file missing: {', '.join(missing)}")
    try:
        return read_files(paths)
    except SendError as exc:
        raise PermanentSendError(str(exc)) from exc


_AE_TITLE = TypeAdapter(AETitle)


class DimseSender(Sender):
    """C-STORE SCU over `node.scu`: one association per delivery, each file with its own SOP class and transfer
    syntax; a rejection note goes on a second association, only once every other object was stored. Association
    refused, rejected, aborted or timed out → transient; none of a batch's SOP classes accepted → permanent; status
    classes as in `classify_store_status`; a missing or unreadable result file → permanent."""

    def __init__(self, calling_ae: str, timeout: float) -> None:
        try:
            self.calling_ae = _AE_TITLE.validate_python(calling_ae)
        except ValidationError as exc:
            raise ValueError(f"calling_ae: {exc.errors()[0]['msg']}") from None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        if destination.kind is not DestinationKind.DIMSE:
            raise PermanentSendError(f"DimseSender cannot send to a {destination.kind.value!r} destination")
        assert destination.ae_title and destination.host and destination.port  # config validates dimse ones
        datasets = _read_results(files)
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        peer = Peer(
            destination.host,
            destination.port,
            called_ae=destination.ae_title,
            calling_ae=self.calling_ae,
            timeout=self.timeout,
            tls_args=self._tls_args(destination),
        )

        def store(datasets: Sequence[Dataset]) -> None:
            try:
                results = send_datasets(peer, datasets)
            except NoContextAcceptedError as exc:  # the PACS takes none of these SOP classes: a configuration matter
                raise PermanentSendError(str(exc)) from exc
            except SendError as exc:
                raise TransientSendError(str(exc)) from exc
            check_store_results(results, len(datasets), where)

        _store_withdrawals_last(datasets, store)

    @staticmethod
    def _tls_args(destination: Destination) -> tuple[SSLContext, str] | None:
        """Built per delivery, so a renewed CA file is read anew; one that no longer loads is transient (someone
        fixes the file, the delivery goes on)."""
        try:
            return destination_tls_args(destination)
        except ConfigError as exc:
            raise TransientSendError(str(exc)) from exc


class _StowSession(requests.Session):
    """A requests session for one STOW-RS request: it never follows a redirect (requests would turn the POST into a
    GET and a login page's 200 would pass for a store) and keeps the last response, whose body the sender reads
    itself (dicomweb-client decodes it only when the media type has no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.response: requests.Response | None = None

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["allow_redirects"] = False
        # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the
        # environment replace a session's `verify` (psf/requests#3829), and the destination's CA must win.
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("cert", self.cert)
        self.response = super().request(*args, **kwargs)
        return self.response


class StowSender(Sender):
    """STOW-RS through dicomweb-client to ``destination.url`` + ``/studies``, with the destination's bearer token when
    set, each request bounded by ``timeout``: one POST per delivery, or two when it carries a rejection note (the
    note goes alone, only once the first POST stored everything else).

    Stored only when the answer is 200 or 202 with a Store Instances Response (DICOM JSON or XML) whose
    ReferencedSOPSequence names every instance sent, or whose FailedSOPSequence names them with reasons that count
    as stored (`classify_store_status`: a duplicate SOP instance); failure reasons decide otherwise, like C-STORE
    statuses. Network errors, timeouts, redirects (never followed), another 2xx or one without a Store Instances
    Response, HTTP 5xx, 408, 429, and 401/403/404 (a credential or URL someone fixes) → transient; other 4xx (400,
    409 conflict, 413, 415) → permanent."""

    def __init__(self, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        if destination.kind is not DestinationKind.DICOMWEB or destination.url is None:
            raise PermanentSendError(f"StowSender cannot send to a {destination.kind.value!r} destination")
        _store_withdrawals_last(_read_results(files), lambda batch: self._store(destination, batch))

    def _store(self, destination: Destination, datasets: Sequence[Dataset]) -> None:
        """One STOW-RS POST of ``datasets``; returns when the answer says every one is stored, else raises."""
        assert destination.url is not None
        headers = {}
        if destination.token is not None:
            headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
        session = _StowSession()
        if destination.uses_tls:
            session.verify, session.cert = requests_tls(destination)
        client = DICOMwebClient(url=destination.url.rstrip("/"), headers=headers, session=session,
                                timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # the dispatcher owns retries (backoff, give-up, dead-letter)
        where = destination.shown_url or ""
        try:
            client.store_instances(datasets)
        except requests.HTTPError as exc:
            _refused(exc, datasets, where)
            return  # a 409 naming every instance as one the PACS holds already
        except requests.exceptions.SSLError as exc:
            raise TransientSendError(f"{where} TLS handshake failed: {_ssl_reason(exc)}") from exc
        except requests.Timeout as exc:
            raise TransientSendError(f"{where} gave no answer within {self.timeout:g} s") from exc
        except Exception as exc:  # noqa: BLE001 - dicomweb-client failed to decode an answer: judged below
            if session.response is None:
                if isinstance(exc, requests.RequestException):
                    raise TransientSendError(f"{where} unreachable: {type(exc).__name__}") from exc
                raise
        finally:
            session.close()  # a pooled keep-alive connection would otherwise linger until collected
        assert session.response is not None
        _check_answer(session.response, datasets, where)


def _refused(exc: requests.HTTPError, datasets: Sequence[Dataset], where: str) -> None:
    """Raise the error for an HTTP 4xx/5xx answer to a STOW-RS POST. A 409 (none stored, PS3.18) whose Store
    Instances Response names the failed instances is classified by their reasons; all of them duplicates of
    instances the PACS holds → stored (returns)."""
    code = exc.response.status_code if exc.response is not None else 0
    message = f"{where} answered HTTP {code}"
    if code >= 500 or code in (401, 403, 404, 408, 429):
        raise TransientSendError(message) from exc
    if code == 409 and exc.response is not None:
        try:
            referenced, failed = _store_response(exc.response)
        except ValueError:  # no body, HTML, malformed: the HTTP status alone decides
            failed = []
        if failed:
            _check_accounted(referenced, failed, datasets, where, f"{message}:")
            return
    raise PermanentSendError(message) from exc


def _check_answer(http: requests.Response, datasets: Sequence[Dataset], where: str) -> None:
    """Return when a non-error answer to a STOW-RS POST stored every one of ``datasets``, else raise."""
    code = http.status_code
    if 300 <= code < 400:
        location = http.headers.get("Location")
        to = f" to {redirect_target(http.url, location)}" if location else ""
        raise TransientSendError(f"{where} answered HTTP {code}, a redirect{to} (not followed): not stored")
    if code not in (200, 202):
        raise TransientSendError(f"{where} answered HTTP {code} without a Store Instances Response: not stored")
    try:
        referenced, failed = _store_response(http)
    except ValueError as exc:
        raise TransientSendError(
            f"{where} answered HTTP {code} without a Store Instances Response ({exc}): not stored") from exc
    _check_accounted(referenced, failed, datasets, where, where)


def _check_accounted(referenced: set[str], failed: list[StoreResult], datasets: Sequence[Dataset], where: str,
                     message: str) -> None:
    """Raise (an error beginning with ``message``) unless every instance of ``datasets`` is referenced as stored or
    failed as a duplicate of one the PACS holds (0x0111); an instance the response names in neither sequence is
    transient. Every other FailedSOPSequence item was not stored (PS3.18: warnings go in ReferencedSOPSequence), so a
    reason C-STORE would count as stored (0x0000, 0x0001, 0xBxxx: vendor codes) is a processing failure here."""
    named = referenced | {result.sop_uid for result in failed}
    missing = [StoreResult(str(ds.SOPInstanceUID), None) for ds in datasets if str(ds.SOPInstanceUID) not in named]
    results = [r if r.status == _DUPLICATE_SOP_INSTANCE or classify_store_status(int(r.status or 0)) is not
               StoreOutcome.STORED else StoreResult(r.sop_uid, _PROCESSING_FAILURE) for r in failed] + missing
    check_store_results(results, len(results), message, unanswered="not in the Store Instances Response",
                        destination=where)


# -- Store Instances Response (PS3.18 10.5.3) ---------------------------------------------------------------------

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_PROCESSING_FAILURE = 0x0110  # the Failure Reason of a failed item without one


def _store_response(http: requests.Response) -> tuple[set[str], list[StoreResult]]:
    """(the SOP Instance UIDs stored, the failed ones with their Failure Reasons) from the body of a STOW-RS answer,
    DICOM JSON or XML whatever the media type's parameters (``charset=utf-8``). Raises `ValueError` naming why the
    body is no Store Instances Response."""
    media_type = http.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not http.content:
        raise ValueError("empty body")
    try:
        if media_type in ("application/dicom+json", "application/json"):
            return _from_json(http.json())
        if media_type in ("application/dicom+xml", "application/xml"):
            return _from_xml(ElementTree.fromstring(http.content))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, ElementTree.ParseError) as exc:
        raise ValueError(f"malformed {media_type} body") from exc
    raise ValueError(f"{media_type or 'no media type'} body")


def _from_json(body: Any) -> tuple[set[str], list[StoreResult]]:
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        raise ValueError("not a DICOM JSON object")
    ds = Dataset.from_json(body)
    referenced = {str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence") or []}
    failed = [StoreResult(str(item.ReferencedSOPInstanceUID), int(item.get("FailureReason", _PROCESSING_FAILURE)))
              for item in ds.get("FailedSOPSequence") or []]
    return referenced, failed


def _from_xml(root: ElementTree.Element) -> tuple[set[str], list[StoreResult]]:
    """The PS3.19 Native DICOM Model (with or without its namespace)."""
    def attribute(parent: ElementTree.Element, tag: str) -> ElementTree.Element | None:
        return next((a for a in parent.findall("{*}DicomAttribute") if a.get("tag", "").upper() == tag), None)

    def items(tag: str) -> list[ElementTree.Element]:
        found = attribute(root, tag)
        return [] if found is None else found.findall("{*}Item")

    def value(item: ElementTree.Element, tag: str) -> str:
        found = attribute(item, tag)
        text = None if found is None else found.findtext("{*}Value")
        if text is None:
            raise ValueError(f"an item without ({tag[:4]},{tag[4:]})")
        return text.strip()

    referenced = {value(item, _REFERENCED_SOP_INSTANCE_UID) for item in items(_REFERENCED_SOP_SEQUENCE)}
    failed = [StoreResult(value(item, _REFERENCED_SOP_INSTANCE_UID),
                          int(value(item, _FAILURE_REASON)) if attribute(item, _FAILURE_REASON) is not None
                          else _PROCESSING_FAILURE)
              for item in items(_FAILED_SOP_SEQUENCE)]
    return referenced, failed


def redirect_target(url: str | None, location: str) -> str:
    """A redirect's target as an error shows it: absolute, without credentials, query or fragment."""
    parts = urlsplit(urljoin(url or "", location))
    return without_credentials(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


def _ssl_reason(exc: BaseException) -> str:
    """The OpenSSL reason inside a requests `SSLError` (e.g. ``certificate verify failed: self-signed certificate
    in certificate chain``), which urllib3 buries in a long retry message."""
    found = re.search(r"\[SSL: [A-Z_]+\] ([^(']+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__
