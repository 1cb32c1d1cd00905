"""Receive-side guards for the DIMSE listener: bounded PDUs, bounded instances, deadlines on every read.

pynetdicom (pinned at 3.0.4 in pyproject.toml) reads a whole PDU of whatever length the peer declares before any
check, gives accepted sockets no receive timeout, buffers a whole C-STORE data set in memory however long it is,
and lets a malformed A-ASSOCIATE-RQ (presentation context ID 0) or DIMSE command raise inside its reactor thread.
`GuardedServer` is pynetdicom's own `ThreadedAssociationServer` with a request handler that, for each accepted
connection, swaps in two subclasses before the association starts:

- `GuardedSocket` (an `AssociationSocket`): every read has a deadline — until the association is established,
  ``association_timeout`` from the moment the connection was accepted (ARTIM-like); afterwards
  ``network_timeout`` per read — and a PDU whose declared length exceeds ``max_pdu_bytes`` is answered with an
  A-ABORT before a byte of its body is read. An A-ASSOCIATE-RQ is decoded once with pynetdicom's own decoder
  before the state machine sees it; one that does not decode (context ID 0, truncated items) is aborted the same
  way. A failing read raises `OSError`, which pynetdicom's DUL turns into "transport closed" (Evt17).
- `GuardedDimse` (a `DIMSEServiceProvider`): each incoming data set is collected in a `BoundedDataset` — in
  memory up to `SPILL_BYTES`, then in an anonymous temporary file beside the spool — which keeps at most
  ``max_instance_bytes`` and past that drops what it holds and only counts, so the C-STORE handler can answer
  0xA700 once the (discarded) rest has arrived; a command set over `MAX_COMMAND_SET_BYTES` or a message
  pynetdicom cannot decode aborts the association (Evt19) instead of killing the reactor thread.

With an ``ssl_context`` (DICOM TLS), `GuardedServer.get_request` wraps each accepted socket without the
handshake, which pynetdicom would do right there in the acceptor thread, so a peer that connects and never sends
a ClientHello would hold off every other connection; `GuardedRequestHandler` does it in the connection's own
thread within ``association_timeout`` of the accept (the same deadline then runs on until the association is
negotiated), and the handshakes under way count against the connection cap. The reads above then go through
the TLS socket unchanged.

The server itself closes a new connection at once while `CONNECTIONS_PER_ASSOCIATION` × ``max_associations`` are
open, or while ``max_associations_per_peer`` are open from the same address (pynetdicom would give each two
threads and only count it at A-ASSOCIATE-RQ time), and listens with a backlog of that size rather than
socketserver's 5. Closing at accept rather than answering A-ASSOCIATE-RJ (transient, local-limit-exceeded) is
deliberate: an RJ answers an RQ, so the node would first have to read and decode up to ``max_pdu_bytes`` from
the peer on a thread of its own — the very cost a flood is after. Every refusal and abort goes through
`node.refusals.Refusals`: counted in the metrics, logged at most a few times per peer address and minute.

pynetdicom internals this relies on (tests/unit/test_hostile_dimse.py fails if one changes): the DUL reads a PDU
as ``socket.recv(6)`` then ``socket.recv(length)`` and maps `OSError` to Evt17; the acceptor thread waits on
``dul.to_user_queue`` for the A-ASSOCIATE primitive and treats None as its timeout; ``assoc.dimse`` and the
socket's class can be replaced before ``assoc.start()``; `DIMSEMessage.decode_msg` only calls ``write`` on
``data_set``; the FSM's state names (Sta1-Sta3 before association).

Each of these problems, with a reproduction and the fix we offer upstream, is written up in
docs/upstream-pynetdicom.md (the text of the pynetdicom issue).

What this costs per association at most: in memory one PDU (``max_pdu_bytes``, ~3 copies while it is decoded)
plus `SPILL_BYTES`; on disk one data set (``max_instance_bytes``).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.errors import InstanceTooLargeError, SpoolFullError
from node.ingest import EncodedDataset, FileSpan
from node.refusals import Refusals
from node.states import PeerRefusal
from node.tls import describe_tls_error

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA
    from pynetdicom.presentation import PresentationContext

    from node.config import NodeSection

# PS3.8 9.3.1: every PDU starts with type (1 byte), reserved (1 byte), length (4 bytes, big endian).
_PDU_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(0x01, 0x08))
_A_ASSOCIATE_RQ = 0x01
# A-ABORT source 2 = service provider; reason 6 = invalid PDU parameter value (PS3.8 Table 9-26).
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_INVALID_PARAMETER = 0x06
_RECV_CHUNK = 1 << 16  # pynetdicom reads 4 KiB at a time; 64 KiB costs fewer calls for the same memory bound
SPILL_BYTES = 16 << 20  # a C-STORE data set larger than this goes to a temporary file (CT slices stay in memory)
CONNECTIONS_PER_ASSOCIATION = 2  # open TCP connections allowed per association slot (see ReceiveLimits)
# A command set is a handful of elements (~100-300 bytes); anything near this is not a DIMSE command.
MAX_COMMAND_SET_BYTES = 1 << 16



@dataclass(frozen=True)
class ReceiveLimits:
    """The bounds one DIMSE association works within (see the module docstring)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    association_timeout: float
    network_timeout: float
    max_connections: int  # open connections (negotiating or associated); more are closed at accept
    max_per_peer: int | None = None  # open connections from one address; more are closed at accept
    spill_dir: Path | None = None  # where data sets over SPILL_BYTES go (None: they stay in memory)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections}")
        if self.max_per_peer is not None and self.max_per_peer < 1:
            raise ValueError(f"max_per_peer must be >= 1 or None, not {self.max_per_peer}")
        if self.max_pdu_bytes < 1 or self.max_instance_bytes < 1:
            raise ValueError(
                f"max_pdu_bytes and max_instance_bytes must be >= 1, not {self.max_pdu_bytes}, "
                f"{self.max_instance_bytes}"
            )
        if self.association_timeout <= 0 or self.network_timeout <= 0:
            raise ValueError(
                f"association_timeout and network_timeout must be > 0, not {self.association_timeout}, "
                f"{self.network_timeout}"
            )

    @classmethod
    def from_config(cls, node: NodeSection) -> ReceiveLimits:
        return cls(
            max_pdu_bytes=node.max_pdu_bytes,
            max_instance_bytes=node.max_instance_bytes,
            association_timeout=node.association_timeout_seconds,
            network_timeout=node.network_timeout_seconds,
            # pynetdicom refuses associations over max_associations at A-ASSOCIATE-RQ time with an
            # A-ASSOCIATE-RJ; this bounds the connections (two threads each) that get that far.
            max_connections=CONNECTIONS_PER_ASSOCIATION * node.max_associations,
            max_per_peer=node.max_associations_per_peer,
            spill_dir=node.data_dir / "incoming",  # beside the spool: same disk, cleaned by the system
        )


