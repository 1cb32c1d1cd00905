"""A real `pacsnode serve` process under a burst of hostile peers (issue "Hostile networks"): a per-address
DIMSE connection flood, idle DIMSE sockets, idle HTTP sockets, slowloris HTTP heads and an HTTP connection flood,
all from 127.0.0.2. Meanwhile a legitimate DCMTK echoscu and curl /healthz (from 127.0.0.1) must succeed, every
hostile socket must be closed within its deadline, refusals must be counted in /metrics but logged only a few
times, and the node's peak RSS (VmHWM from /proc) must stay within `RSS_GROWTH_BOUND` of where it was before."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import launch_node, peer_env, require_tool, wait_until

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"
PER_PEER = 4  # max_associations_per_peer
HTTP_PER_PEER = 12  # http_max_connections_per_peer
ASSOCIATION_TIMEOUT = 3.0
HEADER_TIMEOUT = 2.0
RSS_GROWTH_BOUND = 24 << 20  # threads and buffers of a few dozen connections; no data set is ever held


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(ATTACKER, 0))


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _count_closed(socks: list[socket.socket], expected: int, within: float) -> int:
    """How many of ``socks`` the node closes, polling them all until ``expected`` are closed or ``within`` passes."""
    open_socks, closed = list(socks), 0
    deadline = time.monotonic() + within
    while open_socks and closed < expected and time.monotonic() < deadline:
        still = [s for s in open_socks if not _closed_within(s, 0.01)]
        closed += len(open_socks) - len(still)
        open_socks = still
    return closed


def _slowloris(sock: socket.socket, stop: threading.Event, closed: list[bool]) -> None:
    """Dribble a request head a byte every 0.1 s until the node closes the connection."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-a: b\r\n" * 200
    try:
        for byte in head:
            if stop.is_set():
                break
            sock.send(bytes([byte]))
            if _closed_within(sock, 0.1):
                closed.append(True)
                return
    except OSError:
        closed.append(True)
    finally:
        sock.close()


def test_legitimate_peers_get_through_a_burst_of_hostile_ones_and_memory_stays_flat(tmp_path, node_database):
    echoscu, curl = require_tool("echoscu"), require_tool("curl")
    node = launch_node(tmp_path / "node", extra_toml=(  # threads: the RSS measured is the receiving process's
        'process_model = "threads"\n'
        f"max_associations = 16\nmax_associations_per_peer = {PER_PEER}\n"
        f"association_timeout_seconds = {ASSOCIATION_TIMEOUT}\nhttp_header_timeout_seconds = {HEADER_TIMEOUT}\n"
        f"http_max_connections_per_peer = {HTTP_PER_PEER}\n[worker]\nenabled = false\n"
    ), database_url=node_database.for_node())
    opened: list[socket.socket] = []
    stop = threading.Event()
    try:
        http = f"http://127.0.0.1:{node.http_port}"

        def echo() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([echoscu, "-aec", node.ae_title, "127.0.0.1", str(node.port)], env=peer_env(),
                                  capture_output=True, timeout=30)

        def healthz() -> str:
            return subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10", f"{http}/healthz"],
                                  capture_output=True, text=True, timeout=30).stdout

        wait_until(lambda: healthz() == "200", 30, "the HTTP side to answer")
        assert echo().returncode == 0
        before = _peak_rss(node.proc.pid)

        # the burst: DIMSE flood from one address (PER_PEER held idle, the rest closed at accept) ...
        dimse = [_connect(node.port) for _ in range(40)]
        opened += dimse
        refused_dimse = _count_closed(dimse, len(dimse), 1.5)  # well within the association timeout (3 s)
        assert refused_dimse == len(dimse) - PER_PEER, "per-peer DIMSE cap"
        # ... idle HTTP sockets, slowloris heads, and an HTTP flood past the per-address cap
        idle_http = [_connect(node.http_port) for _ in range(6)]
        opened += idle_http
        closed_loris: list[bool] = []
        loris_sockets = [_connect(node.http_port) for _ in range(6)]  # connected before the flood
        loris = [threading.Thread(target=_slowloris, args=(sock, stop, closed_loris)) for sock in loris_sockets]
        for t in loris:
            t.start()
        http_flood = [_connect(node.http_port) for _ in range(30)]
        opened += http_flood
        refused_http = _count_closed(http_flood, len(http_flood), 1.0)  # the header deadline is 2 s
        assert refused_http == len(http_flood) - (HTTP_PER_PEER - len(idle_http) - len(loris)), "per-peer HTTP cap"

        t0 = time.monotonic()
        result = echo()
        echo_seconds = time.monotonic() - t0
        assert result.returncode == 0, result.stderr.decode()
        t0 = time.monotonic()
        assert healthz() == "200"
        curl_seconds = time.monotonic() - t0
        print(f"during the burst: echoscu {echo_seconds:.2f} s, curl /healthz {curl_seconds:.2f} s")

        # every held hostile socket goes within its deadline
        assert all(_closed_within(s, ASSOCIATION_TIMEOUT + 2) for s in dimse)
        assert all(_closed_within(s, HEADER_TIMEOUT + 2) for s in idle_http)
        for t in loris:
            t.join(HEADER_TIMEOUT + 5)
        assert len(closed_loris) == len(loris), "a slowloris head outlived the header deadline"
        assert echo().returncode == 0 and healthz() == "200"  # and after

        after = _peak_rss(node.proc.pid)
        print(f"node peak RSS {before / 2**20:.1f} MiB before the burst, {after / 2**20:.1f} MiB after")
        assert after - before < RSS_GROWTH_BOUND

        def refused(reason: str) -> dict[str, float]:
            metrics = subprocess.run([curl, "-s", f"{http}/metrics"], capture_output=True, text=True, timeout=30)
            return {m.group(1): float(m.group(2)) for m in re.finditer(
                rf'pacsnode_peers_refused_total\{{reason="{reason}",source="(\w+)"\}} (\S+)', metrics.stdout)}

        # the held ones are counted too: idle DIMSE past the association timeout, idle/slow HTTP heads
        wait_until(lambda: refused("peer_stalled").get("dimse") == PER_PEER, 10, "the stalled DIMSE peers counted")
        assert refused("http_header_timeout").get("http") == len(idle_http) + len(loris)
        counted = refused("peer_connection_refused")
        assert counted.get("dimse", 0) >= len(dimse) - PER_PEER and counted.get("http", 0) >= refused_http
        logged = node.log_text().count('"event": "peer_connection_refused"')
        print(f"refusals counted {counted}, logged {logged} times")
        assert logged <= 2 * 5, "refusals flood the log"
    finally:
        stop.set()
        for s in opened:
            with contextlib.suppress(OSError):
                s.close()
        node.stop()
