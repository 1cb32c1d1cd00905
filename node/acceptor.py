"""The DIMSE listener's accepting side: connection caps, per-peer caps, and the DICOM TLS handshake in each
connection's own thread; each accepted association is then fitted with `node.guard`'s socket and DIMSE guards.

`GuardedServer` is pynetdicom's own `ThreadedAssociationServer` with `GuardedRequestHandler`, which for each
accepted connection swaps in `node.guard.GuardedSocket` (read deadlines, PDU size cap) and `node.guard.GuardedDimse`
(bounded data sets) before the association starts; `start_guarded_server` starts it in the ``AcceptorServer@pacsnode``
thread.

With an ``ssl_context`` (DICOM TLS), `GuardedServer.get_request` wraps each accepted socket without the
handshake, which pynetdicom would do right there in the acceptor thread, so a peer that connects and never sends
a ClientHello would hold off every other connection; `GuardedRequestHandler` does it in the connection's own
thread within ``association_timeout`` of the accept (the same deadline then runs on until the association is
negotiated), and the handshakes under way count against the connection cap. The reads then go through the TLS
socket unchanged.

The server itself closes a new connection at once while `node.guard.CONNECTIONS_PER_ASSOCIATION` ×
``max_associations`` are open, or while ``max_associations_per_peer`` are open from the same address (pynetdicom
would give each two threads and only count it at A-ASSOCIATE-RQ time), unless a slot behind that cap has been idle
for ``reclaim_idle_seconds`` and is taken back instead (`node.slots`, which also takes one back at
``max_associations``, where pynetdicom would reject the association), and listens with a backlog of that size
rather than socketserver's 5. Closing at accept rather than answering A-ASSOCIATE-RJ (transient,
local-limit-exceeded) is deliberate: an RJ answers an RQ, so the node would first have to read and decode up to
``max_pdu_bytes`` from the peer on a thread of its own — the very cost a flood is after. Every refusal goes
through `node.refusals.Refusals`: counted in the metrics, logged at most a few times per peer address and minute.
A failed TLS handshake is also written to the audit trail (`node.audit.AuditTrail.tls_handshake_failed`, 110114
login failure, as an AE title refused at A-ASSOCIATE time is), one by one as far as the log records it; past that
burst the count goes in one `failures_unrecorded` record (~1.2 KB a record: a flood of bad handshakes grew the trail
on the data disk without bound). A connection that ends or stays silent before TLS begins (a TCP probe, a scan) is
not a login attempt: not audited one by one.

The pynetdicom 3.0.4 internals this relies on are listed, with `node.guard`'s, in `node.guard`'s docstring.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node import reactorwait
from node.guard import BoundedDataset, GuardedDimse, GuardedSocket, ReceiveLimits
from node.refusals import Refusals
from node.slots import RECLAIM_WAIT, Slot, Slots, attach, reclaim
from node.states import PeerRefusal
from node.tls import describe_tls_error, presented_itself

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    from node.audit import AuditTrail
    from node.config import NodeConfig


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, fitting each new acceptor association with `node.guard`'s guards; on a TLS
    server it first completes the handshake, in this connection's own thread, under the association deadline."""

    server: GuardedServer
    _accepted_at: float
    _slot_handed_over = False  # the association thread owns (and releases) this connection's slot

    def setup(self) -> None:
        self._accepted_at = time.monotonic()
        self.slot, self.displaced = self.server.take_slot(self.request)

    def handle(self) -> None:
        try:
            if self.displaced is not None:  # pynetdicom counts associations by thread: let the reclaimed one end
                self.displaced.wait_ended(RECLAIM_WAIT)
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
                self.server.slots.release(self.slot)

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake within ``association_timeout``; on failure record why, close, return False."""
        timeout = self.server.limits.association_timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the handshake's flights go out at once
            sock.settimeout(timeout)  # CPython applies it to the whole do_handshake() call, not per read
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError, ConnectionResetError ...
            reason = "timed out" if isinstance(exc, TimeoutError) else describe_tls_error(exc)
            address, port = str(self.client_address[0]), int(self.client_address[1])
            logged, unrecorded = self.server.refusals.record_counted(PeerRefusal.TLS_HANDSHAKE_FAILED, address, port,
                                                                     why=reason, timeout=timeout)
            audit = self.server.audit
            if audit is not None and unrecorded:  # past the burst the log allows, counted (node.refusals)
                audit.failures_unrecorded(what="DICOM TLS handshakes failed", peer=address, count=unrecorded)
            if audit is not None and logged and presented_itself(exc, reason):
                audit.tls_handshake_failed(peer=f"{address}:{port}", reason=reason)
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        limits = server.limits
        # opened at the accept: the TLS handshake counts against the negotiation deadline
        sock = GuardedSocket.adopt(cast(AssociationSocket, assoc.dul.socket), limits, server.refusals,
                                   self._accepted_at)
        sock.slot = slot = self.slot
        attach(assoc, slot)
        assoc.dimse = GuardedDimse(assoc, limits, server.refusals)
        reactorwait.install(assoc)  # the reactors wait for work instead of polling every 1 ms
        drop_late_data(assoc)
        _close_when_given_up(assoc, server.refusals, limits)
        run = assoc.run

        def run_then_release() -> None:  # the slot is held exactly as long as the association's thread runs
            try:
                run()
            finally:
                server.slots.release(slot)
                _record_unfinished_negotiation(assoc, server.refusals, limits)
                _discard_unanswered(assoc)
                if server.on_ended is not None:
                    server.on_ended(assoc)

        assoc.run = run_then_release  # type: ignore[method-assign]
        self._slot_handed_over = True
        return assoc



def drop_late_data(assoc: Association) -> None:
    """A response queued after the association began to end (the node aborted it between the handler's return,
    where pynetdicom checks ``is_established``, and the queueing) reached pynetdicom's state machine in a state
    without P-DATA (Sta13: A-ABORT sent, waiting for the peer to close), which raised InvalidEventError and killed
    the DUL thread. Such a P-DATA is taken off the queue and dropped: the peer was told by the A-ABORT. `node.scu`
    uses it too, for an answer to a report that crossed its A-RELEASE-RQ (Sta7 allows no P-DATA either)."""
    dul: Any = assoc.dul
    machine = dul.state_machine
    do_action = machine.do_action

    def do_action_or_drop(event: str) -> None:
        if event == "Evt9" and (event, machine.current_state) not in TRANSITION_TABLE:
            if isinstance(next(iter(dul.to_provider_queue.queue), None), P_DATA):
                dul.to_provider_queue.get(False)
            return
        do_action(event)

    machine.do_action = do_action_or_drop


def _close_when_given_up(assoc: Association, refusals: Refusals, limits: ReceiveLimits) -> None:
    """When the acceptor thread stops waiting for the A-ASSOCIATE-RQ (its ``acse_timeout``), pynetdicom's ``kill``
    waits for the DUL to reach Sta1. A DUL that received the request just after that wait ended is in Sta3 —
    awaiting a response nobody will give, with no timer running — so the thread, its slot and the silent peer
    waited until the peer gave up (10 s in a CI run on a loaded machine: a 130 KB request decoded just past the 1 s
    deadline). The connection is closed first, so the DUL reaches Sta1 at once (Evt17). Only then: a rejection or
    an abort, which also call ``kill``, come after the request was taken and must be sent before the close. A
    connection that sent nothing is recorded as stalled first: after the close it would read as one the peer
    closed, which is not counted."""
    kill = assoc.kill

    def close_then_kill() -> None:
        sock = assoc.dul.socket
        if assoc.requestor.primitive is None and sock is not None and sock.socket is not None:
            _record_unfinished_negotiation(assoc, refusals, limits)
            with contextlib.suppress(OSError):
                sock.socket.shutdown(socket.SHUT_RDWR)
        kill()

    assoc.kill = close_then_kill  # type: ignore[method-assign]


def _record_unfinished_negotiation(assoc: Association, refusals: Refusals, limits: ReceiveLimits) -> None:
    """A connection that sent no A-ASSOCIATE-RQ within the association timeout is usually closed by pynetdicom's
    own ACSE timer (silently) before `node.guard`'s read deadline fires: record it here, once."""
    sock = assoc.dul.socket
    if not isinstance(sock, GuardedSocket) or sock.recorded or sock.peer_closed or assoc.requestor.primitive is not None:
        return
    waited = time.monotonic() - sock.opened_at
    if waited >= limits.association_timeout * 0.9:  # not a peer that connected and went away (a port check)
        sock.recorded = True
        refusals.record(PeerRefusal.PEER_STALLED, assoc.requestor.address, assoc.requestor.port, negotiating=True,
                        timeout=limits.association_timeout, waited=round(waited, 2))