class BoundedDataset(BytesIO):
    """A C-STORE data set buffer: in memory up to `SPILL_BYTES`, then in an anonymous temporary file under
    ``spill_dir`` (freed by the system when closed, even after a crash); past ``limit`` it drops what it holds and
    only counts what arrives (``received``), so neither memory nor disk grow while the peer finishes sending."""

    def __init__(self, limit: int, spill_dir: Path | None) -> None:
        super().__init__()
        self.limit = limit
        self.spill_dir = spill_dir
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
                self.spilled.write(data)
                return n
        except OSError as exc:  # the DUL thread must not raise: the handler answers 0xA700 instead
            self.failure = exc
            self.discard()
            return n
        return super().write(data)

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


class GuardedSocket(AssociationSocket):
    """An `AssociationSocket` whose reads have deadlines and whose PDUs have a maximum declared length."""

    limits: ReceiveLimits
    refusals: Refusals
    _opened: float
    recorded: bool  # a refusal of this connection has been recorded already
    peer_closed: bool  # the peer closed its end (a read ended early)
    _header: bytes | None  # the header of the PDU whose body is read next

    @classmethod
    def adopt(cls, sock: AssociationSocket, limits: ReceiveLimits, refusals: Refusals) -> GuardedSocket:
        """Turn pynetdicom's freshly made acceptor socket into a `GuardedSocket` in place (its constructor has
        already queued the connection event, so a second instance cannot be made instead)."""
        sock.__class__ = cls
        guarded = cast(GuardedSocket, sock)
        guarded.limits = limits
        guarded.refusals = refusals
        guarded._opened = time.monotonic()
        guarded.recorded = guarded.peer_closed = False
        guarded._header = None
        if guarded.socket is not None:
            guarded.socket.settimeout(limits.network_timeout)  # also bounds sends to a peer that stops reading
        return guarded

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
            deadline = self._opened + timeout
        else:
            timeout = self.limits.network_timeout
            deadline = time.monotonic() + timeout
        try:
            while len(buf) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.recorded = True
                    _record(
                        self.refusals, PeerRefusal.PEER_STALLED, self.assoc, received=len(buf), expected=nr_bytes,
                        timeout=timeout, negotiating=negotiating,
                    )
                    self._wake_acceptor()
                    raise TimeoutError(f"peer sent {len(buf)} of {nr_bytes} bytes within {timeout} s")
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(min(nr_bytes - len(buf), _RECV_CHUNK))
                except TimeoutError:
                    continue  # the deadline check above decides
                if not chunk:
                    self.peer_closed = True
                    break
                buf += chunk
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
        """Decode the request the way pynetdicom's state machine will (AE-6), where an exception would kill the
        reactor thread and leave the peer unanswered."""
        try:
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
    turned into an A-ABORT instead of an exception in the reactor thread."""

    def __init__(self, assoc: Association, limits: ReceiveLimits, refusals: Refusals) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.refusals = refusals

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = BoundedDataset(self.limits.max_instance_bytes, self.limits.spill_dir)
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
        self.message = None
        self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT to the peer, A-P-ABORT to us (AA-8)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, fitting each new acceptor association with the guards above; on a TLS
    server it first completes the handshake, in this connection's own thread, under the association deadline."""

    server: GuardedServer
    _accepted_at: float
    _slot_handed_over = False  # the association thread owns (and releases) this connection's per-peer slot

    def setup(self) -> None:
        self._accepted_at = time.monotonic()

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket):
                try:
                    shaken = self._handshake(self.request)
                finally:
                    self.server.handshake_finished()
                if not shaken:
                    return
            super().handle()
        finally:
            if not self._slot_handed_over:  # the association never started: nobody else will release the slot
                self.server.release_peer(self.client_address[0])

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake within ``association_timeout``; on failure record why, close, return False."""
        timeout = self.server.limits.association_timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the handshake's flights go out at once
            sock.settimeout(timeout)  # CPython applies it to the whole do_handshake() call, not per read
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError, ConnectionResetError ...
            reason = "timed out" if isinstance(exc, TimeoutError) else describe_tls_error(exc)
            self.server.refusals.record(PeerRefusal.TLS_HANDSHAKE_FAILED, str(self.client_address[0]),
                                        int(self.client_address[1]), why=reason, timeout=timeout)
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        limits = server.limits
        guarded = GuardedSocket.adopt(cast(AssociationSocket, assoc.dul.socket), limits, server.refusals)
        guarded._opened = self._accepted_at  # the handshake counts against the negotiation deadline
        assoc.dimse = GuardedDimse(assoc, limits, server.refusals)
        run, address = assoc.run, self.client_address[0]

        def run_then_release() -> None:  # the slot is held exactly as long as the association's thread runs
            try:
                run()
            finally:
                server.release_peer(address)
                _record_unfinished_negotiation(assoc, server.refusals, limits)

        assoc.run = run_then_release  # type: ignore[method-assign]
        self._slot_handed_over = True
        return assoc


def _record_unfinished_negotiation(assoc: Association, refusals: Refusals, limits: ReceiveLimits) -> None:
    """A connection that sent no A-ASSOCIATE-RQ within the association timeout is usually closed by pynetdicom's
    own ACSE timer (silently) before this module's read deadline fires: record it here, once."""
    sock = assoc.dul.socket
    if not isinstance(sock, GuardedSocket) or sock.recorded or sock.peer_closed or assoc.requestor.primitive is not None:
        return
    waited = time.monotonic() - sock._opened
    if waited >= limits.association_timeout * 0.9:  # not a peer that connected and went away (a port check)
        sock.recorded = True
        _record(refusals, PeerRefusal.PEER_STALLED, assoc, negotiating=True, timeout=limits.association_timeout,
                waited=round(waited, 2))


