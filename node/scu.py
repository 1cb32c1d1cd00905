"""A small DIMSE SCU: C-ECHO, C-STORE and the Storage Commitment N-ACTION to a peer, used by `pacsnode echo/send`,
DIMSE dispatch, destination checks and proof of delivery.

`echo(peer)` returns the C-ECHO status; `send_datasets(peer, datasets)` stores over one association and returns
one `StoreResult` per instance (`read_files(paths)` reads files and folders for it), or raises
`NoContextAcceptedError` when the peer takes none of their SOP classes; `request_storage_commitment`
sends the N-ACTION (`CommitmentUnsupportedError` when the peer has no Storage Commitment). Presentation contexts
are proposed per SOP class with the instance's own transfer syntax (plus the uncompressed ones), so nothing is
transcoded. Raises `SendError` when the association cannot be established. TCP_NODELAY is set on the outgoing socket,
and it becomes a `node.guard.GuardedSocket`: sends and each PDU read have ``Peer.timeout`` (pynetdicom clears the
connect timeout once connected, and a peer that stops reading, or sends a PDU a byte at a time, would otherwise
hold its connection thread for ever, and the association's abort with it), a PDU over `MAX_PDU_FROM_PEER` is
aborted unread. With ``Peer.tls_args`` (from
`node.tls.destination_tls_args`) the association runs over DICOM TLS; a failed handshake's reason is in the
`SendError`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import N_EVENT_REPORT_RQ
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)

from node.acceptor import drop_late_data
from node.dimse import nodelay_handler
from node.errors import SendError
from node.guard import GuardedSocket, ReceiveLimits
from node.refusals import Refusals
from node.states import PeerRefusal

ABORT_POLL = 0.05  # seconds: how soon a send waiting for a response notices that the peer aborted


class CommitmentUnsupportedError(SendError):
    """The peer does not accept the Storage Commitment Push Model SOP class: no proof of storage will ever come."""


class NoContextAcceptedError(SendError):
    """The peer accepted the association but none of the presentation contexts proposed for the datasets (pynetdicom
    then aborts it): it stores none of ``sop_classes`` (or in none of the transfer syntaxes offered)."""

    def __init__(self, message: str, sop_classes: Sequence[str]) -> None:
        super().__init__(message)
        self.sop_classes = tuple(sop_classes)


_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# The largest PDU read from a peer the node called (pynetdicom announces 16,382 in the A-ASSOCIATE-RQ): it read any
# declared length, so a destination answering "4 GiB" and streaming had it all read into memory.
MAX_PDU_FROM_PEER = 1 << 20


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called_ae: str = "ANY-SCP"
    calling_ae: str = "PACSNODE"
    timeout: float = 30.0
    tls_args: tuple[SSLContext, str] | None = None  # (context, server hostname): DICOM TLS


@dataclass(frozen=True)
class StoreResult:
    sop_uid: str
    status: int | None  # None: not sent (see ``not_accepted``) or no response (association lost)
    not_accepted: bool = False  # the peer accepted no presentation context for this instance: never sent

    @property
    def ok(self) -> bool:
        """Success or a warning (PS3.7 C: 0x0001, 0x0107, 0x0116, 0xBxxx): the instance is stored."""
        return self.status is not None and (self.status in (0x0000, 0x0001, 0x0107, 0x0116)
                                            or 0xB000 <= self.status <= 0xBFFF)


def _ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    ae.maximum_pdu_size = 0
    return ae


class _DestinationRefusals(Refusals):
    """`node.guard`'s refusal log for an association the node opened: under the destination's address (the
    association's requestor is the node itself)."""

    def __init__(self, peer: Peer) -> None:
        super().__init__("dimse_scu")
        self.peer = peer

    def record(self, reason: PeerRefusal, peer: str, port: int | None = None, **context: Any) -> bool:
        return super().record(reason, self.peer.host, self.peer.port, called_ae=self.peer.called_ae, **context)


class _RequestorDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider for an association the node requested, whose association reactor (the
    non-blocking ``get_msg``) only ever takes the peer's *requests* (an N-EVENT-REPORT) and leaves responses to the
    sender's blocking ``get_msg``. pynetdicom pauses the reactor before sending by waiting until it reports itself
    paused, which it does just before waiting on its checkpoint: a reactor thread descheduled right after that wait
    (a loaded machine) took the response and dropped it ("Received unexpected C-STORE service message"), and the
    sender waited its whole DIMSE timeout — a delivery failed and was retried, a commitment request lost.

    The sender's blocking wait also ends as soon as the peer has aborted or the connection is gone (pynetdicom
    documents that, but waits out the DIMSE timeout: the association's reactor, which would notice the abort, is
    paused while a send waits for its response). A PACS that answers a C-STORE-RQ with an A-ABORT held the
    dispatch thread the whole timeout at every attempt."""

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return self._response()
        pending = self.msg_queue
        with pending.mutex:  # what queue.Queue.get does, for the head only when it is a request
            if pending.queue and getattr(pending.queue[0][1], "is_valid_request", False):
                item = pending.queue.popleft()
                pending.not_full.notify()
                return item
        return None, None

    def _response(self) -> Any:
        """The next message, or (None, None) at the DIMSE timeout or once the association is aborted or its DUL
        has ended (checked every `ABORT_POLL` seconds while no message comes)."""
        timeout = self.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = ABORT_POLL if deadline is None else min(ABORT_POLL, deadline - time.monotonic())
            if wait <= 0:
                return None, None
            try:
                return self.msg_queue.get(timeout=wait)
            except queue.Empty:
                assoc = self.assoc
                if assoc.acse.is_aborted() or not assoc.dul.is_alive():
                    return None, None


class _Reports:
    """The N-EVENT-REPORTs the peer sent on an association the node requested whose answer is not yet queued.

    pynetdicom serves each in a thread of its own, and answers it after the handler returns. The node releases the
    N-ACTION's association as soon as it has the N-ACTION response; a report the PACS sent at once on it (PS3.4 J.3.3
    allows it; a pynetdicom SCP's even goes out ahead of its response) was often still being handled then, and had
    its answer ready only once the A-RELEASE-RQ had gone:
    a P-DATA in Sta7, where PS3.8 allows none - pynetdicom's state machine raised InvalidEventError, the DUL thread
    died, the PACS had no answer and the release waited its whole timeout. The release now waits for them
    (`wait`); an answer that is still late (the report crossed the A-RELEASE-RQ) is dropped, not sent
    (`node.acceptor.drop_late_data`)."""

    def __init__(self) -> None:
        self._pending = 0
        self._changed = threading.Condition()

    def handlers(self) -> list[evt.EventHandlerType]:
        return [(evt.EVT_CONN_OPEN, self._attach), (evt.EVT_DIMSE_RECV, self._received)]

    def _attach(self, event: evt.Event) -> None:
        assoc: Any = event.assoc
        drop_late_data(assoc)
        serve = assoc._serve_request  # what each report's thread runs (pynetdicom looks it up on the association)

        def serve_then_count(msg: Any, context_id: int) -> None:
            try:
                serve(msg, context_id)
            finally:
                if isinstance(msg, N_EVENT_REPORT):
                    self._add(-1)

        assoc._serve_request = serve_then_count

    def _received(self, event: evt.Event) -> None:
        """EVT_DIMSE_RECV, in the DUL's thread before it starts the report's thread."""
        if isinstance(event.message, N_EVENT_REPORT_RQ):
            self._add(1)

    def _add(self, n: int) -> None:
        with self._changed:
            self._pending += n
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Until every report received so far is answered (its answer queued), at most ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending <= 0, timeout)


def _on_open(peer: Peer) -> list[evt.EventHandlerType]:
    """The EVT_CONN_OPEN handler: TCP_NODELAY, and `node.guard.GuardedSocket`'s bounds on what the peer sends: a PDU
    declared over `MAX_PDU_FROM_PEER` is aborted unread, and each PDU must arrive within ``peer.timeout`` (which
    also bounds every send); the peer's responses go to the sender only (`_RequestorDimse`)."""
    def opened(event: evt.Event) -> None:
        nodelay_handler(event)
        event.assoc.dimse.__class__ = _RequestorDimse  # before any P-DATA: the reactor starts once established
        limits = ReceiveLimits(max_pdu_bytes=MAX_PDU_FROM_PEER, max_instance_bytes=MAX_PDU_FROM_PEER,
                               association_timeout=peer.timeout, network_timeout=peer.timeout, max_connections=1)
        if (sock := event.assoc.dul.socket) is not None:
            GuardedSocket.adopt(sock, limits, _DestinationRefusals(peer))

    return [(evt.EVT_CONN_OPEN, opened)]


