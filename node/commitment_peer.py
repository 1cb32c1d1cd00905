"""The PACS's side of Storage Commitment (node.commitment): the N-ACTION request and the QIDO-RS check (the seams
unit tests replace), reading an N-EVENT-REPORT and deciding whether its sender may settle a destination's
commitment, and the references a request names, read from the result files."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import evt

from node.config import Destination
from node.errors import ConfigError, SendError
from node.scu import Peer, request_storage_commitment
from node.tls import destination_tls_args, requests_tls

STATUS_PROCESSING_FAILURE = 0x0110

Ref = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT's content."""

    transaction_uid: str
    event_type: int  # 1: all committed, 2: failures exist
    committed: tuple[str, ...]  # SOP Instance UIDs in ReferencedSOPSequence
    failed: tuple[tuple[str, int], ...]  # (SOP Instance UID, FailureReason) in FailedSOPSequence


def request_commitment(destination: Destination, calling_ae: str, transaction_uid: str, refs: Sequence[Ref],
                       timeout: float, on_report: Callable[[evt.Event], Any]) -> None:
    """`node.scu.request_storage_commitment` to a DIMSE ``destination`` as ``calling_ae``."""
    assert destination.host and destination.port and destination.ae_title  # config validates dimse ones
    peer = Peer(destination.host, destination.port, called_ae=destination.ae_title, calling_ae=calling_ae,
                timeout=timeout, tls_args=_tls_args(destination))
    request_storage_commitment(peer, transaction_uid, refs, on_report)


def _tls_args(destination: Destination) -> Any:
    """The destination's DIMSE TLS arguments; a CA or key file that no longer loads is a `SendError` (retried)."""
    try:
        return destination_tls_args(destination)
    except ConfigError as exc:
        raise SendError(str(exc)) from exc


def qido_instances(destination: Destination, study_uid: str, timeout: float) -> set[str]:
    """The SOP Instance UIDs a DICOMweb ``destination`` lists for ``study_uid`` (QIDO-RS). Raises `SendError`."""
    assert destination.url is not None
    headers = {"Accept": "application/dicom+json"}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    url = f"{destination.url.rstrip('/')}/studies/{study_uid}/instances"
    try:
        verify, cert = requests_tls(destination)
        response = requests.get(url, headers=headers, params={"includefield": "00080018"}, timeout=timeout,
                                verify=verify, cert=cert, allow_redirects=False)  # as the sender: never followed
    except requests.RequestException as exc:
        raise SendError(f"QIDO-RS {destination.shown_url} unreachable: {type(exc).__name__}") from exc
    if response.status_code == 204 or (response.status_code == 200 and not response.content.strip()):
        return set()
    if response.status_code != 200:
        raise SendError(f"QIDO-RS {destination.shown_url} answered HTTP {response.status_code}")
    try:
        items = response.json()
        return {str(v) for item in items for v in item.get("00080018", {}).get("Value", [])}
    except (ValueError, AttributeError, TypeError) as exc:
        raise SendError(f"QIDO-RS {destination.shown_url} answered something that is not DICOM JSON") from exc


def _address(text: str) -> str:
    """An IP address as one spelling (IPv4-mapped IPv6 as IPv4); anything else as given."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def foreign_reporter(destination: Destination, calling_ae: str, address: str, *, dialled: bool = False) -> str | None:
    """Why an N-EVENT-REPORT from ``calling_ae`` at ``address`` may not settle ``destination``'s commitment, or None.

    ``dialled``: the report came on the node's own N-ACTION association, whose peer is the destination the node
    called (by construction: only the called AE title is compared). Otherwise the calling AE title must be the
    destination's ``ae_title`` or one of ``commitment_report_ae_titles``, and, only when ``commitment_report_hosts``
    is set, the address one of those (host names resolved now; one that does not resolve matches only itself). The
    address is not checked by default: a PACS often reports from another address than the one the node dials (NAT,
    a Kubernetes service, an HA pair). Without this check any peer that may associate (every one, with no
    ``allowed_calling_aes``) and learns a Transaction UID could mark results held by a PACS that never stored them."""
    title = calling_ae.strip()
    if dialled:
        return None if title == destination.ae_title else f"the association is with {title!r}, not the destination"
    if title not in (destination.ae_title, *destination.commitment_report_ae_titles):
        return f"calling AE title {title!r} is not one the destination reports from"
    if not destination.commitment_report_hosts:
        return None
    allowed: set[str] = set()
    for host in destination.commitment_report_hosts:
        allowed.add(_address(host))
        with contextlib.suppress(OSError, UnicodeError):
            allowed.update(_address(str(info[4][0])) for info in socket.getaddrinfo(host, None))
    if _address(address) not in allowed:
        return f"address {address} is not one the destination reports from"
    return None


def parse_report(event: evt.Event) -> Report:
    """The Storage Commitment content of an ``EVT_N_EVENT_REPORT`` event; `ValueError` if it has none."""
    info = event.event_information
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("N-EVENT-REPORT without TransactionUID")
    committed = tuple(str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", []) or []
                      if "ReferencedSOPInstanceUID" in i)
    failed = tuple((str(i.ReferencedSOPInstanceUID), int(i.get("FailureReason", STATUS_PROCESSING_FAILURE)))
                   for i in info.get("FailedSOPSequence", []) or [] if "ReferencedSOPInstanceUID" in i)
    return Report(uid, int(event.event_type or 0), committed, failed)


def read_refs(files: Sequence[Path]) -> tuple[str | None, list[Ref]]:
    """(Study Instance UID, [(SOP Class UID, SOP Instance UID)]) from the result files' headers."""
    study: str | None = None
    refs: list[Ref] = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        except (OSError, InvalidDicomError) as exc:
            raise SendError(f"result file {Path(path).name} unreadable: {type(exc).__name__}") from exc
        study = study or str(ds.get("StudyInstanceUID", "") or "") or None
        refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return study, refs

