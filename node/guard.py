"""Receive-side guards for the DIMSE listener: bounded PDUs, bounded instances, deadlines on every read.

pynetdicom (pinned at 3.0.4 in pyproject.toml) reads a whole PDU of whatever length the peer declares before any
check, gives accepted sockets no receive timeout, buffers a whole C-STORE data set in memory however long it is,
and lets a malformed A-ASSOCIATE-RQ (presentation context ID 0) or DIMSE command raise inside its reactor thread.
`node.acceptor.GuardedServer` (the listener: connection caps, the DICOM TLS handshake) is pynetdicom's own
`ThreadedAssociationServer` with a request handler that, for each accepted connection, swaps in the two subclasses
defined here before the association starts:

- `GuardedSocket` (an `AssociationSocket`): every read has a deadline — until the association is established,
  ``association_timeout`` from the moment the connection was accepted (ARTIM-like); afterwards
  ``network_timeout`` per read; past it, only what the peer had already sent is still read (a node late to read
  does not refuse a punctual peer) — and a PDU whose declared length exceeds ``max_pdu_bytes`` is answered with an
  A-ABORT before a byte of its body is read. An A-ASSOCIATE-RQ is decoded once with pynetdicom's own decoder
  before the state machine sees it; one that does not decode (context ID 0, truncated items) or holds more items
  than a real peer proposes (`associate_rq_excess`: their decoding cost seconds of CPU) is aborted the same way.
  A failing read raises `OSError`, which pynetdicom's DUL turns into "transport closed" (Evt17).
- `GuardedDimse` (a `DIMSEServiceProvider`): each incoming data set is collected in a `BoundedDataset` — in
  memory up to `SPILL_BYTES`, then in an anonymous temporary file beside the spool — which keeps at most
  ``max_instance_bytes`` and past that drops what it holds and only counts, so the C-STORE handler can answer
  0xA700 once the (discarded) rest has arrived; a command set over `MAX_COMMAND_SET_BYTES` or a message
  pynetdicom cannot decode aborts the association (Evt19) instead of killing the reactor thread.

With DICOM TLS the reads above go through the TLS socket unchanged; `node.acceptor` completes the handshake
within the same ``association_timeout`` from the accept. Every refusal and abort goes through
`node.refusals.Refusals`: counted in the metrics, logged at most a few times per peer address and minute.

pynetdicom internals this module and `node.acceptor` rely on (tests/unit/test_hostile_dimse.py,
test_hostile_review_dimse.py fail if one changes): the DUL reads a PDU as ``socket.recv(6)`` then
``socket.recv(length)`` and maps `OSError` to Evt17; the acceptor thread waits on ``dul.to_user_queue`` for the
A-ASSOCIATE primitive and treats None as its timeout; ``assoc.dimse`` and the socket's class can be replaced before
``assoc.start()``; `DIMSEMessage.decode_msg` only calls ``write`` on ``data_set``; the FSM's state names (Sta1-Sta3
before association); ``A_ASSOCIATE_RQ._generate_items`` yields (type, bytes) per item; in `node.acceptor`, the
request handler's ``_create_association`` returns the association before its thread starts, whose ``run`` and
``dul.state_machine.do_action`` can be wrapped (P-DATA only in Sta6/Sta8: ``fsm.TRANSITION_TABLE``). For
`node.reactorwait` (blocking waits instead of the reactors' 1 ms polling): the DUL reactor calls the socket's
``ready`` once per pass after sleeping ``_run_loop_delay`` and checking ``to_provider_queue``; the association
reactor calls ``dimse.get_msg(block=False)`` once per pass; the DUL's ``to_provider_queue`` / ``to_user_queue`` and
the DIMSE ``msg_queue`` are plain `queue.Queue` attributes, only ever ``put`` into (never replaced) after
``assoc.start()``.

Each of these problems, with a reproduction and the fix we offer upstream, is written up in
docs/upstream-pynetdicom.md (the text of the pynetdicom issue).

What this costs per association at most: in memory one PDU (``max_pdu_bytes``, ~3 copies while it is decoded)
plus `SPILL_BYTES`; on disk one data set (``max_instance_bytes``).
"""

from __future__ import annotations

import contextlib
import errno
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket

from node.admission import below_reserve
from node.errors import InstanceTooLargeError, SpoolFullError
from node.ingest import EncodedDataset, FileSpan
from node.reactorwait import Doorbell, next_message, wait_readable
from node.refusals import Refusals
from node.states import PeerRefusal

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from node.config import AdmissionSection, NodeSection
    from node.slots import Slot

# PS3.8 9.3.1: every PDU starts with type (1 byte), reserved (1 byte), length (4 bytes, big endian).
_PDU_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(0x01, 0x08))
_A_ASSOCIATE_RQ = 0x01
# A-ABORT source 2 = service provider; reason 6 = invalid PDU parameter value (PS3.8 Table 9-26).
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_INVALID_PARAMETER = 0x06
_RECV_CHUNK = 1 << 16  # pynetdicom reads 4 KiB at a time; 64 KiB costs fewer calls for the same memory bound
SPILL_BYTES = 16 << 20  # a C-STORE data set larger than this goes to a temporary file (CT slices stay in memory)
SPILL_CHECK_BYTES = 64 << 20  # a spilling data set re-checks the disk's free space each time this much more arrived
CONNECTIONS_PER_ASSOCIATION = 2  # open TCP connections allowed per association slot (see ReceiveLimits)
MAX_COMMAND_SET_BYTES = 1 << 16  # a command set is a handful of elements (~100-300 bytes): this is none
# A-ASSOCIATE-RQ items (PS3.8 9.3.2): context IDs are odd, 1-255; DICOM defines ~63 transfer syntaxes; a role
# selection and two extended negotiations at most per abstract syntax, plus a few other user information sub-items.
_VARIABLE_ITEMS, _PRESENTATION_CONTEXT_RQ, _TRANSFER_SYNTAX, _USER_INFORMATION = 74, 0x20, 0x40, 0x50
MAX_PRESENTATION_CONTEXTS, MAX_TRANSFER_SYNTAXES_PER_CONTEXT = 128, 128
MAX_TRANSFER_SYNTAXES, MAX_USER_SUB_ITEMS = 128 * 64, 3 * 128 + 16  # in all the contexts; in user information


