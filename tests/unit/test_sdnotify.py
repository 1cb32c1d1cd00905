"""node.sdnotify on a real datagram socket (`peers.systemd.NotifyListener`), with real heartbeats and health
reports on an injected clock: nothing without NOTIFY_SOCKET, READY=1 once, WATCHDOG=1 held while a loop is stuck
or a role child's report is stale (not for a dead loop the node restarts itself), RELOADING=1 … READY=1 only once
ready, the variables taken out of the environment so children never inherit them. The node as systemd runs it:
tests/integration/test_systemd_notify.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from node.http import HealthProbe
from node.processes import REPORTS_DIR, TABLE_FILE, write_report
from node.sdnotify import Health, Notifier, processes_health, service_health
from node.supervise import Heartbeats
from peers.process import wait_until
from peers.systemd import NotifyListener


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(f"@pacsnode-unit-{os.getpid()}-{time.monotonic_ns()}")
    yield notify
    notify.close()


def lines(listener: NotifyListener, count: int) -> list[tuple[str, ...]]:
    wait_until(lambda: len(listener.received) >= count, 10, f"{count} datagrams")
    return [n.lines for n in listener.received]


def test_nothing_without_notify_socket() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "PATH": "/bin"}
    asked: list[bool] = []

    def health(settled: bool) -> Health:
        asked.append(settled)
        return Health()

    notifier = Notifier.from_environ(health, environ)
    notifier.tick()
    notifier.stopping()
    assert notifier.around_reload(lambda: True)() is True
    assert not notifier.enabled and asked == []  # health is not even read
    assert environ == {"PATH": "/bin"}  # the watchdog variable is not left for children either


def test_the_variables_leave_the_environment(listener: NotifyListener) -> None:
    environ = {**listener.env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier.from_environ(lambda _: Health(), environ)
    assert environ == {"PATH": "/bin"}  # a child forked or exec'd from here never sees them
    assert notifier.enabled and notifier.watchdog_seconds == 4.0
    other = Notifier.from_environ(lambda _: Health(), {**listener.env, "WATCHDOG_USEC": "4000000",
                                                       "WATCHDOG_PID": "1"})
    assert other.watchdog_seconds is None  # the watchdog is another process's


def test_a_socket_path(tmp_path: Path) -> None:
    path = Path("/tmp") / f"pacsnode-notify-{os.getpid()}-{time.monotonic_ns()}.sock"  # sun_path: 108 bytes
    notify = NotifyListener(str(path))
    try:
        Notifier(str(path), lambda _: Health()).tick()
        assert lines(notify, 1) == [("READY=1", "STATUS=ready")]
    finally:
        notify.close()


def service(tmp_path: Path, heartbeats: Heartbeats) -> SimpleNamespace:
    """What `service_health` reads of a `node.service.Service`: its real health probe and heartbeats."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'node.db'}")
    health = HealthProbe(engine, tmp_path, lambda: True, heartbeats)
    return SimpleNamespace(health=health, heartbeats=heartbeats, problems=heartbeats.problems)


def test_watchdog_held_while_a_loop_is_stuck(tmp_path: Path, listener: NotifyListener) -> None:
    clock = Clock()
    beats = Heartbeats(stuck_after_periods=2, clock=clock)
    beats.register("worker", 1.0, alive=lambda: True)
    node = service(tmp_path, beats)
    notifier = Notifier(listener.address, lambda settled: service_health(node, settled),  # type: ignore[arg-type]
                        watchdog_seconds=1.0, clock=clock)
    notifier.tick()
    assert lines(listener, 1)[0] == ("READY=1", "STATUS=ready", "WATCHDOG=1")
    clock.now += 3.0  # no beat for 3 s, limit 2 s: stuck
    notifier.tick()
    held = lines(listener, 2)[1]
    assert len(held) == 1 and held[0].startswith("STATUS=watchdog held; not ready: worker: stuck"), held
    clock.now += 1.0
    notifier.tick()  # still stuck: the status with its new age, no WATCHDOG=1
    assert lines(listener, 3)[2] == ("STATUS=watchdog held; not ready: worker: stuck (no heartbeat for 4.0 s, "
                                     "limit 2.0 s)",)
    beats.beat("worker")
    clock.now += 0.6
    notifier.tick()
    assert lines(listener, 4)[3] == ("STATUS=ready", "WATCHDOG=1")
    assert len(listener.received) == 4
    assert len(listener.with_line("READY=1")) == 1


