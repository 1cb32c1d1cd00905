"""The supervisor of role processes: ``pacsnode serve`` with ``[node] process_model = "processes"``.

`ProcessSupervisor(config, config_path)` runs one child process per role (node.roles) — ``listener_processes``
listeners sharing the DIMSE ports (one accept queue the supervisor binds: node.listenfds) and the HTTP port
(SO_REUSEPORT), a worker (when ``[worker] enabled``) and a dispatcher —
each a fresh interpreter running ``pacsnode serve --role R``, so TensorFlow loads in the worker alone. It:

* prepares the database once (tables; closes the associations every earlier process of this instance left open;
  re-times series still receiving), then starts the children (dispatcher and worker first, the front doors last);
* restarts a child that exits, after a back-off that doubles with each death (``[supervise]``
  restart_backoff_seconds, at most 60 s); a child that dies more than ``max_restarts`` times within
  ``restart_window_seconds`` stops everything and `run_forever` returns `EXIT_LOOP_FAILED` (70), as a dying loop
  does in the threads model;
* forwards SIGTERM/SIGINT (stop: children get SIGTERM and their two-stage shutdown; a second signal kills them) and
  SIGHUP (the file is validated here first, then each child reloads what was accepted: node.config.snapshot);
* starts each child on its own running config (node.config.snapshot, in the child's environment), never on the
  file as it reads now: one restarted after a refused reload runs on what the rest of the node runs (logged:
  ``process_started_on_kept_config``); a child's exit 2 (config error) is logged loudly, ``process_config_error``;
* writes the process table — each child's name, role, pid, alive, restarts, last exit status — to
  ``<data_dir>/processes.json`` (temp file + rename) whenever it changes; each child writes its own health — its
  loops' problems (dead, stuck), models not loaded — to ``<data_dir>/processes/<name>.json`` every 0.5 s
  (`write_report`); `read_table` merges both for ``/readyz`` and ``pacsnode status``.

Metrics: each child gets ``PROMETHEUS_MULTIPROC_DIR`` = ``<data_dir>/metrics`` (emptied at each supervisor start),
so ``/metrics`` on any listener merges every process's counters (node.metrics); a dead child's live-only gauge
files are removed (`mark_process_dead`), its counters stay counted.

Children start by ``fork`` (``[node] child_start = "fork"``, the default on Linux) from a supervisor that has
imported the stages' modules, or as fresh interpreters (``"exec"``): node.forking.

A child asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``, `node.forking.die_with_parent`)
and also stops when its parent pid changes, so a supervisor killed with SIGKILL leaves no orphan listening on the
ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from node.config import NodeConfig, load_config
from node.config.snapshot import ENV as CONFIG_ENV
from node.config.snapshot import dump_snapshot, for_child, write_reload_snapshot
from node.errors import ConfigError
from node.forking import ChildProcess, fork_child, preload
from node.listenfds import DIMSE, DIMSE_TLS
from node.listenfds import ENV as LISTEN_FDS_ENV
from node.listenfds import bind as bind_listening
from node.listenfds import env_value as listen_fds_value
from node.logs import get_logger
from node.metrics import MULTIPROC_ENV
from node.roles import Identity
from node.sdnotify import Notifier, processes_health
from node.signals import StopSignals
from node.states import ChildStart, Role
from node.supervise import EXIT_LOOP_FAILED, restart_delay

EXIT_CONFIG_ERROR = 2  # node.cli: bad usage or config
TABLE_FILE = "processes.json"
REPORTS_DIR = "processes"  # one health report per child
METRICS_DIR = "metrics"  # the children's shared prometheus_client files (node.metrics)
REPORT_STALE_SECONDS = 15.0  # a live child that has not reported for this long is reported as a problem


@dataclass
class Child:
    """One role process and its restart history."""

    role: Role
    index: int
    proc: ChildProcess | None = None
    restarts: int = 0
    deaths: deque[float] = field(default_factory=deque)  # monotonic times of deaths within the window
    due_at: float | None = None  # when a pending restart may run
    started_at: float = 0.0  # epoch seconds
    last_exit: int | None = None

    @property
    def name(self) -> str:
        return f"{self.role.value}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "index": self.index,
                "pid": self.proc.pid if self.proc is not None else None, "alive": self.alive,
                "restarts": self.restarts, "started_at": self.started_at, "last_exit": self.last_exit}


def children_for(config: NodeConfig) -> list[Child]:
    """The role processes ``config`` asks for: dispatcher, worker (when enabled), then the listeners."""
    out = [Child(Role.DISPATCHER, 0)]
    if config.worker.enabled:
        out.append(Child(Role.WORKER, 0))
    out += [Child(Role.LISTENER, i) for i in range(config.node.listener_processes)]
    return out


class ProcessSupervisor:
    """Runs and restarts the role children of one node instance (see the module docstring)."""

    def __init__(self, config: NodeConfig, config_path: Path | None, *, log_level: str = "INFO",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.config_path = config_path
        self.log_level = log_level
        self.identity = Identity.of(config)
        self.children = children_for(config)
        self.exit_code = 0
        self.table_file = config.node.data_dir / TABLE_FILE
        self.pid_file = config.node.data_dir / "pacsnode.pid"
        self._clock = clock
        self._stop = threading.Event()
        self._fork_lock = threading.Lock()  # held across each fork and by the reload thread (node.forking)
        self.fork = config.node.child_start is ChildStart.FORK and hasattr(os, "fork")
        self._snapshot = for_child(config, exec_child=not self.fork)  # what each child starts on (`CONFIG_ENV`)
        self._refused: str | None = None  # why the file was refused at the last reload; None after one applied
        self._log = get_logger(component="processes", instance_id=self.identity.instance_id)
        self._listening: dict[str, socket.socket] = {}  # the DIMSE ports, bound here for every listener (listenfds)
        self._sd = Notifier.from_environ(lambda settled: processes_health(self.config.node.data_dir, settled))

    # -- lifecycle -----------------------------------------------------------------------------------------
    def prepare(self) -> tuple[int, int]:
        """Create the tables, close the associations earlier processes of this instance left open and re-time the
        series still receiving (the node was down); returns how many of each. Run once, before any child, so
        children never race to create tables."""
        from node.auditdb import audit_dangling_closed
        from node.auth import user_for
        from node.db import create_engine_for, init_schema
        from node.index import Index
        from node.service import Service  # noqa: F401 - registers every stage's tables on the metadata

        self.config.node.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine_for(self.config.database_url)
        try:
            init_schema(engine)
            index = Index(engine)
            closed = index.abort_dangling_associations(prefix=self.identity.instance_prefix)
            if closed:  # what they stored, and their end: the records their close would have written
                self._audit(lambda audit: audit_dangling_closed(audit, engine, closed, stow_user=user_for(
                    self.config.node.http_authenticates())))
            return len(closed), index.retime_open_series()
        finally:
            engine.dispose()

    def start(self) -> None:
        closed, retimed = self.prepare()
        if closed or retimed:
            self._log.warning("resuming_previous_run", open_associations_closed=closed, series_retimed=retimed)
        self._listening = self._bind_listeners()
        self.pid_file.write_text(f"{os.getpid()}\n")
        self._fresh_metrics_dir()
        self._audit(lambda a: a.application(started=True))  # one start/stop per node, not one per child
        if self.fork:
            preload()
        for child in self.children:
            self._spawn(child)
        self._write_table()
        self._log.info("processes_started", processes=[c.name for c in self.children])

    def _bind_listeners(self) -> dict[str, socket.socket]:
        """The DIMSE listening sockets the listener children share (`node.listenfds`); none without listeners."""
        if not any(c.role is Role.LISTENER for c in self.children):
            return {}
        from node.guard import ReceiveLimits

        node, tls = self.config.node, self.config.tls
        backlog = ReceiveLimits.from_config(node).listen_backlog  # as a GuardedServer of its own would listen
        ports = {DIMSE: node.port if tls.plaintext_dimse else None, DIMSE_TLS: tls.dimse_port}
        bound: dict[str, socket.socket] = {}
        for name, port in ports.items():
            if port is None:
                continue
            try:
                bound[name] = bind_listening(node.host, port, backlog)
            except OSError as exc:  # in use, or not ours to bind: nothing starts (cli: exit 2, the reason)
                for sock in bound.values():
                    sock.close()
                raise ConfigError(f"cannot listen on {node.host}:{port}: {exc.strerror or exc}") from exc
        return bound

    def _command(self, child: Child) -> list[str]:
        """``child_start = "exec"``: the command line of ``child``."""
        return [sys.executable, "-m", "node.cli", *self._arguments(child)]

    def _child_main(self, child: Child) -> Callable[[], int]:
        """``child_start = "fork"``: what the forked ``child`` runs (`node.cli.main` on its arguments)."""
        from node.cli import main

        arguments = self._arguments(child)
        kept = self._shared_with(child)
        others = [sock for name, sock in self._listening.items() if name not in kept]

        def run() -> int:
            for sock in others:  # a forked child holds every descriptor: only listeners keep the shared sockets
                sock.close()
            return main(arguments)

        return run

    def _shared_with(self, child: Child) -> dict[str, socket.socket]:
        """The shared listening sockets ``child`` gets: all of them for a listener, none for the other roles."""
        return self._listening if child.role is Role.LISTENER else {}

    def _child_env(self, child: Child) -> dict[str, str]:
        """What ``child``'s environment gains: the metrics folder and the shared sockets it gets, if any."""
        env = {MULTIPROC_ENV: str(self.metrics_dir), CONFIG_ENV: self._snapshot}
        if shared := self._shared_with(child):
            env[LISTEN_FDS_ENV] = listen_fds_value(shared)
        return env

    def _arguments(self, child: Child) -> list[str]:
        """The ``pacsnode`` arguments of ``child``: ``serve --role R`` and how to find its supervisor and config."""
        args = ["serve", "--role", child.role.value, "--child-index", str(child.index),
                "--supervisor-pid", str(os.getpid()), "--log-level", self.log_level]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        return args

    @property
    def metrics_dir(self) -> Path:
        return self.config.node.data_dir / METRICS_DIR

    def _fresh_metrics_dir(self) -> None:
        """The children's shared metric files, from zero: counters restart with the node, as in one process."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)

    def _spawn(self, child: Child) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which forwards one SIGTERM
        # (a second signal straight from the terminal would force the children's exit).
        # SIGHUP blocked across the fork or exec: the child inherits the mask and unblocks it once its handler is
        # installed (node.signals), so a reload forwarded while it starts is handled then instead of ending it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            if self.fork:
                with self._fork_lock:
                    child.proc = fork_child(self._child_main(child), self._child_env(child), child.name)
            else:
                fds = [s.fileno() for s in self._shared_with(child).values()]
                child.proc = subprocess.Popen(self._command(child), process_group=0,  # noqa: S603 - ours
                                              env={**os.environ, **self._child_env(child)}, pass_fds=fds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.started_at = time.time()
        child.due_at = None
        self._log.info("process_started", process=child.name, pid=child.proc.pid)
        if self._refused is not None:  # the file on disk is not what it runs: say so where the operator looks
            self._log.warning("process_started_on_kept_config", process=child.name, file_refused=self._refused)

    def check(self) -> None:
        """One round: note children that exited, restart those whose back-off is over; a child over its restart
        budget stops the node (exit status `EXIT_LOOP_FAILED`)."""
        changed = False
        now = self._clock()
        for child in self.children:
            if child.proc is None or child.alive:
                continue
            if child.due_at is None:  # a death not handled yet
                child.due_at = self._note_death(child, child.proc, now)
                if child.due_at is None:
                    return
                changed = True
            if now >= child.due_at:
                self._spawn(child)
                child.restarts += 1
                self._log.warning("process_restarted", process=child.name, restarts=child.restarts)
                changed = True
        if changed:
            self._write_table()

    def _note_death(self, child: Child, proc: ChildProcess, now: float) -> float | None:
        """Record the death of ``child`` (its process ``proc``); returns when it restarts, None (and the node stops)
        when that is over its budget."""
        settings = self.config.supervise
        child.last_exit = proc.returncode
        mark_process_dead(proc.pid, str(self.metrics_dir))  # its live gauges go; counters stay
        if child.last_exit == EXIT_CONFIG_ERROR:  # the same config fails the same way at each restart
            self._log.critical("process_config_error", process=child.name, exit_status=child.last_exit,
                               hint="the child refused its config or arguments (its stderr says why); restarts "
                                    "count against [supervise] max_restarts")
        while child.deaths and child.deaths[0] < now - settings.restart_window_seconds:
            child.deaths.popleft()
        if len(child.deaths) >= settings.max_restarts:
            self._log.critical("process_failed", process=child.name, exit_status=child.last_exit,
                               deaths_in_window=len(child.deaths) + 1)
            self.exit_code = EXIT_LOOP_FAILED
            self._stop.set()
            return None
        delay = restart_delay(settings, len(child.deaths))
        child.deaths.append(now)
        self._log.error("process_died", process=child.name, exit_status=child.last_exit,
                        restart_in_seconds=round(delay, 3))
        return now + delay

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM every child (their own graceful stop), SIGKILL what still runs after ``timeout``."""
        self._stop.set()
        self._sd.stopping()
        for child in self.children:
            if child.alive:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log.error("process_killed", process=child.name, pid=child.proc.pid)
                child.proc.kill()
                child.proc.wait()
        for sock in self._listening.values():  # the ports close with the last listener gone
            sock.close()
        self._listening = {}
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.table_file.unlink()
        self._audit(lambda a: a.application(started=False))
        self._log.info("node_stopped", exit_code=self.exit_code)

    def _audit(self, record: Callable[[Any], None]) -> None:
        """Write one audit record as the node: the supervisor, not each child, records the node's start, stop
        and config reloads (node.audit; a supervised child writes the records of what it does itself)."""
        from node.audit import AuditTrail

        audit = AuditTrail(self.config.audit, self.config.node.data_dir, ae_title=self.config.node.ae_title)
        try:
            record(audit)
        finally:
            audit.close()

    def kill(self) -> None:
        for child in self.children:
            if child.alive:
                assert child.proc is not None
                child.proc.kill()

    def reload(self) -> bool:
        """Validate the config file; then SIGHUP each child (each reloads it, `Service.reload`) and start the
        children it restarts on it. A file that does not load is refused here: no child is signalled, and those it
        starts later keep the running config."""
        with self._fork_lock:  # no fork copies a lock this thread holds (node.forking)
            return self._reload()

    def _reload(self) -> bool:
        from node.service import restart_only_changes, with_restart_only

        source = str(self.config_path) if self.config_path else None
        try:
            new = load_config(self.config_path)
            running = with_restart_only(new, self.config)  # its own [supervise] settings; children it starts
            snapshot = for_child(running, exec_child=not self.fork)
        except ConfigError as exc:
            reason = self._refused = str(exc)
            self._log.error("config_reload_refused", reason=reason)
            self._audit(lambda a: a.config_changed(source=source, applied=False, reason=reason))
            return False
        try:  # the children reload to this, not to the file as it reads when their SIGHUP comes (node.config.snapshot);
            # the file as accepted, restart-only settings included: each child names those needing a restart itself
            write_reload_snapshot(running.node.data_dir, dump_snapshot(new))
        except OSError as exc:
            reason = self._refused = f"the accepted config could not be handed to the processes ({exc.strerror})"
            self._log.error("config_reload_refused", reason=reason)
            self._audit(lambda a: a.config_changed(source=source, applied=False, reason=reason))
            return False
        kept = restart_only_changes(self.config, new)
        self.config, self._snapshot, self._refused = running, snapshot, None
        self._audit(lambda a: a.config_changed(source=source, applied=True, reason="config reloaded",
                                               needs_restart=kept))
        for child in self.children:
            if child.alive:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGHUP)
        self._log.info("config_reload_forwarded", processes=[c.name for c in self.children if c.alive])
        return True

    # -- the process table ---------------------------------------------------------------------------------
    def table(self) -> dict[str, Any]:
        return {"supervisor_pid": os.getpid(), "instance_id": self.identity.instance_id, "updated_at": time.time(),
                "processes": [c.as_dict() for c in self.children]}

    def _write_table(self) -> None:
        _write_json(self.table_file, self.table())

    # -- the main loop -------------------------------------------------------------------------------------
    def run_forever(self, on_started: Callable[[], None] | None = None, *, period: float = 0.2) -> int:
        """Start the children, supervise them until a signal (or a child that keeps dying), stop them; returns
        0 or `EXIT_LOOP_FAILED`."""
        StopSignals(self._log, self._stop, self.pid_file, self._sd.around_reload(self.reload), on_force=self.kill).install()
        self.start()
        if on_started is not None:
            on_started()
        try:
            while not self._stop.wait(period):
                self.check()
                self._sd.tick()
        finally:
            self.stop()
        return self.exit_code