def echo(peer: Peer) -> int:
    """C-ECHO ``peer``; return its status (0 = success). Raises `SendError` if no association."""
    ae = _ae(peer)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, evt_handlers=_on_open(peer),
                         tls_args=peer.tls_args)
    if not assoc.is_established:
        raise SendError(f"association with {peer.called_ae}@{peer.host}:{peer.port} failed ({_why(assoc, peer)})")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SendError(f"no C-ECHO response from {peer.called_ae}@{peer.host}:{peer.port}")
    return int(status.Status)


def _why(assoc: object, peer: Peer) -> str:
    handshake_error = getattr(peer.tls_args[0], "handshake_error", None) if peer.tls_args else None
    if handshake_error:
        return f"TLS handshake failed: {handshake_error}"
    if getattr(assoc, "is_rejected", False):
        return "rejected"
    if getattr(assoc, "is_aborted", False):
        return "aborted"
    return "no answer"


def _contexts(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    by_class: dict[str, set[str]] = defaultdict(set)
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ExplicitVRLittleEndian
        by_class[str(ds.SOPClassUID)].add(ts)
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        for ts in sorted(syntaxes):
            if UID(ts).is_compressed:
                contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} presentation contexts needed; send fewer SOP classes per association")
    return contexts


def send_datasets(peer: Peer, datasets: Sequence[Dataset]) -> list[StoreResult]:
    """C-STORE each dataset over one association; returns a result per dataset in order (fewer when the association
    ends early). Raises `NoContextAcceptedError` when the peer accepts none of the SOP classes (pynetdicom aborts the
    association), `SendError` when the association fails otherwise or is lost mid-send."""
    if not datasets:
        return []
    ae = _ae(peer)
    ae.requested_contexts = _contexts(datasets)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, evt_handlers=_on_open(peer),
                         tls_args=peer.tls_args)
    if not assoc.is_established:
        where = f"{peer.called_ae}@{peer.host}:{peer.port}"
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            named = ", ".join(f"{UID(c).name} ({c})" if UID(c).name != c else c for c in classes)
            raise NoContextAcceptedError(f"{where} accepts none of the SOP classes sent: {named}", classes)
        raise SendError(f"association with {where} failed ({_why(assoc, peer)})")
    results = []
    try:
        for ds in datasets:
            not_accepted = False
            try:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if "Status" in status else None
            except ValueError:  # pynetdicom: no accepted presentation context for this SOP class / syntax
                code, not_accepted = None, True
            except RuntimeError as exc:
                raise SendError(f"association lost while sending {ds.SOPInstanceUID}") from exc
            results.append(StoreResult(sop_uid=str(ds.SOPInstanceUID), status=code, not_accepted=not_accepted))
            if not assoc.is_established or (code is None and not not_accepted):
                break  # no response: timed out (pynetdicom aborted) or the peer aborted, maybe not yet seen as such
    finally:
        if assoc.is_established and not assoc.acse.is_aborted():  # an aborted one is ended by its own reactor
            assoc.release()
    return results


