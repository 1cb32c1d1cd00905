"""node.reactorwait: pynetdicom's reactors of an accepted association wait for work instead of polling.

The waits are made very long (`IDLE_WAIT` = 30 s) so that anything that still depended on a timed re-check — a
response not sent, a release not noticed, a closed connection not ended — would take 30 s; every check here asks
for far less. A real pynetdicom SCU talks to the guarded listener on loopback.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import reactorwait
from node.acceptor import start_guarded_server
from node.guard import GuardedDimse, ReceiveLimits
from tests.conftest import free_port

LONG_WAIT = 30.0
PROMPT = 10.0  # far below LONG_WAIT, far above any loaded machine's scheduling delay


@pytest.fixture
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactorwait, "IDLE_WAIT", LONG_WAIT)


def later(action: Any) -> threading.Thread:
    """Run ``action`` in a thread once the caller is waiting (the thread starts first, then acts)."""
    started = threading.Event()

    def run() -> None:
        started.wait()
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.set()
    return thread


def test_bell_queue_rings_on_put_and_keeps_what_was_queued() -> None:
    rings: list[int] = []
    old: queue.Queue[Any] = queue.Queue()
    old.put("Evt5")
    bell = reactorwait.BellQueue(lambda: rings.append(1), old)
    bell.put("primitive")
    assert [bell.get_nowait(), bell.get_nowait()] == ["Evt5", "primitive"]
    assert rings == [1]


def test_wait_readable_wakes_on_the_bell_and_on_data(long_waits: None) -> None:
    door = reactorwait.Doorbell()
    near, far = socket.socketpair()
    try:
        t0 = time.monotonic()
        later(door.ring)
        assert reactorwait.wait_readable(near, door) is False  # rang: something to send, nothing to read
        later(lambda: far.send(b"x"))
        assert reactorwait.wait_readable(near, door) is True
        assert time.monotonic() - t0 < PROMPT
    finally:
        door.close()
        near.close()
        far.close()
    door.ring()  # after close: ignored, not an error


class FakeDul:
    def __init__(self) -> None:
        self.to_user_queue: queue.Queue[Any] = queue.Queue()


class Provider:
    """Just the attributes `next_message` uses (the DIMSE provider's queue, bell and DUL)."""

    def __init__(self) -> None:
        self.bell = threading.Event()
        self.dul = FakeDul()
        self.msg_queue = reactorwait.BellQueue(self.bell.set, queue.Queue())


def test_next_message_returns_a_message_put_while_waiting(long_waits: None) -> None:
    provider = Provider()
    t0 = time.monotonic()
    later(lambda: provider.msg_queue.put((1, "C-STORE-RQ")))
    assert reactorwait.next_message(provider) == (1, "C-STORE-RQ")
    assert time.monotonic() - t0 < PROMPT


def test_next_message_does_not_wait_while_an_acse_primitive_is_pending(long_waits: None) -> None:
    provider = Provider()
    provider.dul.to_user_queue.put("A-RELEASE")
    t0 = time.monotonic()
    assert reactorwait.next_message(provider) == (None, None)
    assert time.monotonic() - t0 < PROMPT


def test_an_association_echoes_releases_and_ends_without_polling(long_waits: None) -> None:
    """Through the real guarded listener: negotiation, C-ECHOs, release and the end of the association's threads
    all happen promptly although each reactor re-checks on its own only every 30 s."""
    scp = AE(ae_title="PACSNODE")
    scp.add_supported_context(Verification)
    limits = ReceiveLimits(max_pdu_bytes=1 << 20, max_instance_bytes=1 << 20, association_timeout=5.0,
                           network_timeout=5.0, max_connections=4)
    server = start_guarded_server(scp, ("127.0.0.1", free_port()), [], limits)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        t0 = time.monotonic()
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="PACSNODE")
        assert assoc.is_established
        accepted = server.active_associations
        assert len(accepted) == 1 and isinstance(accepted[0].dimse, GuardedDimse) and accepted[0].dimse.bell
        statuses = [assoc.send_c_echo().Status for _ in range(5)]
        assoc.release()
        accepted[0].join(PROMPT)
        assert statuses == [0] * 5 and assoc.is_released
        assert not accepted[0].is_alive() and not accepted[0].dul.is_alive()
        assert time.monotonic() - t0 < PROMPT
    finally:
        server.shutdown()
        server.server_close()