class GuardedServer(ThreadedAssociationServer):
    """A `ThreadedAssociationServer` whose associations run guarded; ``limits`` may be swapped while it runs
    (new associations use the new value)."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: ReceiveLimits,
        refusals: Refusals | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.limits = limits
        self.reuse_port = reuse_port  # several listener processes share the port (node.roles)
        self._handshaking = 0  # TLS connections accepted whose handshake is not over (no association yet)
        self._handshaking_lock = threading.Lock()
        self.refusals = refusals or Refusals("dimse")
        self._per_peer: dict[str, int] = {}  # open connections by peer address (admitted, thread not yet ended)
        self._per_peer_lock = threading.Lock()
        # socketserver listens with a backlog of 5: a burst of connections (several modalities, or an attacker's
        # idle ones) then has the kernel drop SYNs and senders wait a 1 s retransmission each.
        self.request_queue_size = max(limits.max_connections, 5)
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def server_bind(self) -> None:
        """pynetdicom's bind, plus SO_REUSEPORT when asked (its own bind ignores socketserver's allow_reuse_port)."""
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's admission check: close the connection at once when ``max_connections`` are open, so
        a connection flood costs neither threads nor memory (a refused peer sees the connection closed)."""
        limits = self.limits
        address, port = str(client_address[0]), int(client_address[1])
        open_now = len(self.active_associations) + self._handshaking
        if open_now >= limits.max_connections:
            self.refusals.record(
                PeerRefusal.CONNECTION_REFUSED, address, port, open=open_now, limit=limits.max_connections
            )
            return False
        with self._per_peer_lock:
            from_peer = self._per_peer.get(address, 0)
            admitted = limits.max_per_peer is None or from_peer < limits.max_per_peer
            if admitted:
                self._per_peer[address] = from_peer + 1
        if not admitted:
            self.refusals.record(
                PeerRefusal.PEER_LIMIT_REACHED, address, port, open=from_peer, limit=limits.max_per_peer
            )
            return False
        if self.ssl_context is not None:
            with self._handshaking_lock:
                self._handshaking += 1  # until its handler's handshake_finished()
        return True

    def release_peer(self, address: str) -> None:
        """One connection from ``address`` has ended (its association thread finished, or never started)."""
        with self._per_peer_lock:
            left = self._per_peer.get(address, 0) - 1
            if left > 0:
                self._per_peer[address] = left
            else:
                self._per_peer.pop(address, None)

    def open_from(self, address: str) -> int:
        """Connections from ``address`` admitted and not yet ended."""
        with self._per_peer_lock:
            return self._per_peer.get(address, 0)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; on a TLS server wrap the socket but leave the handshake to the connection's own thread
        (pynetdicom's ``get_request`` does it here, where one silent peer would block every accept)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def handshake_finished(self) -> None:
        with self._handshaking_lock:
            self._handshaking -= 1

    @property
    def handshaking(self) -> int:
        """TLS connections accepted whose handshake is still under way."""
        return self._handshaking

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (this server is not in the AE's own server list)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def start_guarded_server(
    ae: AE, address: tuple[str, int], evt_handlers: list[Any], limits: ReceiveLimits,
    ssl_context: ssl.SSLContext | None = None,
    refusals: Refusals | None = None, reuse_port: bool = False,
) -> GuardedServer:
    """Like ``ae.start_server(address, block=False, evt_handlers=..., ssl_context=...)`` but guarded (DICOM TLS
    when ``ssl_context`` is given); returns once listening."""
    server = cast(
        GuardedServer,
        ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context, server_class=GuardedServer,
                       limits=limits, refusals=refusals, reuse_port=reuse_port),
    )
    threading.Thread(target=server.serve_forever, name="AcceptorServer@pacsnode", daemon=True).start()
    return server


__all__ = [
    "CONNECTIONS_PER_ASSOCIATION",
    "MAX_COMMAND_SET_BYTES",
    "BoundedDataset",
    "GuardedServer",
    "ReceiveLimits",
    "SPILL_BYTES",
    "discard_request_dataset",
    "start_guarded_server",
    "store_request_dataset",
]