@dataclass(frozen=True)
class ReceiveLimits:
    """The bounds one DIMSE association works within (see the module docstring)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    association_timeout: float
    network_timeout: float
    max_connections: int  # open connections (negotiating or associated); more are closed at accept
    max_per_peer: int | None = None  # open connections from one address; more are closed at accept
    max_associations: int | None = None  # associations pynetdicom takes (None: max_connections); see node.slots
    reclaim_idle: float | None = None  # a slot this long without progress may be reclaimed at a cap (node.slots)
    spill_dir: Path | None = None  # where data sets over SPILL_BYTES go (None: they stay in memory)
    spill_admission: AdmissionSection | None = None  # its hard reserve is what a spill never eats into (None: none)
    spool_dir: Path | None = None  # which file system holds the spool ([admission] judges the others' reserve capped)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections}")
        if self.max_per_peer is not None and self.max_per_peer < 1:
            raise ValueError(f"max_per_peer must be >= 1 or None, not {self.max_per_peer}")
        if self.max_pdu_bytes < 1 or self.max_instance_bytes < 1:
            raise ValueError(f"max_pdu_bytes and max_instance_bytes must be >= 1, not {self.max_pdu_bytes}, "
                             f"{self.max_instance_bytes}")
        if self.association_timeout <= 0 or self.network_timeout <= 0:
            raise ValueError(f"association_timeout and network_timeout must be > 0, not {self.association_timeout}, "
                             f"{self.network_timeout}")

    @property
    def listen_backlog(self) -> int:
        """The listen queue a DIMSE port gets: socketserver's 5 would have the kernel drop SYNs in a burst
        (several modalities, or an attacker's idle connections) and senders wait a 1 s retransmission each."""
        return max(self.max_connections, 5)

    @classmethod
    def from_config(cls, node: NodeSection, admission: AdmissionSection | None = None) -> ReceiveLimits:
        return cls(
            spill_admission=admission,
            spool_dir=node.spool_dir,
            max_pdu_bytes=node.max_pdu_bytes,
            max_instance_bytes=node.max_instance_bytes,
            association_timeout=node.association_timeout_seconds,
            network_timeout=node.network_timeout_seconds,
            # pynetdicom refuses associations over max_associations at A-ASSOCIATE-RQ time with an
            # A-ASSOCIATE-RJ; this bounds the connections (two threads each) that get that far.
            max_connections=CONNECTIONS_PER_ASSOCIATION * node.max_associations,
            max_per_peer=node.max_associations_per_peer,
            max_associations=node.max_associations, reclaim_idle=node.reclaim_idle_seconds,
            spill_dir=node.data_dir / "incoming",  # beside the spool: same disk, cleaned by the system
        )


class BoundedDataset(BytesIO):
    """A C-STORE data set buffer: in memory up to `SPILL_BYTES`, then in an anonymous temporary file under
    ``spill_dir`` (freed by the system when closed, even after a crash); past ``limit`` it drops what it holds and
    only counts what arrives (``received``), so neither memory nor disk grow while the peer finishes sending."""

    def __init__(self, limit: int, spill_dir: Path | None, admission: AdmissionSection | None = None,
                 spool_dir: Path | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.spill_dir = spill_dir
        self.admission, self.spool_dir = admission, spool_dir
        self._checked_at = 0  # received bytes at the last free-space check
        self.received = 0
        self.spilled: IO[bytes] | None = None
        self.failure: OSError | None = None  # the temporary file could not be written (disk full)

    @property
    def exceeded(self) -> bool:
        return self.received > self.limit

    def write(self, data: ReadableBuffer, /) -> int:
        n = memoryview(data).nbytes
        self.received += n
        if self.exceeded or self.failure is not None:
            self.discard()
            return n
        try:
            if self.spilled is None and self.spill_dir is not None and self.tell() + n > SPILL_BYTES:
                self.spilled = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115 - closed in discard()
                self.spilled.write(self.getvalue())
                self.seek(0)
                self.truncate()
            if self.spilled is not None:
                if self.received - self._checked_at >= SPILL_CHECK_BYTES:
                    self._checked_at = self.received
                    self._check_room()
                self.spilled.write(data)
                return n
        except OSError as exc:  # the DUL thread must not raise: the handler answers 0xA700 instead
            self.failure = exc
            self.discard()
            return n
        return super().write(data)

    def _check_room(self) -> None:
        """Raise ENOSPC once the spill disk's free space is below the reserve admission applies to it
        (`node.admission.below_reserve`): 32 associations each spilling up to ``max_instance_bytes`` could otherwise
        fill the disk the spool and the index live on."""
        assert self.spill_dir is not None
        spool = self.spool_dir or self.spill_dir
        if self.admission is not None and below_reserve(self.spill_dir, self.admission, spool):
            raise OSError(errno.ENOSPC, "the data disk is down to its reserve")

    def encoded(self) -> EncodedDataset:
        """What was received, for `Ingestor.accept`; `InstanceTooLargeError` / `SpoolFullError` (0xA700) when it
        was dropped."""
        if self.exceeded:
            raise InstanceTooLargeError(
                f"data set of {self.received} bytes exceeds the node's limit of {self.limit} bytes"
            )
        if self.failure is not None:
            raise SpoolFullError(f"no room to receive a data set of {self.received} bytes: {self.failure}")
        if self.spilled is not None:
            self.spilled.flush()
            return FileSpan(self.spilled, 0, self.received)
        return self.getvalue()

    def discard(self) -> None:
        """Free the memory and the temporary file (idempotent)."""
        if self.tell():
            self.seek(0)
            self.truncate()
        if self.spilled is not None:
            self.spilled.close()
            self.spilled = None


def store_request_dataset(request: C_STORE) -> EncodedDataset:
    """The encoded data set of a C-STORE request: bytes, or a `FileSpan` over the temporary file a large one was
    spilled to. Raises `InstanceTooLargeError` (over ``max_instance_bytes``) or `SpoolFullError` (no room for
    the temporary file), both 0xA700, when `GuardedDimse` had to drop it."""
    dataset = request.DataSet
    if isinstance(dataset, BoundedDataset):
        return dataset.encoded()
    return dataset.getvalue() if dataset is not None else b""


def discard_request_dataset(request: C_STORE) -> None:
    """Free a C-STORE request's data set now (memory and temporary file) rather than when it is collected."""
    if isinstance(request.DataSet, BoundedDataset):
        request.DataSet.discard()


def _record(refusals: Refusals, reason: PeerRefusal, assoc: Association, **context: Any) -> None:
    refusals.record(reason, assoc.requestor.address, assoc.requestor.port, **context)


def _arrived(sock: Any, most: int) -> bytes | None:
    """What has already arrived on ``sock`` (at most ``most`` bytes, b"" when the peer closed), without waiting;
    None when nothing is waiting. Leaves the socket non-blocking (the caller restores its timeout)."""
    sock.settimeout(0)
    try:
        return bytes(sock.recv(min(most, _RECV_CHUNK)))
    except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
        return None


def associate_rq_excess(pdu_bytes: bytes) -> str | None:
    """What an A-ASSOCIATE-RQ holds beyond any real peer's need (None: nothing), counted by pynetdicom's item walker
    before it is decoded: pynetdicom adds each transfer syntax after a linear search of its context's, so 1 MiB of
    15 contexts x 6,500 syntaxes held the GIL ~10 s. A truncated item raises (the caller's malformed case)."""
    transfer_syntaxes = user_items = 0  # each walk stops past its bound: a flood costs no more than that
    for items, (item_type, item) in enumerate(A_ASSOCIATE_RQ._generate_items(pdu_bytes[_VARIABLE_ITEMS:]), 1):
        if item_type == _PRESENTATION_CONTEXT_RQ:
            sub_items = islice(A_ASSOCIATE_RQ._generate_items(item[8:]), MAX_TRANSFER_SYNTAXES_PER_CONTEXT + 2)
            if (in_context := sum(t == _TRANSFER_SYNTAX for t, _ in sub_items)) > MAX_TRANSFER_SYNTAXES_PER_CONTEXT:
                return f"over {MAX_TRANSFER_SYNTAXES_PER_CONTEXT} transfer syntaxes in a presentation context"
            transfer_syntaxes += in_context
        elif item_type == _USER_INFORMATION:
            user_items += sum(1 for _ in islice(A_ASSOCIATE_RQ._generate_items(item[4:]), MAX_USER_SUB_ITEMS + 1))
        if items > MAX_PRESENTATION_CONTEXTS + 2 or transfer_syntaxes > MAX_TRANSFER_SYNTAXES \
                or user_items > MAX_USER_SUB_ITEMS:  # items: the contexts, application context, user information
            return f"{items} items, {transfer_syntaxes} transfer syntaxes, {user_items} user sub-items so far"
    return None


class GuardedSocket(AssociationSocket):
    """An `AssociationSocket` whose reads have deadlines and whose PDUs have a maximum declared length."""

    limits: ReceiveLimits
    refusals: Refusals
    opened_at: float  # when the connection was accepted (time.monotonic)
    recorded: bool  # a refusal of this connection has been recorded already
    peer_closed: bool  # the peer closed its end (a read ended early)
    _header: bytes | None  # the header of the PDU whose body is read next
    doorbell: Doorbell | None = None  # set by `node.reactorwait.install`: ``ready`` waits instead of polling
    slot: Slot | None = None  # the connection's `node.slots.Slot`: counts what arrives as progress

    @classmethod
    def adopt(
        cls, sock: AssociationSocket, limits: ReceiveLimits, refusals: Refusals, opened: float | None = None
    ) -> GuardedSocket:
        """Turn pynetdicom's freshly made acceptor socket into a `GuardedSocket` in place (its constructor has
        already queued the connection event, so a second instance cannot be made instead). ``opened``: when the
        connection was accepted (`time.monotonic`; default now), where the negotiation deadline counts from."""
        sock.__class__ = cls
        guarded = cast(GuardedSocket, sock)
        guarded.limits = limits
        guarded.refusals = refusals
        guarded.opened_at = time.monotonic() if opened is None else opened
        guarded.recorded = guarded.peer_closed = False
        guarded._header = None
        if guarded.socket is not None:
            guarded.socket.settimeout(limits.network_timeout)  # also bounds sends to a peer that stops reading
        return guarded

    @property
    def ready(self) -> bool:
        """The DUL reactor's per-pass check for incoming data. With a doorbell (`node.reactorwait`): waits up to
        `IDLE_WAIT` for data or for something queued to send (not at all while the DUL has events queued), instead of the reactor's 1 ms sleep before a
        zero-timeout check; after the connection closed it sleeps 1 ms as pynetdicom's loop did (no spinning)."""
        bell, sock = self.doorbell, self.socket
        if bell is None or sock is None or not self._is_connected:
            if bell is not None:
                time.sleep(0.001)
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        dul = self.assoc.dul
        busy = not (dul.event_queue.empty() and dul.to_provider_queue.empty())  # handled after this check: no wait
        try:
            return wait_readable(sock, bell, busy)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check queues the transport event
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def close(self) -> None:
        super().close()
        if self.doorbell is not None:
            self.doorbell.close()

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closed). Raises `TimeoutError` past the deadline and
        `ConnectionAbortedError` (after sending an A-ABORT) for a PDU over ``max_pdu_bytes`` or an
        A-ASSOCIATE-RQ that does not decode; pynetdicom's DUL treats either as a closed connection."""
        header, self._header = self._header, None
        data = self._read(nr_bytes)
        if header is None:
            if len(data) == _PDU_HEADER.size:
                pdu_type, _, length = _PDU_HEADER.unpack(bytes(data))
                if pdu_type in _PDU_TYPES:  # pynetdicom reads the body next (otherwise it aborts: Evt19)
                    if length > self.limits.max_pdu_bytes:
                        self._refuse(
                            PeerRefusal.PDU_TOO_LARGE, pdu_type=pdu_type, declared=length, limit=self.limits.max_pdu_bytes
                        )
                    self._header = bytes(data)
        elif header[0] == _A_ASSOCIATE_RQ and len(data) == nr_bytes:
            self._check_associate_rq(header + bytes(data))
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        buf = bytearray()
        if sock is None:
            return buf
        negotiating = self._negotiating()
        if negotiating:  # ARTIM-like: the whole negotiation, counted from the accept
            timeout = self.limits.association_timeout
            deadline = self.opened_at + timeout
        else:
            timeout = self.limits.network_timeout
            deadline = time.monotonic() + timeout
        try:
            while len(buf) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    sock.settimeout(remaining)
                    try:
                        chunk = sock.recv(min(nr_bytes - len(buf), _RECV_CHUNK))
                    except TimeoutError:
                        continue  # the deadline check above decides
                elif (arrived := _arrived(sock, nr_bytes - len(buf))) is not None:
                    # Past the deadline, what the peer has already sent still counts: a node slow to read (its
                    # thread started late on a loaded machine) is not a stalled peer. Only what is waiting now.
                    chunk = arrived
                else:
                    self.recorded = True
                    _record(
                        self.refusals, PeerRefusal.PEER_STALLED, self.assoc, received=len(buf), expected=nr_bytes,
                        timeout=timeout, negotiating=negotiating,
                    )
                    self._wake_acceptor()
                    raise TimeoutError(f"peer sent {len(buf)} of {nr_bytes} bytes within {timeout} s")
                if not chunk:  # closed (by the peer, or by `node.slots` taking the slot back: a local shutdown)
                    self.peer_closed = True
                    self._wake_acceptor()  # before any request pynetdicom's DUL tells its acceptor nothing
                    break
                buf += chunk
                if self.slot is not None:
                    self.slot.count(len(chunk))
        finally:
            if self.socket is not None:
                with contextlib.suppress(OSError):  # closed meanwhile: the read's own error is what matters
                    self.socket.settimeout(self.limits.network_timeout)
        return buf

    def _negotiating(self) -> bool:
        """Whether the association is not yet established. The DUL's own state, not ``assoc.is_established``:
        the acceptor thread sets that only after the A-ASSOCIATE-AC has gone out, and the peer's first P-DATA
        may be read before then. Sta1 counts: the DUL may read the first PDU before it has processed the
        connection event (Evt5); after the association no reads happen in Sta1."""
        return self.assoc.dul.state_machine.current_state in ("Sta1", "Sta2", "Sta3")

    def _check_associate_rq(self, pdu_bytes: bytes) -> None:
        """Count the items (`associate_rq_excess`), then decode the request as pynetdicom's state machine will (AE-6),
        where an exception would kill the reactor thread and leave the peer unanswered."""
        try:
            error = associate_rq_excess(pdu_bytes)
            if error is None:
                pdu = A_ASSOCIATE_RQ()
                pdu.decode(pdu_bytes)
                pdu.to_primitive()
                return
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises ValueError, struct.error, KeyError ... on malformed items
            error = f"{type(exc).__name__}: {exc}"[:200]
        self._refuse(PeerRefusal.ASSOCIATE_RQ_MALFORMED, error=error)

    def _refuse(self, event: PeerRefusal, **context: Any) -> None:
        """A-ABORT the peer, close the transport (via pynetdicom's Evt17) and wake the acceptor thread."""
        self.recorded = True
        _record(self.refusals, event, self.assoc, **context)
        abort = A_ABORT_RQ()
        abort.source = _ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = _ABORT_INVALID_PARAMETER
        if self.socket is not None:
            with contextlib.suppress(OSError):  # not self.send(): that would queue a second Evt17
                self.socket.sendall(abort.encode())
        self._wake_acceptor()
        raise ConnectionAbortedError(event)

    def _wake_acceptor(self) -> None:
        """Before association, pynetdicom's acceptor thread waits ``acse_timeout`` for the A-ASSOCIATE-RQ and
        holds an association slot meanwhile; an empty item makes it give up now, as if that wait had expired."""
        assoc = self.assoc
        waiting = assoc.requestor.primitive is None and assoc.dul.state_machine.current_state in ("Sta1", "Sta2")
        if waiting:
            assoc.dul.to_user_queue.put(cast(Any, None))


class GuardedDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with each data set collected in a `BoundedDataset` and decoding failures
    turned into an A-ABORT instead of an exception in the reactor thread. A peer that starts a request while a
    complete one still waits in the queue is aborted too: the node negotiates no asynchronous operations window
    (one request at a time), and pynetdicom's reader would otherwise queue every pipelined message, each up to
    `SPILL_BYTES` in memory, while the association thread works on the first."""

    def __init__(self, assoc: Association, limits: ReceiveLimits, refusals: Refusals) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.refusals = refusals

    bell: threading.Event | None = None  # set by `node.reactorwait.install`: ``get_msg`` waits instead of polling

    def get_msg(self, block: bool = False) -> Any:
        """pynetdicom's, except that the association reactor's non-blocking call waits (`next_message`)."""
        if block or self.bell is None:
            return super().get_msg(block)
        return next_message(self)

    aborted = False  # an A-ABORT is on its way: what the peer sent after it is dropped

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.aborted:
            return
        if self.message is None:
            if self.msg_queue.qsize():  # a new request while a complete one waits for the association thread
                self._abort(PeerRefusal.REQUESTS_PIPELINED, waiting=self.msg_queue.qsize())
                return
            self.message = DIMSEMessage()
            self.message.data_set = BoundedDataset(self.limits.max_instance_bytes, self.limits.spill_dir,
                                                   self.limits.spill_admission, self.limits.spool_dir)
        command = self.message.encoded_command_set
        incoming = sum(len(pdv) - 1 for _, pdv in primitive.presentation_data_value_list if pdv and pdv[0] & 1)
        if command.tell() + incoming > MAX_COMMAND_SET_BYTES:
            self._abort(PeerRefusal.COMMAND_SET_TOO_LARGE, size=command.tell() + incoming, limit=MAX_COMMAND_SET_BYTES)
            return
        try:
            super().receive_primitive(primitive)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises KeyError, IndexError, ValueError ... on malformed messages
            self._abort(PeerRefusal.DIMSE_MESSAGE_MALFORMED, error=f"{type(exc).__name__}: {exc}"[:200])

    def _abort(self, event: PeerRefusal, **context: Any) -> None:
        _record(self.refusals, event, self.assoc, **context)
        self.aborted = True
        self.message = None
        self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT to the peer, A-P-ABORT to us (AA-8)


__all__ = [
    "CONNECTIONS_PER_ASSOCIATION", "MAX_COMMAND_SET_BYTES", "MAX_PRESENTATION_CONTEXTS", "MAX_TRANSFER_SYNTAXES",
    "MAX_TRANSFER_SYNTAXES_PER_CONTEXT", "MAX_USER_SUB_ITEMS", "BoundedDataset", "GuardedDimse", "GuardedSocket",
    "ReceiveLimits", "SPILL_BYTES", "associate_rq_excess", "discard_request_dataset", "store_request_dataset"]
