"""Adversarial review of the node as a DIMSE client (node.scu): a destination that misbehaves after the connect.

The destination is a raw loopback socket that reads the node's A-ASSOCIATE-RQ and then answers with a PDU header
it never honours: a declared length of ~4 GiB followed by a stream of zeros, or a short PDU dribbled a byte at a
time. `node.scu` is what the dispatcher (C-STORE), the reachability checks (C-ECHO) and the commitment loop
(N-ACTION) all go through; pynetdicom's requestor socket read whatever length the peer declared, each ``recv``
with its own timeout.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from node import scu
from node.errors import SendError
from node.scu import Peer, echo, request_storage_commitment

TIMEOUT = 1.0


class EvilPacs:
    """Accepts one association request and answers it with ``answer(connection)``; counts what it could send."""

    def __init__(self, answer: Callable[[socket.socket], int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.done = threading.Event()
        self._answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            header = conn.recv(6, socket.MSG_WAITALL)
            conn.recv(struct.unpack(">BBL", header)[2], socket.MSG_WAITALL)  # the A-ASSOCIATE-RQ
            with contextlib.suppress(OSError):
                self._answer(conn)
            self.done.set()

    def close(self) -> None:
        self.listener.close()


def huge_ac(pacs_sent: list[int]) -> Callable[[socket.socket], int]:
    """An A-ASSOCIATE-AC declared ~4 GiB long, then 256 MiB of zeros (or until the node closes)."""

    def answer(conn: socket.socket) -> int:
        conn.sendall(struct.pack(">BBL", 0x02, 0, 0xFFFFFFF0))
        chunk = bytes(1 << 20)
        for _ in range(256):
            conn.sendall(chunk)
            pacs_sent[0] += len(chunk)
        return pacs_sent[0]

    return answer


def dribble(conn: socket.socket) -> int:
    """An A-ASSOCIATE-AC declared 1,000 bytes long, sent a byte every 0.3 s: each read waits less than the timeout."""
    conn.sendall(struct.pack(">BBL", 0x02, 0, 1000))
    for _ in range(1000):
        conn.sendall(b"\0")
        time.sleep(0.3)
    return 1000


@pytest.fixture
def pacs() -> Iterator[Callable[[Callable[[socket.socket], int]], EvilPacs]]:
    started: list[EvilPacs] = []

    def _start(answer: Callable[[socket.socket], int]) -> EvilPacs:
        started.append(EvilPacs(answer))
        return started[-1]

    yield _start
    for p in started:
        p.close()


OPERATIONS = {
    "C-ECHO": lambda peer: echo(peer),
    "N-ACTION": lambda peer: request_storage_commitment(peer, "1.2.3", [("1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4")],
                                                        lambda event: 0),
}


def _run(operation: str, port: int, within: float) -> tuple[BaseException | None, float]:
    """Run ``operation`` against the destination in a thread; (what it raised, seconds), or fail if it hangs."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            OPERATIONS[operation](Peer("127.0.0.1", port, called_ae="PACS", timeout=TIMEOUT))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(within)
    took = time.monotonic() - t0
    assert not thread.is_alive(), f"{operation} still waiting after {took:.1f} s (timeout {TIMEOUT} s)"
    return outcome[0], took


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_destination_declaring_a_4_gib_pdu_is_aborted_before_its_body_is_read(pacs, operation):
    """Found by review: the node announced no maximum PDU length to destinations and read whatever a destination
    declared: one answering a 4 GiB A-ASSOCIATE-AC and streaming zeros had 1.5 GB read into memory (3 GiB peak
    RSS) in 7 s of a C-ECHO; the dispatcher, the reachability check or the commitment loop would die of it, be
    restarted, and die again. Now the node announces a maximum (node.scu.MAX_PDU_FROM_PEER) and aborts a longer PDU unread."""
    sent = [0]
    evil = pacs(huge_ac(sent))
    error, took = _run(operation, evil.port, 30)
    assert isinstance(error, SendError), error
    assert evil.done.wait(10)
    print(f"{operation}: refused after {took:.2f} s; the destination sent {sent[0] >> 20} MiB before the close")
    assert sent[0] < 64 << 20  # socket buffers, not the PDU


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_destination_dribbling_a_pdu_is_cut_off_at_the_timeout(pacs, operation):
    """Found by review: every ``recv`` had the timeout, the PDU as a whole none, and pynetdicom's abort at the
    ACSE timeout waits for its reader to stop: a destination sending a byte every 0.3 s held the caller for the
    whole PDU (1,000 bytes: 5 minutes; a longer one: for ever), so one such PACS wedged its dispatcher or the
    commitment loop. Now a PDU must arrive within the timeout."""
    evil = pacs(dribble)
    error, took = _run(operation, evil.port, 10 * TIMEOUT)
    assert isinstance(error, SendError), error
    assert took < 5 * TIMEOUT


def test_a_conforming_destination_never_meets_the_cap():
    """The Maximum Length the node announces in its A-ASSOCIATE-RQ (pynetdicom's default, 16,382) is below the cap
    on what it reads (`node.scu.MAX_PDU_FROM_PEER`): only a PACS that ignores it is refused."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(6, socket.MSG_WAITALL)
            received.append(conn.recv(struct.unpack(">BBL", header)[2], socket.MSG_WAITALL))

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(SendError):
        echo(Peer("127.0.0.1", port, called_ae="PACS", timeout=TIMEOUT))
    listener.close()
    at = received[0].index(b"\x51\x00\x00\x04")  # Maximum Length sub-item, PS3.8 D.1
    announced = struct.unpack(">L", received[0][at + 4 : at + 8])[0]
    assert 0 < announced <= scu.MAX_PDU_FROM_PEER
