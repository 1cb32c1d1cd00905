"""Senders: how dispatch stores a result set at one destination, one implementation per config ``kind``.

`Sender.send(destination, files)` returns once every file is stored, or raises `TransientSendError` (retry later:
peer down or busy, association refused or lost, HTTP 5xx/429, network errors) or `PermanentSendError` (the peer
refuses these objects: retrying the same bytes cannot help). `DimseSender` is a C-STORE SCU over `node.scu`;
`StowSender` stores with STOW-RS through dicomweb-client. TLS (DICOM TLS with ``tls = true``, an https:// url) is
verified against the destination's ``ca_file`` with `node.tls`; a failed handshake is transient and its reason is
in the error. Errors added to the tree in node/errors.py::

    SendError
    ├── TransientSendError   the destination cannot take the objects now: retry later
    └── PermanentSendError   the destination refuses the objects, or they cannot be read: dead-letter now
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from ssl import SSLContext
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import TypeAdapter, ValidationError
from pydicom import Dataset

from node.config import AETitle, Destination, DestinationKind
from node.errors import ConfigError, SendError
from node.scu import Peer, StoreResult, read_files, send_datasets
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
_WARNING = 0x0001  # general warning (PS3.7 C.4)
_WARNINGS = range(0xB000, 0xC000)  # coercion of data elements, elements discarded, dataset mismatch: stored
_REFUSED_DATASET_MISMATCH = range(0xA900, 0xAA00)  # dataset does not match SOP class
_CANNOT_UNDERSTAND = range(0xC000, 0xD000)
_SOP_CLASS_NOT_SUPPORTED = 0x0122
_INVALID_OBJECT_INSTANCE = 0x0117


def classify_store_status(status: int) -> StoreOutcome:
    """What a C-STORE response status means for a delivery.

    Stored: 0x0000, 0x0001 and warnings 0xB000-0xBFFF. Permanent (the objects are refused; resending the same bytes
    cannot help): 0xA9xx, 0xCxxx, 0x0122 SOP class not supported, 0x0117 invalid object instance. Everything else is
    transient: 0xA7xx out of resources, 0x0213 resource limitation, 0x0110 processing failure, unknown codes.
    """
    if status in (_SUCCESS, _WARNING) or status in _WARNINGS:
        return StoreOutcome.STORED
    if (
        status in _REFUSED_DATASET_MISMATCH
        or status in _CANNOT_UNDERSTAND
        or status in (_SOP_CLASS_NOT_SUPPORTED, _INVALID_OBJECT_INSTANCE)
    ):
        return StoreOutcome.PERMANENT
    return StoreOutcome.TRANSIENT


def check_store_results(results: Sequence[StoreResult], expected: int, peer: str) -> None:
    """Raise unless all ``expected`` instances were stored; `PermanentSendError` if any was refused for good (a failure
    status of the permanent class, or no presentation context accepted for its SOP class/transfer syntax)."""
    permanent: list[str] = []
    transient: list[str] = []
    for result in results:
        if result.not_accepted:
            permanent.append(f"{result.sop_uid}: not accepted (no presentation context for its class)")
            continue
        if result.status is None:
            transient.append(f"{result.sop_uid}: no C-STORE response")
            continue
        outcome = classify_store_status(result.status)
        if outcome is StoreOutcome.PERMANENT:
            permanent.append(f"{result.sop_uid}: status 0x{result.status:04X}")
        elif outcome is StoreOutcome.TRANSIENT:
            transient.append(f"{result.sop_uid}: status 0x{result.status:04X}")
    if len(results) < expected:
        transient.append(f"association ended after {len(results)} of {expected} instances")
    if permanent:
        raise PermanentSendError(f"{peer} refused " + "; ".join(permanent + transient))
    if transient:
        raise TransientSendError(f"{peer} did not store " + "; ".join(transient))


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
    syntax. Association refused, rejected, aborted or timed out → transient; status classes as in
    `classify_store_status`; a missing or unreadable result file → permanent."""

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
        peer = Peer(
            destination.host,
            destination.port,
            called_ae=destination.ae_title,
            calling_ae=self.calling_ae,
            timeout=self.timeout,
            tls_args=self._tls_args(destination),
        )
        try:
            results = send_datasets(peer, datasets)
        except SendError as exc:
            raise TransientSendError(str(exc)) from exc
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        check_store_results(results, len(datasets), where)

    @staticmethod
    def _tls_args(destination: Destination) -> tuple[SSLContext, str] | None:
        """Built per delivery, so a renewed CA file is read anew; one that no longer loads is transient (someone
        fixes the file, the delivery goes on)."""
        try:
            return destination_tls_args(destination)
        except ConfigError as exc:
            raise TransientSendError(str(exc)) from exc


