"""The DIMSE listener's association slots: who may connect when the caps are reached, and which idle peer gives
its slot back.

Every connection `node.acceptor.GuardedServer` admits holds a `Slot` from the accept until its association's
thread ends. The caps are ``max_associations_per_peer`` connections from one address, ``max_associations`` in all
(pynetdicom answers the next A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ, transient, local limit exceeded) and
`node.guard.CONNECTIONS_PER_ASSOCIATION` × that many connections (closed at accept).

Without more, a peer could hold slots for as long as it liked at no cost: an association kept open with a C-ECHO
before each ``network_timeout``, or a C-STORE data set sent one tiny PDU before each read's deadline (the deadline
bounds one PDU, not a message), holds its slot for hours, and 16 of them from each of two addresses lock every
modality out of a node with the default caps. So each slot notes when its association last did something useful
(`Slot.progress`): a C-STORE stored (or a Storage Commitment report taken), or another `PROGRESS_BYTES` received. A
C-ECHO, a byte now and then, or nothing, is not progress. When a connection arrives at a cap, the slot behind the
cap that has gone longest without progress, if that is at least ``reclaim_idle_seconds``, is taken back: the peer
gets an A-ABORT (when its DUL can send one within `ABORT_GRACE`, else just the closed connection), and the newcomer
waits for that association's thread to end before its own starts (at most `RECLAIM_WAIT`), so pynetdicom's count has
room for it. At the per-peer cap only that address's own slots are candidates; at the total caps any address's.
Nothing is reclaimed while no cap is reached, and an association that moves data is never the one taken.
``reclaim_idle_seconds`` unset: the caps alone, as before.

A connection that has not negotiated an association yet (a DICOM TLS handshake, or a wait for the A-ASSOCIATE-RQ)
holds its slot for up to ``association_timeout_seconds`` without being idle long enough to be reclaimed: a few
hosts opening connections and sending nothing filled every slot, and each modality was refused until those timed
out (an attacker reopening them kept it so: 64 connections every 10 s with the defaults). So at the total caps, when
no slot is idle long enough, the connection that has waited longest without negotiating is taken back instead
(oldest first: to displace a modality's own handshake, which takes milliseconds, a flood would have to open a
cap's worth of connections within that time). Negotiated associations are never displaced this way; at the
per-peer cap an address only ever meets its own connections, so this does not apply there.

A new connection starts no fresher than the stalest open connection from its address, so a peer cannot renew its
idle slots by opening more connections (each taking back one of its own, at the per-peer cap): it has to move data.
What this does not stop is a peer that keeps each slot moving data (`PROGRESS_BYTES` every
``reclaim_idle_seconds``, ~35 KB/s per slot by default, stored as instances or dropped past ``max_instance_bytes``)
or that closes all its connections and opens them afresh every ``reclaim_idle_seconds``; against a determined
attacker on the network the answers are DICOM TLS with client certificates and ``allowed_calling_aes``.

Each reclaim is recorded through `node.refusals.Refusals` (``association_reclaimed``: counted in the metrics, logged
rate-limited with the address and the idle seconds); the association's end is logged and audited as aborted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from node.refusals import Refusals
from node.states import PeerRefusal

if TYPE_CHECKING:
    from pynetdicom.association import Association

PROGRESS_BYTES = 1 << 20  # this much received counts as progress, as a stored instance does
ABORT_GRACE = 0.5  # seconds a reclaimed association's DUL gets to send its A-ABORT before the connection is closed
RECLAIM_WAIT = 3.0  # seconds a newcomer waits for the association it displaced to end
_SLOT_ATTRIBUTE = "_pacsnode_slot"  # where an association carries its slot (`attach`, `progressed`)


@dataclass(eq=False)
class Slot:
    """One admitted connection: its peer address and port, its socket, its association once made, and when it last
    made progress (``clock`` time)."""

    address: str
    port: int
    sock: Any  # the accepted socket (an ssl.SSLSocket on the TLS port)
    progress: float
    clock: Callable[[], float] = time.monotonic
    received: int = 0  # bytes received since the last progress
    admitted: float = 0.0  # when the connection was admitted (``clock`` time)
    assoc: Association | None = None
    reclaimed: bool = False
    ended: threading.Event = field(default_factory=threading.Event)

    def progressed(self) -> None:
        self.progress = self.clock()
        self.received = 0

    def wait_ended(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until this connection has ended and its association's thread is gone:
        pynetdicom counts associations by their live threads."""
        deadline = time.monotonic() + timeout
        if self.ended.wait(timeout) and self.assoc is not None:
            with contextlib.suppress(RuntimeError):  # never started
                self.assoc.join(max(0.0, deadline - time.monotonic()))

    def count(self, nbytes: int) -> None:
        """``nbytes`` more arrived from the peer; every `PROGRESS_BYTES` of them are progress."""
        self.received += nbytes
        if self.received >= PROGRESS_BYTES:
            self.progressed()


@dataclass(frozen=True)
class Admission:
    """What `Slots.admit` decided: the new ``slot`` (None: refused for ``refusal``), the ``victim`` whose slot it
    takes (None: none), and the counts the decision saw (open in all, open from this address)."""

    slot: Slot | None
    refusal: PeerRefusal | None
    victim: Slot | None
    open: int
    from_peer: int