def read_table(data_dir: Path, *, stale_after: float = REPORT_STALE_SECONDS) -> dict[str, Any]:
    """The process table the supervisor wrote in ``data_dir`` ({} when none runs), each entry with its child's
    own ``problems`` (from its last report; a live child that has not reported yet is starting, one silent for
    ``stale_after`` seconds is a problem too). A table whose supervisor is gone reports every process as not
    alive."""
    try:
        table: dict[str, Any] = json.loads((data_dir / TABLE_FILE).read_text())
    except FileNotFoundError:
        return {}
    pid = int(table.get("supervisor_pid") or 0)
    if not _running(pid):
        table["supervisor_gone"] = True
    now = time.time()
    for entry in table.get("processes", []):
        if table.get("supervisor_gone"):
            entry["alive"] = False
        entry["problems"] = _reported_problems(data_dir, entry, now, stale_after) if entry["alive"] else []
    return table


def _reported_problems(data_dir: Path, entry: dict[str, Any], now: float, stale_after: float) -> list[str]:
    try:
        report = json.loads((data_dir / REPORTS_DIR / f"{entry['name']}.json").read_text())
    except (FileNotFoundError, ValueError):
        report = {}
    if report.get("pid") != entry["pid"]:
        return ["starting (no health report yet)"]  # a child reports once it has started all its stages
    age = now - float(report.get("at", 0))
    problems = [str(p) for p in report.get("problems", [])]
    return problems + ([f"no health report for {age:.0f} s"] if age > stale_after else [])


def write_report(data_dir: Path, name: str, problems: list[str]) -> None:
    """A child's health for the process table: ``problems`` (empty when fine), its pid, the time."""
    _write_json(data_dir / REPORTS_DIR / f"{name}.json", {"pid": os.getpid(), "at": time.time(), "problems": problems})


_unwritable: set[Path] = set()  # status files whose last write failed (logged once per outage)


def _write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically. A failure (the data disk full or failing) is logged when
    it starts and when it ends, never raised: these files only report health, written every tick, and raising
    ended the child — and then the supervisor, which writes its table the same way — so a full disk stopped every
    process where admission control should pause receiving and the rest go on (`pacsnode status` then shows the
    reports growing stale)."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if path not in _unwritable:
            _unwritable.add(path)
            get_logger(component="processes").error("status_file_unwritable", file=path.name,
                                                    error=exc.strerror or type(exc).__name__)
        return
    if path in _unwritable:
        _unwritable.discard(path)
        get_logger(component="processes").info("status_file_written_again", file=path.name)


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["TABLE_FILE", "Child", "ProcessSupervisor", "children_for", "read_table", "write_report"]