class _TimeoutSession(requests.Session):
    """A requests session that applies one timeout to every request (dicomweb-client sets none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the
        # environment replace a session's `verify` (psf/requests#3829), and the destination's CA must win.
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("cert", self.cert)
        return super().request(*args, **kwargs)


class StowSender(Sender):
    """STOW-RS through dicomweb-client: one POST per delivery to ``destination.url`` + ``/studies``, with the
    destination's bearer token when set. Network errors, timeouts, HTTP 5xx, 408, 429, and 401/403/404 (a credential
    or URL someone fixes) → transient; other 4xx (400 bad request, 409 conflict, 413, 415) → permanent. A 202 whose
    FailedSOPSequence names instances is classified by their failure reasons like C-STORE statuses."""

    def __init__(self, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        if destination.kind is not DestinationKind.DICOMWEB or destination.url is None:
            raise PermanentSendError(f"StowSender cannot send to a {destination.kind.value!r} destination")
        datasets = _read_results(files)
        headers = {}
        if destination.token is not None:
            headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
        session = _TimeoutSession(self.timeout)
        if destination.uses_tls:
            session.verify, session.cert = requests_tls(destination)
        client = DICOMwebClient(url=destination.url.rstrip("/"), headers=headers, session=session)
        client.set_http_retry_params(retry=False)  # the dispatcher owns retries (backoff, give-up, dead-letter)
        where = destination.shown_url or ""
        try:
            response = client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            message = f"{where} answered HTTP {code}"
            if code >= 500 or code in (401, 403, 404, 408, 429):
                raise TransientSendError(message) from exc
            body = _store_response(exc.response) if code == 409 and exc.response is not None else None
            refused = _failed_sops(body) if body is not None else []
            if refused:  # every instance failed: their reasons say whether a later attempt can succeed
                check_store_results(refused, len(refused), f"{message}:")
            raise PermanentSendError(message) from exc
        except requests.exceptions.SSLError as exc:
            raise TransientSendError(f"{where} TLS handshake failed: {_ssl_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise TransientSendError(f"{where} unreachable: {type(exc).__name__}") from exc
        finally:
            session.close()  # a pooled keep-alive connection would otherwise linger until collected
        failed = _failed_sops(response)
        if failed:
            check_store_results(failed, len(failed), where)


def _failed_sops(response: Dataset) -> list[StoreResult]:
    """The instances a Store Instances Response's FailedSOPSequence names, each with its Failure Reason (0x0110
    processing failure when absent)."""
    return [StoreResult(str(item.ReferencedSOPInstanceUID), int(item.get("FailureReason", 0x0110)))
            for item in response.get("FailedSOPSequence") or []]


def _store_response(http: requests.Response) -> Dataset | None:
    """An error response's body as a Store Instances Response (DICOM JSON), else None."""
    try:
        found = http.json()
        return Dataset.from_json(found[0] if isinstance(found, list) else found)
    except Exception:  # noqa: BLE001 - no body, HTML, XML, malformed JSON: the HTTP status alone decides
        return None


def _ssl_reason(exc: BaseException) -> str:
    """The OpenSSL reason inside a requests `SSLError` (e.g. ``certificate verify failed: self-signed certificate
    in certificate chain``), which urllib3 buries in a long retry message."""
    found = re.search(r"\[SSL: [A-Z_]+\] ([^(']+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__
