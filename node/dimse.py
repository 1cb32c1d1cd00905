"""The DIMSE front door: a pynetdicom AE serving Verification (C-ECHO) and Storage (C-STORE).

`DimseServer(config, ingestor, index).start()` listens on ``[node] host:port`` without blocking. Associations are
refused when the called AE title is not ours or the calling AE is not on a non-empty allow-list. The C-STORE
handler does one thing: hand the encoded dataset to the `Ingestor` and answer its status — Success only after the
file is fsync'd and the index row committed; `ReceiveError.status` otherwise (0xA700/0xA701/0xA900/0xC000;
0xA700 also when admission control refuses the series, see `node.admission`).
Every accepted socket gets TCP_NODELAY (pynetdicom leaves Nagle on, which stalls each small C-STORE ~50 ms).
Associations run under `node.guard`: PDUs over ``[node] max_pdu_bytes`` and malformed requests are aborted unread,
every read has a deadline (``association_timeout_seconds`` until negotiated, ``network_timeout_seconds`` after),
and a data set over ``max_instance_bytes`` is dropped as it arrives and answered 0xA700.
With ``[tls] dimse_port`` a second listener there speaks DICOM TLS (same AE, handlers and guards; context from
`node.tls`); ``[tls] plaintext_dimse = false`` leaves only that one. With ``[tls] calling_ae_certificates`` a
calling AE title must be named by the client certificate presented (rejected otherwise, see `_on_requested`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from node.acceptor import GuardedServer, start_guarded_server
from node.audit import AuditTrail
from node.auditdb import audit_association_closed
from node.config import NodeConfig
from node.errors import AdmissionRefusedError, ReceiveError, StoreStatus
from node.guard import BoundedDataset, ReceiveLimits, discard_request_dataset, store_request_dataset
from node.index import Index
from node.ingest import ACCEPTED_TRANSFER_SYNTAXES, EncodedDataset, Ingestor, Origin
from node.listenfds import DIMSE, DIMSE_TLS, inherited
from node.logs import get_logger
from node.metrics import Metrics
from node.refusals import Refusals
from node.slots import Slots, progressed
from node.states import AssociationState, PeerRefusal
from node.tls import calling_ae_refusal, server_context

assert set(ACCEPTED_TRANSFER_SYNTAXES) <= set(ALL_TRANSFER_SYNTAXES)

# A Storage Commitment report names the node's few result objects (~100 bytes each); a larger one is refused.
MAX_REPORT_BYTES = 256 << 10
# A-ASSOCIATE-RJ (result, source, reason): rejected-permanent, by the service user, calling AE title not recognised.
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
ESTABLISHED_POLL = 0.005  # seconds; how often a report that arrived during acceptance looks again (`_established`)

# pynetdicom logs every PDU unless told not to; that costs more per image than the fsync (docs/peers.md).
_config.LOG_HANDLER_LEVEL = "none"


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm on a connected TCP socket (no-op for None or non-TCP sockets)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_handler(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler (both roles): set TCP_NODELAY on the association's socket."""
    dul_socket = event.assoc.dul.socket
    set_nodelay(getattr(dul_socket, "socket", None))


