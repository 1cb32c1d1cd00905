"""``pacsnode serve`` as systemd's ``Type=notify`` service sees it (node.sdnotify, deploy/pacsnode.service): a real
node with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) naming a datagram socket this test binds (`peers.systemd`), in
both process models. READY=1 comes when ``/readyz`` answers 200 — under the process model once every role child has
reported, not at the fork —, a SIGHUP is wrapped in RELOADING=1 (with MONOTONIC_USEC) … READY=1, WATCHDOG=1 pings
stop while a role child is wedged (SIGSTOP: its health report goes stale) and resume after, SIGTERM sends
STOPPING=1; every message comes from the main process (``NotifyAccess=main``: role children never see the
variable)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peers.pacsnode import NodeProcess, node_toml
from peers.process import PeerError, free_port, wait_until
from peers.systemd import Notification, NotifyListener
from tests.conftest import NodeDatabases
from tests.integration.test_processes import process, readyz

# The notify protocol is not the database's business (its paths run on both backends elsewhere): PostgreSQL only
# under --node-db=both, for the suite's time budget.
pytestmark = [pytest.mark.integration, pytest.mark.one_backend]

WATCHDOG_SECONDS = 1.0  # pings every 0.5 s
PROCESSES = """process_model = "processes"
listener_processes = 1
[worker]
enabled = false
[gate]
scope_check = false
"""
THREADS = """process_model = "threads"
[worker]
enabled = false
[gate]
scope_check = false
"""


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    """systemd's notify socket, in the abstract namespace."""
    notify = NotifyListener(f"@pacsnode-test-{os.getpid()}-{time.monotonic_ns()}", watchdog_seconds=WATCHDOG_SECONDS)
    yield notify
    notify.close()


def ready_probe(listener: NotifyListener, http_port: int) -> dict[str, object]:
    """Ask ``/readyz`` the moment READY=1 arrives (the node may still be starting: it is not waited for)."""
    seen: dict[str, object] = {}

    def probe() -> None:
        try:
            note = listener.wait_for("READY=1", 120)
        except PeerError as exc:  # said by the test's own wait, not raised in this thread
            seen["status"] = str(exc)
            return
        try:
            seen["status"] = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10).status_code
        except httpx.TransportError as exc:
            seen["status"] = f"not answering: {type(exc).__name__}"
        seen["note"] = note

    threading.Thread(target=probe, daemon=True).start()
    return seen


def start(tmp_path: Path, extra_toml: str, node_database: NodeDatabases, listener: NotifyListener,
          monkeypatch: pytest.MonkeyPatch) -> tuple[NodeProcess, dict]:
    """The node on the listener's variables (only the node: the PostgreSQL server `for_node` may start first
    notifies systemd too)."""
    port, http_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    db_url = node_database.for_node()
    for key, value in listener.env.items():
        monkeypatch.setenv(key, value)
    config.write_text(node_toml("PACSNODE", port, http_port, tmp_path / "data", None, extra_toml, db_url))
    node = NodeProcess(config, port, tmp_path / "node.log", "PACSNODE", tmp_path / "data", http_port, (), db_url)
    seen = ready_probe(listener, http_port)
    return node.start(), seen


def only_from(node: NodeProcess, notes: list[Notification]) -> None:
    assert node.proc is not None
    assert {n.pid for n in notes} == {node.proc.pid}, [(n.pid, n.lines) for n in notes]


@pytest.mark.parametrize("model", ["threads", "processes"])
def test_ready_reload_stop(tmp_path: Path, node_database: NodeDatabases, listener: NotifyListener, model: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    node, seen = start(tmp_path, THREADS if model == "threads" else PROCESSES, node_database, listener, monkeypatch)
    try:
        wait_until(lambda: "status" in seen, 120, "READY=1 and /readyz asked", node.log_tail)
        # ready as /readyz says, at the moment systemd hears it
        assert seen["status"] == 200, (seen, [n.lines for n in listener.received], node.log_tail())
        assert len(listener.with_line("READY=1")) == 1
        listener.wait_for("WATCHDOG=1", 30, count=2)  # pinged while healthy

        assert node.proc is not None
        before = time.monotonic_ns() // 1000
        sent_at = time.monotonic()
        node.proc.send_signal(signal.SIGHUP)
        reloading = listener.wait_for("RELOADING=1", 30, after=sent_at)
        stamp = int(reloading.get("MONOTONIC_USEC") or 0)
        assert before <= stamp <= time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, when the reload began
        done = listener.wait_for("READY=1", 30, after=reloading.at)
        assert done.get("STATUS") == "config reloaded"
        wait_until(lambda: "config_reloaded" in node.log_text() or "config_reload_forwarded" in node.log_text(), 30,
                   "the reload logged", node.log_tail)

        stop_at = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0
        assert listener.with_line("STOPPING=1", after=stop_at)
        only_from(node, listener.received)
    finally:
        node.stop()


def test_watchdog_held_while_a_role_process_is_wedged(tmp_path: Path, node_database: NodeDatabases,
                                                      listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    node, seen = start(tmp_path, PROCESSES, node_database, listener, monkeypatch)
    try:
        wait_until(lambda: "status" in seen, 120, "READY=1", node.log_tail)
        listener.wait_for("WATCHDOG=1", 30, count=2)
        dispatcher = process(readyz(node), "dispatcher-0")["pid"]
        os.kill(dispatcher, signal.SIGSTOP)  # alive, but its main loop no longer reports: wedged
        try:
            def held(min_age: int = 0) -> list[Notification]:
                return [n for n in listener.received if "watchdog held" in (n.get("STATUS") or "")
                        and _stale_age(n) >= min_age]

            first = wait_until(held, 60, "STATUS: watchdog held", node.log_tail)[0]
            # the node's own clock says 3 more seconds (6 ping periods) went by with the dispatcher wedged
            last = wait_until(lambda: held(_stale_age(first) + 3), 30, "3 s more held", node.log_tail)[0]
        finally:
            os.kill(dispatcher, signal.SIGCONT)
        pings = [n.at for n in listener.with_line("WATCHDOG=1")]
        assert not [t for t in pings if first.at <= t <= last.at]  # no ping while wedged
        assert "dispatcher-0" in (first.get("STATUS") or "")
        resumed = wait_until(lambda: [n for n in listener.received if n.at > last.at and n.get("STATUS") == "ready"],
                             60, "STATUS: ready again", node.log_tail)[0]
        listener.wait_for("WATCHDOG=1", 30, after=resumed.at)  # pings again once it reports
        only_from(node, listener.received)
    finally:
        node.stop()


def _stale_age(note: Notification) -> int:
    """N from "no health report for N s" in a STATUS line (-1 without)."""
    status = note.get("STATUS") or ""
    marker = "no health report for "
    if marker not in status:
        return -1
    return int(status.split(marker, 1)[1].split(" ", 1)[0])
