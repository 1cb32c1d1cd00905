"""Per-address limits on the DIMSE listener and the rate-limited refusal log (node.acceptor, node.refusals).

The flooding peer connects from 127.0.0.2 (any 127/8 address is loopback on Linux), the legitimate ones from
127.0.0.1: DCMTK's echoscu and pynetdicom. The node runs in-process over a real spool and index (the `Node` of
test_hostile_dimse)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from node.metrics import Metrics
from node.refusals import Refusals
from node.states import PeerRefusal
from tests.conftest import peer_env, require_tool, wait_until
from tests.unit import test_hostile_dimse as hostile

make_node = hostile.make_node  # fixtures shared with the other DIMSE hostile tests
ATTACKER = "127.0.0.2"


class FromPeer(hostile.RawPeer):
    def __init__(self, address: tuple[str, int], source: str = ATTACKER) -> None:
        self.sock = socket.create_connection(address, timeout=5, source_address=(source, 0))
        self.max_pdu = 0


@pytest.fixture
def from_peer() -> Iterator[type[FromPeer]]:
    opened: list[FromPeer] = []

    class Tracked(FromPeer):
        def __init__(self, address: tuple[str, int], source: str = ATTACKER) -> None:
            super().__init__(address, source)
            opened.append(self)

    yield Tracked
    for p in opened:
        p.close()


def refused(metrics: Metrics, reason: str) -> float:
    for line in metrics.render()[0].decode().splitlines():
        if line.startswith("pacsnode_peers_refused_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_peer_over_its_limit_is_closed_at_accept_while_other_peers_get_in(make_node, from_peer):
    echoscu = require_tool("echoscu")
    node = make_node(max_associations=8, max_associations_per_peer=2)
    metrics = node.server._metrics
    held = [from_peer(node.address) for _ in range(2)]
    for peer in held:
        hostile.associate(peer)  # two established associations from the attacker's address
    with capture_logs() as logs:
        flood = [from_peer(node.address) for _ in range(20)]
        for peer in flood:
            assert peer.closed_within(1.0) is not None, "a connection over the per-peer limit was kept"
    assert all(peer.echo(hostile.CX_ECHO) == 0x0000 for peer in held)  # the admitted ones are untouched
    assert node.echo() == 0x0000  # pynetdicom from 127.0.0.1
    host, port = node.address
    echo = subprocess.run([echoscu, "-aec", hostile.AE_TITLE, host, str(port)], env=peer_env(), capture_output=True)
    assert echo.returncode == 0, echo.stderr.decode()
    assert refused(metrics, "peer_connection_refused") == 20  # every refusal counted ...
    logged = [e for e in logs if e["event"] == "peer_connection_refused"]
    assert len(logged) == 5, f"{len(logged)} log events for 20 refusals"  # ... a few logged
    assert all(e["peer"].startswith(f"{ATTACKER}:") for e in logged)
    held[0].close()
    # the slot is free once its association thread has ended (the count the per-peer limit uses)
    server = node.server._server
    assert server is not None
    wait_until(lambda: server.open_from(ATTACKER) <= 1, 3.0, "a closed connection's per-peer slot to be released")
    hostile.associate(from_peer(node.address))


def test_failed_negotiations_release_their_per_peer_slots(make_node, from_peer):
    node = make_node(max_associations=4, max_associations_per_peer=1)
    server = node.server._server
    assert server is not None
    for _ in range(5):  # each is aborted (malformed request); the one slot must come back every time
        # Wait on the count the per-peer limit uses, not on a probe connection staying open for a moment: on a
        # loaded machine a connection refused at accept can stay open longer than the probe waits, and would
        # then be taken for an admitted one.
        wait_until(lambda: not server.open_from(ATTACKER), 3.0, "the slot of an aborted connection to be released")
        peer = from_peer(node.address)
        peer.send(hostile._with_context_id(0))
        hostile.assert_aborted(peer)
    wait_until(lambda: not server.open_from(ATTACKER), 3.0, "the attacker's connections to be counted closed")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_refusals_log_a_burst_per_peer_then_a_summary_with_the_count():
    clock, metrics = Clock(), Metrics()
    refusals = Refusals("dimse", metrics, burst=3, window_seconds=60, clock=clock)
    with capture_logs() as logs:
        logged = [refusals.record(PeerRefusal.PDU_TOO_LARGE, "10.0.0.9", 1000 + i) for i in range(10)]
        other = refusals.record(PeerRefusal.PDU_TOO_LARGE, "10.0.0.10", 5)  # another peer has its own burst
        clock.now = 61
        refusals.record(PeerRefusal.PDU_TOO_LARGE, "10.0.0.9", 2000)
    assert logged == [True] * 3 + [False] * 7 and other
    events = [(e["event"], e.get("count")) for e in logs]
    assert events == [("pdu_too_large", None)] * 4 + [("peer_refusals_suppressed", 7), ("pdu_too_large", None)]
    assert refused(metrics, "pdu_too_large") == 12


def test_refusals_remember_a_bounded_number_of_peers():
    refusals = Refusals("http", None, burst=1, max_peers=100)
    for i in range(1000):
        refusals.record(PeerRefusal.HTTP_HEADER_TIMEOUT, f"10.0.{i // 256}.{i % 256}")
    assert len(refusals._windows) == 100


def test_rejected_associations_are_counted_each_time_and_logged_a_few_times(make_node):
    node = make_node()
    ae = AE(ae_title="WRONG")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    with capture_logs() as logs:
        for _ in range(12):
            assoc = ae.associate(*node.address, ae_title="NOT-THE-NODE")
            assert assoc.is_rejected
    assert refused(node.server._metrics, "association_rejected") == 12
    assert len([e for e in logs if e["event"] == "association_rejected"]) == 5
    assert node.echo() == 0x0000