def _established(assoc: Association, timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until ``assoc`` is established; False when it ended or the wait ran out."""
    deadline = time.monotonic() + timeout
    while not assoc.is_established:
        if assoc.is_aborted or assoc.is_rejected or assoc.is_released or time.monotonic() > deadline:
            return False
        time.sleep(ESTABLISHED_POLL)
    return True


def _encoded_size(data: Any) -> int:
    """The bytes of a received data set (a `node.guard.BoundedDataset` counts what it dropped too)."""
    if isinstance(data, BoundedDataset):
        return data.received
    if isinstance(data, BytesIO):
        with data.getbuffer() as view:
            return view.nbytes
    return 0


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def _called(assoc: Association) -> str:
    """The called AE title the peer asked for (``acceptor.ae_title`` is always ours, even on a rejection)."""
    request = getattr(assoc.requestor, "primitive", None)
    return str(getattr(request, "called_ae_title", None) or assoc.acceptor.ae_title)


class DimseServer:
    """The node's Storage/Verification SCP; ``start()`` returns once it listens."""

    def __init__(
        self,
        config: NodeConfig,
        ingestor: Ingestor,
        index: Index,
        on_released: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        on_commitment_report: Callable[[evt.Event], tuple[int, Any]] | None = None,
        audit: AuditTrail | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._on_commitment_report = on_commitment_report  # node.commitment: the PACS's N-EVENT-REPORT
        self._reuse_port = reuse_port  # SO_REUSEPORT, where no supervisor's socket is inherited (node.listenfds)
        self._config = config
        self._audit = audit  # association start/stop and what each stored (node.audit); None: no audit
        self._metrics = metrics or Metrics()
        self._refusals = Refusals("dimse", self._metrics)  # refusal logs rate-limited per peer address
        self._on_released = on_released
        self._ingestor = ingestor
        self._index = index
        self._log = get_logger(component="dimse")
        self._assoc_ids: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._audited: set[str] = set()  # associations whose closing records are written, their row not yet closed
        self._reporting: weakref.WeakSet[Association] = weakref.WeakSet()  # handling an N-EVENT-REPORT now
        self._rejecting: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()  # why, if ours
        self._lock = threading.Lock()
        self._server: GuardedServer | None = None
        self._tls_server: GuardedServer | None = None
        self._slots = Slots()  # one AE, one association count: both servers' connections (node.slots)
        # Built now, so a certificate that does not load stops the node before anything listens (ConfigError).
        self._ssl_context = server_context(config.tls) if config.tls.dimse_port is not None else None
        self._ae = self._make_ae(config)

    def _make_ae(self, config: NodeConfig) -> AE:
        ae = AE(ae_title=config.node.ae_title)
        ae.maximum_associations = config.node.max_associations
        self._apply_limits(ae, config)
        ae.require_called_aet = True
        ae.require_calling_aet = list(config.node.allowed_calling_aes)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
        # Storage Commitment reports: the PACS opens the association as the SCP of the SOP class (role selection)
        # and sends N-EVENT-REPORT; the node takes the SCU role.
        ae.add_supported_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=False, scp_role=True)
        return ae

    @staticmethod
    def _apply_limits(ae: AE, config: NodeConfig) -> None:
        node = config.node
        ae.maximum_pdu_size = node.max_pdu_bytes  # announced as our Maximum Length; node.guard enforces it
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.association_timeout_seconds  # also pynetdicom's ARTIM timer
        ae.dimse_timeout = node.network_timeout_seconds

    @property
    def address(self) -> tuple[str, int]:
        """The plaintext listener's address (the TLS one's in TLS-only mode)."""
        server = self._server or self._tls_server
        if server is None:
            raise RuntimeError("server not started")
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The DICOM TLS listener's address, None without one."""
        if self._tls_server is None:
            return None
        host, port = self._tls_server.server_address[:2]
        return str(host), int(port)

    @property
    def servers(self) -> list[GuardedServer]:
        """The running listeners (plaintext and/or TLS)."""
        return [s for s in (self._server, self._tls_server) if s is not None]

    def start(self) -> None:
        (self._config.node.data_dir / "incoming").mkdir(parents=True, exist_ok=True)  # node.guard's spill dir
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, nodelay_handler),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed, [AssociationState.RELEASED]),
            (evt.EVT_ABORTED, self._on_closed, [AssociationState.ABORTED]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
        ]
        limits = ReceiveLimits.from_config(self._config.node, self._config.admission)
        host = self._config.node.host
        tls = self._config.tls
        if tls.plaintext_dimse:
            self._server = start_guarded_server(self._ae, (host, self._config.node.port), handlers, limits,
                                                refusals=self._refusals, reuse_port=self._reuse_port,
                                                listening=inherited(DIMSE, self._config.node.port),
                                                slots=self._slots, on_ended=self._on_ended)
            self._log.info("dimse_listening", ae_title=self._config.node.ae_title, host=host, port=self.address[1])
        if tls.dimse_port is not None:
            self._tls_server = start_guarded_server(self._ae, (host, tls.dimse_port), handlers, limits,
                                                    ssl_context=self._ssl_context, refusals=self._refusals,
                                                    reuse_port=self._reuse_port,
                                                    listening=inherited(DIMSE_TLS, tls.dimse_port),
                                                    audit=self._audit, slots=self._slots, on_ended=self._on_ended)
            address = self.tls_address
            assert address is not None
            self._log.info("dimse_tls_listening", ae_title=self._config.node.ae_title, host=host, port=address[1],
                           client_certificates=str(tls.client_certificates))

    def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting. With ``drain_seconds`` (the node stopping), running associations get that long to end,
        then an A-ABORT each — a sender then knows its unacknowledged instances were not taken and sends them
        again, where the process's exit used to cut the connection mid-PDU. Without it (the acceptor restarted)
        they go on."""
        if self.servers:
            for server in self.servers:
                server.shutdown()
            self._server = self._tls_server = None
            aborted = self._drain(drain_seconds) if drain_seconds is not None else 0
            self._log.info("dimse_stopped", associations_aborted=aborted)

    def _drain(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the running associations to end, abort the rest; returns how many."""
        deadline = time.monotonic() + seconds
        while (running := [a for a in self._ae.active_associations if a.is_established]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in running:
            with contextlib.suppress(Exception):  # it may end by itself meanwhile
                assoc.abort()
        return len(running)

    def apply_config(self, config: NodeConfig) -> None:
        """Swap in a new config: allow-list, limits and timeouts apply to the next association (hot reload)."""
        self._ae.require_calling_aet = list(config.node.allowed_calling_aes)
        self._apply_limits(self._ae, config)
        for server in self.servers:
            server.apply_config(config)
        self._config = config

    # -- notification handlers (logging and association bookkeeping only) ---------------------------------
    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc_id = uuid.uuid4().hex
        with self._lock:
            self._assoc_ids[assoc] = assoc_id
        calling = assoc.requestor.ae_title
        try:
            self._index.association_opened(assoc_id, calling, assoc.acceptor.ae_title, _peer(assoc))
        finally:  # counted once the row is written: a listener killed in between leaves both counts equal
            self._metrics.association("accepted")
        self._log.info("association_accepted", assoc_id=assoc_id, calling_ae=calling, peer=_peer(assoc))
        if self._audit is not None:
            self._audit.association_started(assoc_id=assoc_id, calling_ae=calling, called_ae=assoc.acceptor.ae_title,
                                            peer=_peer(assoc))

    def _on_requested(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RQ: a calling AE title that ``[tls] calling_ae_certificates`` does not let this connection
        claim (`node.tls.calling_ae_refusal`) is rejected as pynetdicom rejects one off the allow-list, and recorded
        like every rejection (EVT_REJECTED). A failing check rejects too: pynetdicom would log this notification
        handler's exception and accept."""
        assoc = event.assoc
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "")).strip()
        sock = getattr(assoc.dul.socket, "socket", None)
        try:
            why = calling_ae_refusal(self._config.tls, calling, sock if isinstance(sock, ssl.SSLSocket) else None)
        except Exception as exc:  # noqa: BLE001 - refuse rather than let pynetdicom accept
            why = f"certificate check failed ({type(exc).__name__})"
        if why is None:
            return
        self._rejecting[assoc] = why
        assoc.requestor.ae_title = calling  # what the rejection is recorded with (pynetdicom sets it on negotiating)
        assoc.acse.send_reject(*CALLING_AE_NOT_RECOGNISED)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._metrics.association("rejected")
        why = self._rejecting.pop(assoc, None)
        logged, unrecorded = self._refusals.record_counted(
            PeerRefusal.ASSOCIATION_REJECTED, assoc.requestor.address, assoc.requestor.port,
            calling_ae=assoc.requestor.ae_title, called_ae=assoc.acceptor.ae_title, **({"why": why} if why else {}),
        )
        if self._audit is not None:  # one by one as far as the log goes: a rejection flood cannot fill the disk
            if unrecorded:
                self._audit.failures_unrecorded(what="associations rejected", peer=assoc.requestor.address,
                                                count=unrecorded)
            if logged:
                self._audit.association_rejected(calling_ae=assoc.requestor.ae_title, called_ae=_called(assoc),
                                                 peer=_peer(assoc), why=why)  # the binding's reason, if any

    def _on_closed(self, event: evt.Event, state: AssociationState) -> None:
        self._close(event.assoc, state)

    def _on_ended(self, assoc: Association) -> None:
        """``assoc``'s thread is ending (`node.acceptor`): a row still open is closed as aborted — its reactor ended
        without EVT_RELEASED or EVT_ABORTED (its DUL thread ended first). Not EVT_CONN_CLOSE, which pynetdicom
        triggers in the DUL's thread: also while EVT_ACCEPTED's handler was still writing the row (which then stayed
        open), and after the A-RELEASE-RP went out but before EVT_RELEASED (a release then recorded as an abort)."""
        try:
            self._close(assoc, AssociationState.ABORTED)
        except Exception:  # noqa: BLE001 - the association's thread is ending either way
            self._log.exception("association_close_failed")

    def _close(self, assoc: Association, state: AssociationState) -> None:
        with self._lock:
            assoc_id = self._assoc_ids.pop(assoc, None)
        if assoc_id is None:
            return  # already closed (the thread's end follows a release or an abort) or never accepted
        # The records first, then the row: a process killed in between leaves the row open, and the restart writes
        # them (`audit_dangling_closed`) - at least once. The other way round a kill lost the receipt for good.
        with self._lock:
            first = assoc_id not in self._audited
            self._audited.add(assoc_id)
        if first:  # not again when the row's close below failed and is tried again
            audit_association_closed(self._audit, self._index.engine, assoc_id, calling_ae=assoc.requestor.ae_title,
                                     called_ae=assoc.acceptor.ae_title, peer=_peer(assoc), state=str(state))
        try:
            self._index.association_closed(assoc_id, state)  # only an open row: writing it twice changes nothing
        except Exception:
            with self._lock:  # a failed write (the database away a moment) is tried again as the thread ends
                self._assoc_ids.setdefault(assoc, assoc_id)
            raise
        with self._lock:
            self._audited.discard(assoc_id)
        self._metrics.association(str(state))
        self._log.info("association_closed", assoc_id=assoc_id, state=str(state))
        if state is AssociationState.RELEASED and self._on_released is not None:
            self._on_released()  # lets completion judge the series now instead of at the next sweep

    # -- intervention handlers ------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        self._log.info("echo", calling_ae=event.assoc.requestor.ae_title)
        return int(StoreStatus.SUCCESS)

    def _on_event_report(self, event: evt.Event) -> tuple[int, Any]:
        """A Storage Commitment result from a PACS: handed to node.commitment (0x0110 when nothing takes it).

        Anyone who can associate may send these, and pynetdicom serves each in a thread of its own as it arrives
        (`node.guard`'s pipelining check never sees them): a report that arrives while another from the same
        association is still being handled, or whose event information is over `MAX_REPORT_BYTES` (decoding costs
        ~50 us per referenced instance: 14 MiB held the GIL 10 s), is answered 0x0110 before it is decoded.

        That thread starts as soon as the report is decoded, and pynetdicom sends no answer unless the association
        `is_established` when the handler returns - set only after the EVT_ACCEPTED handlers (ours writes the index)
        have returned. A PACS that reports right after the A-ASSOCIATE-AC (Orthanc does) would have its report taken
        and never answered; the report waits here for the association to be established first."""
        assoc = event.assoc
        if not _established(assoc, self._config.node.network_timeout_seconds):
            return 0x0110, None  # aborted while being accepted: pynetdicom sends no answer, nothing is handed over
        if self._on_commitment_report is None:
            return 0x0110, None
        size = _encoded_size(getattr(event.request, "EventInformation", None))
        with self._lock:
            busy = assoc in self._reporting
            refused = busy or size > MAX_REPORT_BYTES
            if not refused:
                self._reporting.add(assoc)
        if refused:
            reason = PeerRefusal.REQUESTS_PIPELINED if busy else PeerRefusal.COMMITMENT_REPORT_REFUSED
            self._refusals.record(reason, assoc.requestor.address, assoc.requestor.port,
                                  calling_ae=assoc.requestor.ae_title, size=size, limit=MAX_REPORT_BYTES)
            return 0x0110, None
        try:
            status, reply = self._on_commitment_report(event)
            if status == 0x0000:
                progressed(assoc)  # a report taken is what this association is for (node.slots)
            return status, reply
        finally:
            with self._lock:
                self._reporting.discard(assoc)

    def _on_store(self, event: evt.Event) -> int:
        """Return 0x0000 once the instance is durable and indexed, else the failure's DIMSE status."""
        assoc = event.assoc
        request = cast(C_STORE, event.request)
        calling = assoc.requestor.ae_title
        assoc_id = self._assoc_ids.get(assoc)
        context = event.context
        data: EncodedDataset = b""
        try:
            data = store_request_dataset(request)
            accepted = self._ingestor.accept(
                data,
                str(context.transfer_syntax),
                Origin(calling_ae=calling, association_id=assoc_id),
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                max_inflated_bytes=self._config.node.max_inflated_bytes,
            )
        except AdmissionRefusedError as exc:  # node.admission logs these, rate-limited: not one line per instance
            self._metrics.admission_refused(exc.reason, "dimse")
            self._metrics.rejected(type(exc).__name__, "dimse")
            return int(exc.status)
        except ReceiveError as exc:
            self._log.warning(
                "instance_refused",
                calling_ae=calling,
                assoc_id=assoc_id,
                status=f"0x{int(exc.status):04X}",
                reason=str(exc),
                size=len(data),
            )
            self._metrics.rejected(type(exc).__name__, "dimse")
            return int(exc.status)
        except Exception:  # noqa: BLE001 - the C-STORE boundary answers a status, whatever failed
            # The boundary: an unexpected failure still answers a failure status, and the node keeps serving.
            self._log.exception("instance_failed", calling_ae=calling, assoc_id=assoc_id, size=len(data))
            self._metrics.rejected("ProcessingFailure", "dimse")
            return int(StoreStatus.OUT_OF_RESOURCES_STORE)
        finally:
            discard_request_dataset(request)  # a large one's temporary file goes now, not when collected
        rec = accepted.record
        progressed(assoc)  # this association's slot is not idle (node.slots)
        self._metrics.instance_received(rec.sop_class_uid, rec.transfer_syntax_uid, len(data), "dimse")
        self._log.info(
            "instance_stored",
            calling_ae=calling,
            assoc_id=assoc_id,
            study_uid=rec.study_uid,
            series_uid=rec.series_uid,
            sop_uid=rec.sop_uid,
            transfer_syntax=rec.transfer_syntax_uid,
            size=rec.size,
            outcome=str(accepted.outcome),
        )
        return int(StoreStatus.SUCCESS)