def _discard_unanswered(assoc: Association) -> None:
    """Free the data sets an ended association leaves unanswered (the one it was receiving, any still queued) now:
    the association's objects form reference cycles, and a spilled one's temporary file (up to max_instance_bytes)
    stayed open, deleted, until the next garbage collection — 15-30 s in a listener, longer when it is idle."""
    dimse = assoc.dimse
    pending = [getattr(dimse.message, "data_set", None)]
    with contextlib.suppress(queue.Empty):
        while True:
            pending.append(getattr(dimse.msg_queue.get_nowait()[1], "DataSet", None))
    for data_set in pending:
        if isinstance(data_set, BoundedDataset):
            data_set.discard()


class GuardedServer(ThreadedAssociationServer):
    """A `ThreadedAssociationServer` whose associations run guarded; `apply_config` swaps ``limits`` while it
    runs (new associations use the new value)."""

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
        listening: socket.socket | None = None,
        audit: AuditTrail | None = None,
        slots: Slots | None = None,
        on_ended: Callable[[Association], None] | None = None,
    ) -> None:
        self.limits = limits
        self.on_ended = on_ended  # called in each association's thread as it ends, after every event handler
        self.audit = audit  # where each failed TLS handshake is recorded (node.audit); None: not audited
        self.reuse_port = reuse_port  # several listener processes share the port (node.roles)
        self._adopted = listening  # a listening socket shared with other listeners (node.listenfds): no bind
        self._handshaking = 0  # TLS connections accepted whose handshake is not over (no association yet)
        self._handshaking_lock = threading.Lock()
        self.refusals = refusals or Refusals("dimse")
        # Connections admitted and not yet ended (node.slots), shared with the AE's other server. Counted here at
        # the admission rather than from pynetdicom's live association threads, which register a moment after the
        # accept: in a burst, connections admitted in that moment were not yet counted and the cap let more in
        # (seen once in the suite under load).
        self.slots = slots or Slots()
        self._admitted: dict[Any, tuple[Slot, Slot | None]] = {}  # accepted socket -> its slot, the one it displaced
        self._admitted_lock = threading.Lock()
        self.request_queue_size = limits.listen_backlog
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def apply_config(self, config: NodeConfig) -> None:
        """Hot reload: new associations run under the limits and deadlines of ``config.node``."""
        self.limits = ReceiveLimits.from_config(config.node, config.admission)

    def server_bind(self) -> None:
        """pynetdicom's bind, plus SO_REUSEPORT when asked (its own bind ignores socketserver's allow_reuse_port);
        with a shared listening socket (`node.listenfds`), that socket instead of binding one."""
        if self._adopted is not None:
            assert self.socket is not None
            self.socket.close()
            self.socket = self._adopted
            self.server_address = self.socket.getsockname()
            return
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self._adopted is None:  # a shared socket listens already, with the supervisor's backlog
            super().server_activate()

    def open_connections(self) -> int:
        """Connections holding a slot, from their admission until their thread ends (TLS handshakes included)."""
        return self.slots.open_count()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's admission check (`node.slots.Slots.admit`): at a cap, take back a slot idle long enough
        or close the new connection at once, so a connection flood costs neither threads nor memory."""
        limits = self.limits
        address, port = str(client_address[0]), int(client_address[1])
        decided = self.slots.admit(
            address, port, request, max_associations=limits.max_associations or limits.max_connections,
            max_connections=limits.max_connections, max_per_peer=limits.max_per_peer, reclaim_idle=limits.reclaim_idle,
        )
        if decided.slot is None:
            limit, open_now = ((limits.max_connections, decided.open) if decided.refusal is PeerRefusal.CONNECTION_REFUSED
                               else (limits.max_per_peer, decided.from_peer))
            assert decided.refusal is not None
            self.refusals.record(decided.refusal, address, port, open=open_now, limit=limit)
            return False
        if decided.victim is not None:
            reclaim(decided.victim, self.refusals)
        with self._admitted_lock:
            self._admitted[request] = (decided.slot, decided.victim)
        if self.ssl_context is not None:
            with self._handshaking_lock:
                self._handshaking += 1  # until its handler's handshake_finished()
        return True

    def take_slot(self, request: Any) -> tuple[Slot, Slot | None]:
        """The slot `verify_request` gave ``request``'s connection, and the one it displaced (None: none)."""
        with self._admitted_lock:
            return self._admitted.pop(request)

    def open_from(self, address: str) -> int:
        """Connections from ``address`` admitted and not yet ended (reclaimed ones on their way out excepted)."""
        return self.slots.open_from(address)

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
    refusals: Refusals | None = None, reuse_port: bool = False, listening: socket.socket | None = None,
    audit: AuditTrail | None = None, slots: Slots | None = None,
    on_ended: Callable[[Association], None] | None = None,
) -> GuardedServer:
    """Like ``ae.start_server(address, block=False, evt_handlers=..., ssl_context=...)`` but guarded (DICOM TLS
    when ``ssl_context`` is given); returns once listening. ``listening``: accept on that socket, shared with other
    listener processes (`node.listenfds`), instead of binding ``address``. ``audit``: records each failed TLS
    handshake (110114 login failure). ``slots``: shared with the AE's other server (`node.slots`). ``on_ended``:
    called with each association in its own thread as that ends."""
    server = cast(
        GuardedServer,
        ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context, server_class=GuardedServer,
                       limits=limits, refusals=refusals, reuse_port=reuse_port, listening=listening, audit=audit,
                       slots=slots, on_ended=on_ended),
    )
    threading.Thread(target=server.serve_forever, name="AcceptorServer@pacsnode", daemon=True).start()
    return server


__all__ = ["GuardedRequestHandler", "GuardedServer", "drop_late_data", "start_guarded_server"]
