"""The process supervisor (node.processes, node.forking) with real child processes standing in for the roles,
started both ways (``child_start``: fork, exec): the restart back-off and budget, the exit status when a child keeps
dying, the process table, SIGTERM forwarding; what a forked child starts with."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.errors import ConfigError
from node.forking import ForkedChild, fork_child
from node.processes import ProcessSupervisor, children_for, read_table, write_report
from node.states import Role
from node.supervise import EXIT_LOOP_FAILED
from peers.process import free_port, wait_until

# What each stand-in child does, as a command (exec) and as a function (fork).
STAND_INS: dict[str, tuple[list[str], Callable[[], int]]] = {
    "exit 3": (["sh", "-c", "exit 3"], lambda: 3),
    "sleep": (["sleep", "60"], lambda: (time.sleep(60), 0)[1]),
}


def supervisor(tmp_path, start: str, stand_in: str, **supervise: float) -> ProcessSupervisor:
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "http_port": free_port(),
                 "listener_processes": 2, "instance_id": "unit", "child_start": start},
        "worker": {"enabled": False},
        "supervise": {"restart_backoff_seconds": 0.05, **supervise},
    })
    sup = ProcessSupervisor(config, None)
    command, run = STAND_INS[stand_in]
    sup._command = lambda child: command  # type: ignore[method-assign]
    sup._child_main = lambda child: run  # type: ignore[method-assign]
    return sup


@pytest.fixture(params=["fork", "exec"])
def start(request: pytest.FixtureRequest) -> str:
    return request.param


def test_children_follow_the_config(tmp_path):
    config = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path), "listener_processes": 3}})
    assert [c.name for c in children_for(config)] == [
        "dispatcher-0", "worker-0", "listener-0", "listener-1", "listener-2"]


def run_out_the_restart_budget(sup) -> None:
    """Start ``sup`` and let its children die until it gives up (or 30 s pass), then stop it."""
    sup.start()
    try:
        wait_until(lambda: sup._stop.is_set() or (sup.check() and False), 30, "the restart budget to run out")
    finally:
        sup.stop(5)


def test_a_child_that_keeps_dying_is_restarted_then_stops_the_node_with_exit_70(tmp_path, start):
    sup = supervisor(tmp_path, start, "exit 3", max_restarts=2)
    run_out_the_restart_budget(sup)
    assert sup.exit_code == EXIT_LOOP_FAILED
    died = [c for c in sup.children if c.restarts == 2]
    assert died and all(c.last_exit == 3 for c in died)


def test_the_table_shows_a_restart_and_sigterm_reaches_every_child(tmp_path, start):
    sup = supervisor(tmp_path, start, "sleep", max_restarts=5)
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
    sup = supervisor(tmp_path, "exec", "sleep")
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


def test_a_forked_child_starts_as_a_fresh_process_would(tmp_path):
    """Default stop signals (the parent's handler is not inherited), its own process group, the environment given,
    prometheus_client's multiprocess values for it, and an exit status even from an exception; the parent's own
    handler and signal mask are as before the fork."""
    seen = tmp_path / "seen"
    handled: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))

    def child() -> int:
        from prometheus_client import values

        state = (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, os.getpgid(0) == os.getpid(),
                 os.environ.get("PROMETHEUS_MULTIPROC_DIR"), values.ValueClass.__name__,
                 sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        seen.write_text(repr(state), encoding="utf-8")
        time.sleep(60)
        return 0

    try:
        metrics = tmp_path / "metrics"
        metrics.mkdir()
        proc = fork_child(child, {"PROMETHEUS_MULTIPROC_DIR": str(metrics)})
        wait_until(lambda: seen.exists() and seen.read_text(), 30, "the child to start")
        assert seen.read_text() == repr((True, True, str(metrics), "MmapedValue", []))
        assert proc.poll() is None
        with pytest.raises(Exception, match="pid"):
            proc.wait(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM  # the default action, as Popen reports it
        assert not handled and signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()

        def boom() -> int:
            raise RuntimeError("a bug in a role")

        assert fork_child(boom, {}).wait(10) == 1
        assert fork_child(lambda: 3, {}).wait(10) == 3
        proc.kill()  # a child that has ended: nothing to signal, no error
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_forked_children_run_the_node_roles(tmp_path):
    """The default start: a supervisor forks real role children (`pacsnode serve --role R`) that listen on the
    DIMSE port and report their health; the supervisor imported the stages first. (That only the worker maps
    TensorFlow, forked from a supervisor that never imports it: tests/integration/test_processes.py.)"""
    import sys

    from node.config import load_config

    path = tmp_path / "node.toml"
    path.write_text(f"""[node]
host = "127.0.0.1"
port = {free_port()}
http_port = {free_port()}
data_dir = "{tmp_path / 'data'}"
instance_id = "unit"
[worker]
enabled = false
""")
    config = load_config(path)
    sup = ProcessSupervisor(config, path)
    assert sup.fork
    sup.start()
    try:
        assert all(isinstance(c.proc, ForkedChild) for c in sup.children)
        assert "node.service" in sys.modules

        def healthy() -> bool:
            entries = read_table(config.node.data_dir)["processes"]
            return all(p["alive"] and not p["problems"] for p in entries)

        wait_until(healthy, 60, "both children to report healthy")
        listener = next(c for c in sup.children if c.role is Role.LISTENER)
        assert listener.proc is not None and os.getpgid(listener.proc.pid) == listener.proc.pid
        comm = Path(f"/proc/{listener.proc.pid}/comm").read_text().strip()
        assert comm == "pacs-listener-0"  # what ps and top show (15 bytes at most), not the supervisor's command
        from peers.process import wait_for_port

        wait_for_port(config.node.port, 10)  # the supervisor's shared socket (node.listenfds)
        wait_for_port(config.node.http_port, 10)  # the listener child's own
    finally:
        sup.stop(20)
    assert all(c.proc is not None and c.proc.returncode == 0 for c in sup.children)  # their own clean stop


def test_a_fork_while_another_thread_writes_log_lines_never_leaves_the_child_a_held_lock(tmp_path):
    """The supervisor's SIGHUP reload or audit thread may be inside a log line when a child is forked: the child
    must still be able to log (structlog's write lock is held across the fork, so the copy is never held)."""
    import subprocess
    import threading

    import structlog

    stream = (tmp_path / "log").open("w")
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            structlog.WriteLogger(stream).msg("x" * 200)

    def child() -> int:
        structlog.WriteLogger(stream).msg("child")
        return 7

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    stuck = []
    try:
        for _ in range(40):
            proc = fork_child(child, {})
            try:
                assert proc.wait(10) == 7
            except subprocess.TimeoutExpired:
                stuck.append(proc.pid)
                proc.kill()
                proc.wait(10)
    finally:
        stop.set()
        thread.join(10)
        stream.close()
    assert stuck == []


def test_status_files_that_cannot_be_written_are_logged_once_and_never_stop_a_process(tmp_path):
    """A child writes its health report and the supervisor its table every tick; on a full or failing data disk
    the write raised, which ended the child and then the supervisor (every process stopped, where admission
    control should pause receiving). Now each outage is logged when it starts and when it ends."""
    from structlog.testing import capture_logs

    sup = supervisor(tmp_path, "exec", "sleep")
    data = sup.config.node.data_dir
    data.mkdir(parents=True)
    (data / "processes").write_text("a file where the reports' folder belongs")  # mkdir fails: FileExistsError
    (data / ".processes.json.tmp").mkdir()  # the table's temporary file cannot be written: IsADirectoryError
    with capture_logs() as logs:
        for _ in range(3):
            write_report(data, "listener-0", [])
            sup._write_table()
        (data / "processes").unlink()
        (data / ".processes.json.tmp").rmdir()
        write_report(data, "listener-0", [])
        sup._write_table()
    events = [(e["event"], e.get("file")) for e in logs if e["event"].startswith("status_file")]
    assert events == [("status_file_unwritable", "listener-0.json"), ("status_file_unwritable", "processes.json"),
                      ("status_file_written_again", "listener-0.json"), ("status_file_written_again", "processes.json")]
    assert read_table(data)["processes"]  # both written once the disk takes them again
    assert (data / "processes" / "listener-0.json").exists()


def test_a_restarted_child_starts_on_the_supervisor_s_running_config(tmp_path, monkeypatch):
    """A child the supervisor restarts read the config file again: after an edit of data_dir, the database, a port
    or the token (reported by reload as needing a restart) a restarted worker opened another, empty database while
    the listeners queued into the old one; and after a refused reload it died of the file's error. Now it starts on
    the supervisor's running config: after an accepted reload the file's live settings with the supervisor's
    restart-only ones, after a refused one the config as it was; PACSNODE_* overrides and secrets carried over."""
    from node.config import load_config
    from node.config.snapshot import child_config

    path = tmp_path / "node.toml"

    def write(name: str, port: int | str, stable: float, backoff: float) -> None:
        path.write_text(f'[node]\ndata_dir = "{tmp_path / name}"\nport = {port}\ninstance_id = "unit"\n'
                        f'dicomweb_token = "token-{name}"\n[database]\nurl = "sqlite:///{tmp_path / name}.db"\n'
                        f'[completion]\nstable_seconds = {stable}\n[supervise]\nrestart_backoff_seconds = {backoff}\n'
                        '[worker]\nenabled = false\n')

    monkeypatch.setenv("PACSNODE_NODE__AE_TITLE", "FROM-ENV")
    write("a", 11112, 30, 0.5)
    sup = ProcessSupervisor(load_config(path), path)
    write("b", 11113, 5, 0.25)  # restart-only: data_dir, port, token, database; live: completion, supervise
    assert sup.reload()
    assert sup.config.supervise.restart_backoff_seconds == 0.25 and sup.config.node.data_dir == tmp_path / "a"
    env = sup._child_env(sup.children[0])
    assert "token-a" not in " ".join(sup._arguments(sup.children[0]))  # secrets never in argv
    restarted = child_config(path, env)
    assert restarted == sup.config and restarted.source == str(path)  # its own reload reads the file
    assert restarted.node.data_dir == tmp_path / "a" and restarted.node.port == 11112
    assert restarted.database_url == f"sqlite:///{tmp_path / 'a'}.db" and restarted.node.ae_title == "FROM-ENV"
    assert restarted.node.dicomweb_token is not None
    assert restarted.node.dicomweb_token.get_secret_value() == "token-a"
    assert restarted.completion.stable_seconds == 5  # a live setting: the file's, as the running children have it
    write("c", '"eleven"', 9, 0.25)  # a typo: refused
    assert not sup.reload()
    assert child_config(path, sup._child_env(sup.children[0])) == restarted  # not the file's error, nor its 9 s
    write("d", 11114, 9, 0.25)
    alone = child_config(path, {})  # not started by a supervisor: the file as it is
    assert alone.node.data_dir == tmp_path / "d" and alone.node.ae_title != "FROM-ENV"
    with pytest.raises(ConfigError, match="RUNNING_CONFIG does not hold"):
        child_config(path, {**env, "PACS_AI_NODE_RUNNING_CONFIG": '{"node": {"port": "x"}}'})


def test_a_reload_reports_and_keeps_what_only_a_restart_changes_and_applies_the_send_timeout(tmp_path):
    """A reload said "applied" for settings read once at start (model versions, the inference device, the worker's
    on/off, the completion sweep's schedule, the audit trail): nothing changed, and nothing said so. And a lower
    [dispatch] timeout_seconds shortened the delivery lease at once while the senders kept the old timeout, so a
    slow send outlived its lease. Now the first are reported as needing a restart and kept, the second rebuilds
    the senders."""
    from structlog.testing import capture_logs

    from node.config import DestinationKind, load_config
    from node.service import Service

    path = tmp_path / "node.toml"
    base = f'[node]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\n'
    path.write_text(base + "[worker]\nenabled = false\n")
    service = Service(load_config(path, environ={}))
    try:
        path.write_text(base + '[worker]\nenabled = true\nclassifier_version = "2.0.0"\ndevice = "cpu"\n'
                               '[completion]\nsweep_seconds = 5\nstable_seconds = 12\n'
                               '[audit]\nsite_id = "elsewhere"\n[dispatch]\ntimeout_seconds = 7\n')
        with capture_logs() as logs:
            assert service.reload(path)
        (reloaded,) = [e for e in logs if e["event"] == "config_reloaded"]
        assert set(reloaded["needs_restart"]) == {
            "worker.enabled", "worker.classifier_version", "worker.device", "completion.sweep_seconds", "audit"}
        assert not service.config.worker.enabled and service.config.worker.classifier_version is None
        assert service.config.completion.sweep_seconds != 5 and service.config.audit.site_id == ""
        assert service.config.completion.stable_seconds == 12  # a live setting: applied
        senders = service.dispatcher._senders
        assert senders[DestinationKind.DIMSE].timeout == 7 and senders[DestinationKind.DICOMWEB].timeout == 7
    finally:
        service.engine.dispose()


def _starts_slowly_then_handles_sighup(marker: Path) -> int:
    """A stand-in role child: busy starting for a while, then installs its handlers as the node does."""
    from node.signals import StopSignals

    time.sleep(1.0)  # loading, as a worker loads its models
    import threading as _threading

    stop = _threading.Event()
    written = marker.with_suffix(".tmp")  # renamed into place: the loop below must not see a half-written marker
    StopSignals(None, stop, marker.with_suffix(".pid"),
                lambda: (written.write_text("reloaded"), written.rename(marker))).install()
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0 if marker.exists() else 4


def test_a_reload_forwarded_while_a_child_starts_is_handled_once_it_is_up_not_fatal(tmp_path, start):
    """A child starts with SIGHUP at its default action (terminate) until its handlers are installed; a reload
    forwarded meanwhile ended it (a restart, counted against the restart budget). Now SIGHUP stays blocked until
    then, and the child reloads once it is up."""
    marker = tmp_path / "reloaded"
    sup = supervisor(tmp_path, start, "sleep")
    root = str(Path(__file__).parents[2])
    code = (f"import sys; sys.path.insert(0, {root!r}); from tests.unit.test_processes import "
            f"_starts_slowly_then_handles_sighup as f; from pathlib import Path; sys.exit(f(Path({str(marker)!r})))")
    sup._command = lambda child: [sys.executable, "-c", code]  # type: ignore[method-assign]
    sup._child_main = lambda child: lambda: _starts_slowly_then_handles_sighup(marker)  # type: ignore[method-assign]
    child = sup.children[0]
    sup._spawn(child)
    time.sleep(0.2)
    assert child.proc is not None
    child.proc.send_signal(signal.SIGHUP)  # as the supervisor forwards a reload
    wait_until(lambda: child.proc.poll() is not None, 15, "the child to end")
    assert child.proc.poll() == 0 and marker.read_text() == "reloaded"


def test_a_child_restarted_after_a_refused_reload_runs_on_the_supervisor_s_config(tmp_path, start):
    """A child the supervisor starts read the config file afresh. With a typo saved there (the reload refused, the
    running config kept) a child that died — OOM, a crash — failed its every restart with "config error", and the
    supervisor gave up and took the healthy listener down with it (exit 70): one typo and one crash, the node gone.
    Now a child starts on the supervisor's running config, never on a file the supervisor refused, and says so."""
    from structlog.testing import capture_logs

    from node.config import load_config
    from node.scu import Peer, echo

    path = tmp_path / "node.toml"
    port = free_port()
    good = (f'[node]\nhost = "127.0.0.1"\nport = {port}\nhttp_port = {free_port()}\ndata_dir = "data"\n'
            f'instance_id = "unit"\nchild_start = "{start}"\n[worker]\nenabled = false\n'
            '[supervise]\nrestart_backoff_seconds = 0.05\nmax_restarts = 2\n')
    path.write_text(good)  # data_dir relative: to the config file's folder
    config = load_config(path)
    sup = ProcessSupervisor(config, path)
    sup.start()
    try:
        def healthy(child_name: str, min_restarts: int = 0) -> bool:
            sup.check()
            assert not sup._stop.is_set(), f"the supervisor gave up (exit {sup.exit_code})"
            entry = next(p for p in read_table(config.node.data_dir)["processes"] if p["name"] == child_name)
            return entry["alive"] and not entry["problems"] and entry["restarts"] >= min_restarts

        wait_until(lambda: healthy("dispatcher-0") and healthy("listener-0"), 60, "the children healthy")
        path.write_text(good.replace(f"port = {port}", 'port = "eleven"'))
        with capture_logs() as logs:
            assert not sup.reload()  # refused: the running config kept
            dispatcher = sup.children[0]
            assert dispatcher.name == "dispatcher-0" and dispatcher.proc is not None
            os.kill(dispatcher.proc.pid, signal.SIGKILL)
            wait_until(lambda: healthy("dispatcher-0", 1), 60, "the dispatcher restarted and healthy")
            deadline = time.monotonic() + 2  # and it stays up: no "config error" exit a moment later
            while time.monotonic() < deadline:
                assert healthy("dispatcher-0", 1)
                time.sleep(0.1)
        assert dispatcher.restarts == 1 and dispatcher.last_exit == -signal.SIGKILL
        kept = [e for e in logs if e["event"] == "process_started_on_kept_config"]
        assert [e["process"] for e in kept] == ["dispatcher-0"] and "port" in kept[0]["file_refused"]
        assert echo(Peer("127.0.0.1", port, called_ae=config.node.ae_title, calling_ae="TEST")) == 0
    finally:
        sup.stop(20)
    assert sup.exit_code == 0


def test_the_config_snapshot_round_trips_secrets_and_refuses_what_an_exec_d_child_cannot_take(tmp_path):
    """The running config a child gets is the supervisor's, equal field for field: secrets in clear (a JSON dump
    masks them, and a child would have checked tokens against ``**********``), destinations, routes, TLS files.
    One too big for an exec'd child's environment is refused up front, never an E2BIG at a restart."""
    from node.config.snapshot import MAX_EXEC_BYTES, dump_snapshot, for_child, load_snapshot

    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path), "dicomweb_token": "s3cret-token", "http_host": "0.0.0.0"},
        "destinations": [{"name": "pacs", "kind": "dicomweb", "url": "https://user:pw@pacs.example/dicomweb",
                          "token": "dest-s3cret", "ca_file": str(tmp_path / "ca.pem")}],
        "tls": {"certificate": str(tmp_path / "cert.pem"), "private_key": str(tmp_path / "key.pem")},
        "spools": {"other": "/mnt/other"},
        "source": str(tmp_path / "node.toml"),
    })
    text = dump_snapshot(config)
    assert "s3cret-token" in text and "dest-s3cret" in text and "**" not in text
    assert load_snapshot(text) == config and load_snapshot(text).source == config.source
    with pytest.raises(ConfigError, match="not a config snapshot"):
        load_snapshot("{not json")
    many = config.model_copy(update={"destinations": tuple(
        config.destinations[0].model_copy(update={"name": f"pacs-{i}"}) for i in range(MAX_EXEC_BYTES // 200))})
    assert for_child(many, exec_child=False) == dump_snapshot(many)  # a forked child takes any size
    with pytest.raises(ConfigError, match='child_start = "fork"'):
        for_child(many, exec_child=True)


def test_a_child_exiting_with_a_config_error_is_logged_loudly(tmp_path):
    """Exit status 2 is the CLI's config error: each restart fails the same way. It counted as a plain death; now
    the supervisor says what it is (the budget still applies)."""
    from structlog.testing import capture_logs

    sup = supervisor(tmp_path, "fork", "exit 3", max_restarts=1)
    sup._child_main = lambda child: lambda: 2  # type: ignore[method-assign]
    with capture_logs() as logs:
        run_out_the_restart_budget(sup)
    assert sup.exit_code == EXIT_LOOP_FAILED
    loud = [e for e in logs if e["event"] == "process_config_error"]
    assert loud and all(e["log_level"] == "critical" and e["exit_status"] == 2 for e in loud)