def request_storage_commitment(peer: Peer, transaction_uid: str, refs: Sequence[tuple[str, str]],
                               on_report: Callable[[evt.Event], Any]) -> None:
    """Send one Storage Commitment Push Model N-ACTION (Action Type 1: ``transaction_uid`` and a
    ReferencedSOPSequence of ``refs``, (SOP Class UID, SOP Instance UID) pairs), then release.

    An N-EVENT-REPORT the peer sends on this association before the release goes to ``on_report`` (an
    ``EVT_N_EVENT_REPORT`` handler). Raises `CommitmentUnsupportedError` when the peer does not accept the SOP class,
    `SendError` when the association fails or the N-ACTION gets no or a failure response.
    """
    ae = _ae(peer)
    ae.add_requested_context(StorageCommitmentPushModel, _UNCOMPRESSED)
    where = f"{peer.called_ae}@{peer.host}:{peer.port}"
    reports = _Reports()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae,
                         evt_handlers=[*_on_open(peer), *reports.handlers(), (evt.EVT_N_EVENT_REPORT, on_report)],
                         tls_args=peer.tls_args)
    unsupported = CommitmentUnsupportedError(f"{where} does not accept Storage Commitment Push Model")
    if not assoc.is_established:
        # A peer without the SOP class accepts the association with every context rejected; pynetdicom aborts it.
        if any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.rejected_contexts):
            raise unsupported
        raise SendError(f"association with {where} for storage commitment failed ({_why(assoc, peer)})")
    try:
        if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
            raise unsupported
        request = Dataset()
        request.TransactionUID = transaction_uid
        request.ReferencedSOPSequence = [_ref_item(cls, uid) for cls, uid in refs]
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
    finally:
        reports.wait(peer.timeout)  # a report that came with the response is answered before the A-RELEASE-RQ
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise SendError(f"no N-ACTION response from {where}")
    if int(status.Status) != 0:
        raise SendError(f"{where} answered N-ACTION with status 0x{int(status.Status):04X}")


def _ref_item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def read_files(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files for sending (folders are walked); raises `SendError` naming an unreadable file."""
    out: list[Dataset] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                out.append(dcmread(f))
            except (InvalidDicomError, OSError) as exc:
                raise SendError(f"{f}: not a readable DICOM file ({exc})") from exc
    return out
