"""Blocking waits for pynetdicom's two reactor loops of an accepted association, instead of 1 ms polling sleeps.

pynetdicom 3.0.4 runs each association in two threads that poll: the DUL reactor (`DULServiceProvider.run_reactor`)
sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing, then looks at its outgoing queue and does a
zero-timeout ``select`` on the socket; the association reactor (`Association._run_reactor`) sleeps 1 ms and then
takes a DIMSE message off the DIMSE provider's queue without blocking. A received C-STORE therefore waits for the
DUL's sleep before its PDUs are read, for the association's sleep before the handler runs, and for the DUL's sleep
again before the response goes out — 2.5-4 ms per instance of the node's receive time (README, "Where the receive
time goes"). pynetdicom has no setting for this (``_run_loop_delay`` 0 would make an idle association spin).

`install(assoc)` (called by `node.acceptor` for each accepted connection, before the association's thread starts)
replaces the polling with waits that end as soon as there is work, using pynetdicom's own loops unchanged:

- the DUL's three queues (``event_queue``, ``to_provider_queue``, ``to_user_queue``) and the DIMSE provider's ``msg_queue`` become
  `BellQueue` s, which ring a `Doorbell` on every put: the DUL's bell is a socket pair, so it can be waited on
  together with the peer's socket (rung only by other threads: the DUL's own puts are seen by its next pass);
  the association's is a `threading.Event`;
- ``_run_loop_delay`` becomes 0 and `node.guard.GuardedSocket.ready` (the DUL's per-pass socket check) waits in
  ``select`` on the peer's socket and the bell, at most `IDLE_WAIT`, returning at once when the peer sent data or
  something was queued for the DUL to send;
- `node.guard.GuardedDimse.get_msg` (non-blocking in the association reactor) waits on the association's bell, at
  most `IDLE_WAIT`, for a DIMSE message or an ACSE primitive (release, abort) to arrive.

Nothing about PDUs or states changes: the same loops make the same calls in the same order, they only stop
sleeping when work is waiting. The timers those loops check (ARTIM, the idle ``network_timeout``) and the kill
flag are seen at most `IDLE_WAIT` later; an idle association wakes 20 times a second instead of 2,000.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom.association import Association

IDLE_WAIT = 0.05  # seconds; the longest a reactor waits before it re-checks its timers and kill flag


class Doorbell:
    """A wake-up that ``select`` can wait on: ``ring`` writes a byte to a socket pair, ``drain`` empties it."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def ring(self) -> None:
        # full (a wake-up is pending anyway) or closed (the association is over): nothing to do
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self._writer.close()  # a closed Python socket refuses further sends (its descriptor is not reused)
        self.reader.close()


class BellQueue(queue.Queue[Any]):
    """A `queue.Queue` that calls ``ring`` after each item is added (``_put`` is Queue's subclass hook)."""

    def __init__(self, ring: Any, items: queue.Queue[Any]) -> None:
        super().__init__()
        self._ring = ring
        self.queue.extend(items.queue)  # whatever was queued before the swap (the connection event, normally none)

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._ring()


def install(assoc: Association) -> None:
    """Give ``assoc`` (an accepted association whose socket is a `node.guard.GuardedSocket` and whose DIMSE
    provider is a `node.guard.GuardedDimse`, not yet started) the doorbells described above."""
    dul: Any = assoc.dul
    dimse: Any = assoc.dimse
    dul_bell = Doorbell()
    assoc_bell = threading.Event()

    ring = _from_other_threads(dul, dul_bell.ring)
    dul.event_queue = BellQueue(ring, dul.event_queue)  # state machine events (Evt5 queued already)
    dul.to_provider_queue = BellQueue(ring, dul.to_provider_queue)  # our side's primitives to send
    dul.to_user_queue = BellQueue(assoc_bell.set, dul.to_user_queue)  # ACSE primitives from the peer
    dimse.msg_queue = BellQueue(assoc_bell.set, dimse.msg_queue)  # complete DIMSE messages
    dul._run_loop_delay = 0
    dul.socket.doorbell = dul_bell
    dimse.bell = assoc_bell


def _from_other_threads(owner: threading.Thread, ring: Any) -> Any:
    """``ring``, except when ``owner`` (the DUL's own thread) puts: its loop looks at its queues before every wait
    (`wait_readable`'s ``busy``), so waking it costs a send, a ``select`` pass and a drain for nothing — three of the
    five passes per C-STORE it made, measured (~1,000 instances: 2,978 wake-ups by its own puts of 4,983)."""

    def ring_unless_owner() -> None:
        if threading.current_thread() is not owner:
            ring()

    return ring_unless_owner


def wait_readable(sock: socket.socket, bell: Doorbell, busy: bool = False) -> bool:
    """Wait at most `IDLE_WAIT` until ``sock`` is readable or ``bell`` rang; whether ``sock`` is readable. ``busy``
    (the DUL has events or primitives queued, which its loop handles only after this check): do not wait. Raises
    `OSError` / `ValueError` as ``select`` does for a closed socket."""
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes buffered that select cannot see
    if pending is not None and pending():
        return True
    ready, _, _ = select.select([sock, bell.reader], [], [], 0 if busy else IDLE_WAIT)
    if bell.reader in ready:
        bell.drain()
    return sock in ready


def next_message(dimse: Any) -> tuple[Any, Any]:
    """The association reactor's non-blocking ``get_msg``: the next (context ID, DIMSE message), waiting at most
    `IDLE_WAIT` for one; (None, None) sooner when an ACSE primitive (release, abort) is waiting for the reactor."""
    bell: threading.Event = dimse.bell
    bell.clear()  # before looking: a put after this line sets it again
    with contextlib.suppress(queue.Empty):
        return dimse.msg_queue.get_nowait()  # type: ignore[no-any-return]
    if dimse.dul.to_user_queue.empty():
        bell.wait(IDLE_WAIT)
    try:
        return dimse.msg_queue.get_nowait()  # type: ignore[no-any-return]
    except queue.Empty:
        return None, None


__all__ = ["IDLE_WAIT", "BellQueue", "Doorbell", "install", "next_message", "wait_readable"]