def test_a_dead_loop_is_not_ready_but_pinged(tmp_path: Path, listener: NotifyListener) -> None:
    """The node restarts a dead loop itself (or exits 70): systemd's restart is not for that."""
    clock = Clock()
    beats = Heartbeats(clock=clock)
    beats.register("dispatch", 1.0, alive=lambda: False)
    node = service(tmp_path, beats)
    notifier = Notifier(listener.address, lambda settled: service_health(node, settled),  # type: ignore[arg-type]
                        watchdog_seconds=1.0, clock=clock)
    notifier.tick()
    (sent,) = lines(listener, 1)
    assert "READY=1" not in sent and "WATCHDOG=1" in sent
    assert any(line.startswith("STATUS=not ready: dispatch: dead") for line in sent), sent


def test_reload_is_announced_only_once_ready(listener: NotifyListener) -> None:
    health = [Health(["models are not loaded"])]
    notifier = Notifier(listener.address, lambda _: health[0])
    assert notifier.around_reload(lambda: True)() is True  # still starting: systemd hears no reload
    notifier.tick()
    health[0] = Health()
    notifier.tick()
    assert lines(listener, 2) == [("STATUS=not ready: models are not loaded",), ("READY=1", "STATUS=ready")]
    before = time.monotonic_ns() // 1000
    assert notifier.around_reload(lambda: False)() is False
    reloading, ready = lines(listener, 4)[2:]
    assert reloading[0] == "RELOADING=1" and before <= int(reloading[1].removeprefix("MONOTONIC_USEC=")) <= (
        time.monotonic_ns() // 1000)
    assert ready == ("READY=1", "STATUS=config reload refused: running config kept")
    notifier.stopping()
    assert lines(listener, 5)[4] == ("STOPPING=1", "STATUS=stopping")


def test_processes_health_from_the_reports(tmp_path: Path) -> None:
    """The supervisor's view: a child's stuck loop (as node.supervise words it) or a stale report holds the
    watchdog; a dead loop or a child not running only makes it not ready."""
    entry = {"name": "worker-0", "role": "worker", "index": 0, "pid": os.getpid(), "alive": True, "restarts": 0}
    down = {**entry, "name": "listener-0", "role": "listener", "pid": None, "alive": False}
    (tmp_path / TABLE_FILE).write_text(json.dumps({"supervisor_pid": os.getpid(), "processes": [entry, down]}))
    assert processes_health(tmp_path).problems == ["listener-0: not running", "worker-0: starting (no health report yet)"]
    clock = Clock()
    beats = Heartbeats(stuck_after_periods=2, clock=clock)
    beats.register("worker", 1.0, alive=lambda: True)
    beats.register("prefetch", 1.0, alive=lambda: False)
    clock.now += 3
    write_report(tmp_path, "worker-0", beats.problems())
    health = processes_health(tmp_path)
    assert not health.ready and len(health.problems) == 3
    assert health.wedged == [p for p in health.problems if "worker: stuck" in p]
    write_report(tmp_path, "worker-0", ["prefetch: dead (its thread ended; last beat 3.0 s ago)"])
    assert processes_health(tmp_path).wedged == []
    report = tmp_path / REPORTS_DIR / "worker-0.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "at": time.time() - 60}))
    assert [p for p in processes_health(tmp_path).wedged if "no health report for" in p]