class Slots:
    """The admitted connections of one listener process (its plaintext and TLS servers share one AE, and so one
    association count); thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._live: list[Slot] = []  # admitted, not ended, not reclaimed
        self._reclaiming: list[Slot] = []  # reclaimed, not yet ended

    def admit(self, address: str, port: int, sock: Any, *, max_associations: int, max_connections: int,
              max_per_peer: int | None, reclaim_idle: float | None) -> Admission:
        """Admit a connection from ``address``, taking back an idle slot when a cap is reached (module docstring).
        Refused (`PeerRefusal.PEER_LIMIT_REACHED` / `PeerRefusal.CONNECTION_REFUSED`) only when a connection cap is
        reached and no slot behind it is idle for ``reclaim_idle`` seconds; at ``max_associations`` without an
        idle slot the connection is admitted and pynetdicom rejects its association."""
        with self._lock:
            now = self._clock()
            mine = [s for s in self._live if s.address == address]
            open_now, from_peer = len(self._live), len(mine)
            victim, refusal = None, None
            if max_per_peer is not None and from_peer >= max_per_peer:
                victim = _stalest(mine, now, reclaim_idle)
                refusal = None if victim else PeerRefusal.PEER_LIMIT_REACHED
            elif open_now >= max_associations:
                victim = _stalest(self._live, now, reclaim_idle)
                if victim is None and reclaim_idle is not None:
                    victim = _oldest_negotiating(self._live)
                refusal = None if victim or open_now < max_connections else PeerRefusal.CONNECTION_REFUSED
            if refusal is not None:
                return Admission(None, refusal, None, open_now, from_peer)
            if victim is not None:
                victim.reclaimed = True
                self._live.remove(victim)
                self._reclaiming.append(victim)
            rest = [s.progress for s in mine if s is not victim]
            slot = Slot(address, port, sock, min([now, *rest]), self._clock, admitted=now)
            self._live.append(slot)
            return Admission(slot, None, victim, open_now, from_peer)

    def release(self, slot: Slot) -> None:
        """``slot``'s connection has ended (its association's thread finished, or none started)."""
        with self._lock:
            for group in (self._live, self._reclaiming):
                if slot in group:
                    group.remove(slot)
        slot.ended.set()

    def open_count(self) -> int:
        """Connections admitted and not yet ended (reclaimed ones on their way out included)."""
        with self._lock:
            return len(self._live) + len(self._reclaiming)

    def open_from(self, address: str) -> int:
        """Connections from ``address`` admitted, not reclaimed, not yet ended."""
        with self._lock:
            return sum(s.address == address for s in self._live)


def _stalest(candidates: list[Slot], now: float, reclaim_idle: float | None) -> Slot | None:
    """The candidate longest without progress, if that is at least ``reclaim_idle`` seconds; else None."""
    if reclaim_idle is None or not candidates:
        return None
    stalest = min(candidates, key=lambda s: s.progress)
    return stalest if now - stalest.progress >= reclaim_idle else None


def _negotiating(slot: Slot) -> bool:
    """No association negotiated on the connection yet: a TLS handshake, or a wait for the A-ASSOCIATE-RQ."""
    return slot.assoc is None or not slot.assoc.is_established


def _oldest_negotiating(candidates: list[Slot]) -> Slot | None:
    """The connection that has waited longest without negotiating an association, if any (module docstring)."""
    waiting = [s for s in candidates if _negotiating(s)]
    return min(waiting, key=lambda s: s.admitted) if waiting else None


def attach(assoc: Association, slot: Slot) -> None:
    """Let ``assoc`` (made for ``slot``'s connection) report its progress to the slot."""
    slot.assoc = assoc
    setattr(assoc, _SLOT_ATTRIBUTE, slot)


def progressed(assoc: Association) -> None:
    """``assoc`` did something useful (an instance stored, a report taken): its slot is not idle."""
    slot: Slot | None = getattr(assoc, _SLOT_ATTRIBUTE, None)
    if slot is not None:
        slot.progressed()


def reclaim(victim: Slot, refusals: Refusals) -> None:
    """End ``victim``'s connection, in a thread of its own (the acceptor must not wait): record it with its idle
    seconds, A-ABORT the association when there is one, close the connection at the latest `ABORT_GRACE` later."""
    idle = victim.clock() - victim.progress
    refusals.record(PeerRefusal.ASSOCIATION_RECLAIMED, victim.address, victim.port, idle_seconds=round(idle, 1),
                    negotiating=_negotiating(victim))
    threading.Thread(target=_end, args=(victim,), name="ReclaimSlot@pacsnode", daemon=True).start()


def _end(victim: Slot) -> None:
    assoc = victim.assoc
    if assoc is not None and assoc.is_established:
        with contextlib.suppress(Exception):  # it may be ending by itself meanwhile
            assoc.abort(block=False)  # queues the A-ABORT; the DUL sends it unless it is stuck in a read
            machine = assoc.dul.state_machine
            deadline = time.monotonic() + ABORT_GRACE
            while machine.current_state not in ("Sta1", "Sta13") and time.monotonic() < deadline:
                time.sleep(0.005)
    if not victim.ended.wait(0.05):  # a read blocked mid-PDU, or a peer that does not close: close it here
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)


__all__ = ["Admission", "Slot", "Slots", "attach", "progressed", "reclaim"]
