"""The process supervisor (node.processes) with real child processes standing in for the roles: the restart
back-off and budget, the exit status when a child keeps dying, the process table, SIGTERM forwarding."""

from __future__ import annotations

import time

from node.config import NodeConfig
from node.processes import ProcessSupervisor, children_for, read_table, write_report
from node.states import Role
from node.supervise import EXIT_LOOP_FAILED
from peers.process import free_port, wait_until


def supervisor(tmp_path, command: list[str], **supervise: float) -> ProcessSupervisor:
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "http_port": free_port(),
                 "listener_processes": 2, "instance_id": "unit"},
        "worker": {"enabled": False},
        "supervise": {"restart_backoff_seconds": 0.05, **supervise},
    })
    sup = ProcessSupervisor(config, None)
    sup._command = lambda child: command  # type: ignore[method-assign]
    return sup


def test_children_follow_the_config(tmp_path):
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path), "listener_processes": 3}})
    assert [c.name for c in children_for(config)] == [
        "dispatcher-0", "worker-0", "listener-0", "listener-1", "listener-2"]


def test_a_child_that_keeps_dying_is_restarted_then_stops_the_node_with_exit_70(tmp_path):
    sup = supervisor(tmp_path, ["sh", "-c", "exit 3"], max_restarts=2)
    sup.start()
    try:
        wait_until(lambda: sup._stop.is_set() or (sup.check() and False), 30, "the restart budget to run out")
    finally:
        sup.stop(5)
    assert sup.exit_code == EXIT_LOOP_FAILED
    died = [c for c in sup.children if c.restarts == 2]
    assert died and all(c.last_exit == 3 for c in died)


def test_the_table_shows_a_restart_and_sigterm_reaches_every_child(tmp_path):
    sup = supervisor(tmp_path, ["sleep", "60"], max_restarts=5)
    sup.start()
    try:
        table = read_table(sup.config.node.data_dir)
        assert [p["name"] for p in table["processes"]] == ["dispatcher-0", "listener-0", "listener-1"]
        assert all(p["alive"] for p in table["processes"])
        victim = next(c for c in sup.children if c.role is Role.LISTENER and c.index == 1)
        assert victim.proc is not None
        old_pid = victim.proc.pid
        victim.proc.kill()
        victim.proc.wait()

        def restarted() -> dict | None:
            sup.check()
            entry = next(p for p in read_table(sup.config.node.data_dir)["processes"] if p["name"] == "listener-1")
            return entry if entry["restarts"] == 1 and entry["alive"] else None

        entry = wait_until(restarted, 30, "listener-1 restarted")
        assert entry["pid"] != old_pid and entry["last_exit"] == -9
        procs = [c.proc for c in sup.children]
    finally:
        t0 = time.monotonic()
        sup.stop(10)
    assert all(p is not None and p.returncode == -15 for p in procs)  # SIGTERM, not the SIGKILL fallback
    assert time.monotonic() - t0 < 5
    assert read_table(sup.config.node.data_dir) == {}  # a clean stop removes the table


def test_a_child_s_own_report_shows_in_the_table_and_goes_stale(tmp_path, monkeypatch):
    sup = supervisor(tmp_path, ["sleep", "60"])
    sup.start()
    data = sup.config.node.data_dir
    try:
        listener = next(c for c in sup.children if c.name == "listener-0")
        assert listener.proc is not None
        monkeypatch.setattr("os.getpid", lambda: listener.proc.pid)  # written as that child would
        write_report(data, "listener-0", ["worker: stuck (no heartbeat for 31.0 s, limit 30.0 s)"])
        monkeypatch.undo()
        entries = {p["name"]: p for p in read_table(data)["processes"]}
        assert entries["listener-0"]["problems"] == ["worker: stuck (no heartbeat for 31.0 s, limit 30.0 s)"]
        assert entries["listener-1"]["problems"] == ["starting (no health report yet)"]
        stale = {p["name"]: p for p in read_table(data, stale_after=-1)["processes"]}
        assert stale["listener-0"]["problems"][-1].startswith("no health report for")
    finally:
        sup.stop(10)
