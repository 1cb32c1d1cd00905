"""Connections that never negotiate: TCP opened and left silent (no A-ASSOCIATE-RQ on the plaintext port; no
ClientHello on the DICOM TLS port, in tests/unit/test_review_security_tls.py). Each is given until
``association_timeout_seconds`` to negotiate, but with the default caps a few hosts' silent connections filled every
slot, so each modality was refused for that long — and an attacker reopening them as they timed out kept it so.

At a cap, the connection that has waited longest without negotiating an association now gives its slot to the
newcomer (`node.slots`); a newcomer never displaces an association in progress. The modality is DCMTK's echoscu
and storescu; the attackers are raw sockets from other loopback addresses."""

from __future__ import annotations

import socket
import subprocess
import threading

from tests.conftest import peer_env, require_tool, wait_until
from tests.ctgen import write_ct_series
from tests.unit import test_hostile_dimse as hostile
from tests.unit.test_hostile_dimse import AE_TITLE

make_node, peers, thread_errors = hostile.make_node, hostile.peers, hostile.thread_errors  # shared fixtures


def _silent(port: int, hosts: range, each: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{host}", 0))
            for host in hosts for _ in range(each)]


def _tool(tool: str, port: int, *files: str) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool(tool), "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", str(port), *files]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=30)


def test_silent_connections_from_a_few_hosts_do_not_lock_out_a_modality(make_node, tmp_path, thread_errors):
    node = make_node(association_timeout_seconds=20.0)  # default caps: 32 associations, 16 per address
    port = node.address[1]
    silent = _silent(port, range(2, 4), 16)  # 32 silent connections from two hosts: every association slot
    try:
        wait_until(lambda: node.server.servers[0].open_connections() >= 32, 5, "the silent connections admitted")
        echo = _tool("echoscu", port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        series = write_ct_series(tmp_path / "ct", slices=3, size=32, seed=3)
        store = _tool("storescu", port, *map(str, series.paths))
        assert store.returncode == 0, store.stdout + store.stderr
        assert len(node.spooled()) == 3
    finally:
        for sock in silent:
            sock.close()
    assert not thread_errors


def test_a_newcomer_never_displaces_an_association_in_progress(make_node, peers, thread_errors):
    """At the cap with every slot held by negotiated associations (idle less than reclaim_idle_seconds), a newcomer
    is refused as before: only connections that have not negotiated are displaced."""
    node = make_node(max_associations=2, max_associations_per_peer=2)
    held = [peers(node.address) for _ in range(2)]
    for peer in held:
        hostile.associate(peer)
    echo = _tool("echoscu", node.address[1])
    assert echo.returncode != 0, "a newcomer took the slot of a negotiated association"
    for peer in held:  # both still open: the node closed neither
        assert peer.closed_within(0.3) is None
    assert not thread_errors


def test_a_flood_of_silent_connections_stays_within_the_caps(make_node, thread_errors):
    """Past the cap each silent newcomer displaces the longest-silent connection instead of being closed at accept:
    the flood costs a thread per connection for a moment, but what it holds stays within the connection cap, the
    displaced threads end, and a modality still gets in."""
    node = make_node(association_timeout_seconds=20.0)  # 32 associations, 64 connections, 16 per address
    port, server = node.address[1], node.server.servers[0]
    before = threading.active_count()
    most_open, most_threads, flood = 0, 0, []
    for host in range(2, 10):  # 8 addresses x 20: 160 connections, each address past its own cap too
        for _ in range(20):
            flood.append(socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{host}", 0)))
            most_open = max(most_open, server.open_connections())
            most_threads = max(most_threads, threading.active_count())
    try:
        # the connection cap holds the admitted ones; displaced ones count too until their threads end (one or two
        # at a time on a loaded machine: 65 seen in CI), so the bound is the cap plus that tail, not the flood's 160
        assert most_open <= 64 + 16, most_open
        assert most_threads - before <= 3 * 64, (before, most_threads)  # handler + association thread + DUL each
        wait_until(lambda: threading.active_count() - before <= 3 * 33, 10, "the displaced connections' threads to end")
        echo = _tool("echoscu", port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: server.open_connections() == 0, 10, "every slot freed once the flood closed")
    assert not thread_errors


def test_a_connection_closed_before_its_request_frees_its_slot_at_once(make_node, thread_errors):
    """A TCP probe (a load balancer's health check: connect, close) gives its slot back at once, not after the
    association timeout (it did already; kept beside the displacement tests, whose wake-up shares this path)."""
    node = make_node(association_timeout_seconds=20.0)
    server = node.server.servers[0]
    for _ in range(10):
        socket.create_connection(node.address).close()
    wait_until(lambda: server.open_connections() == 0, 3, "the probes' slots to be freed (not after 20 s)")
    assert not thread_errors
