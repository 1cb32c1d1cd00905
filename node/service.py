"""The node's lifecycle: build every stage from one `NodeConfig`, run until a signal, shut down in two stages.

`Service(config)` wires the data path in order — DIMSE server and HTTP (STOW-RS, QIDO-RS, health, metrics) →
ingest (spool + index) → completion sweep → job queue → worker (models) → dispatch — in one process. `start()` returns once the node listens; `run_forever()` blocks until
SIGINT/SIGTERM: the first stops accepting associations, lets the worker and dispatcher finish what they hold
and exits; a second signal forces exit. Everything that matters is in the database, so a restart resumes.

Every long-running loop — worker, dispatch (one per destination, and its sweep), completion sweep, retention,
commitment (proof of delivery), reachability (destination checks), HTTP server, DIMSE acceptor — beats one
`Heartbeats` registry (`/readyz` reports it); the main thread runs the `Supervisor` every 0.5 s, which restarts a loop whose thread ended (bounded, with back-off) or stops the node with exit status
`EXIT_LOOP_FAILED` (70) so a process supervisor (systemd ``Restart=on-failure``, Kubernetes) starts it afresh.

``Service(config, role=...)`` builds every stage but starts only its role's (node.roles: listener, worker,
dispatcher, or all); ``identity`` names the process on the database (its rows, its crash cleanup). With
``[node] process_model = "processes"`` each role child of `node.processes.ProcessSupervisor` is one such
``Service``; the supervisor itself runs none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.engine import make_url
from starlette.routing import Mount

from node.admin import admin_routes
from node.admission import Admission, index_activity
from node.audit import AuditTrail
from node.auditdb import audit_dangling_closed, audit_export
from node.auth import Authenticator, user_for
from node.commitment import Commitments
from node.completion import CompletionSweeper
from node.config import DestinationKind, NodeConfig, load_config
from node.config.snapshot import reload_snapshot
from node.db import clock_skew_seconds, create_engine_for, init_schema
from node.dicomweb import create_app
from node.dimse import DimseServer
from node.disks import node_folders, used_by_path
from node.dispatch import Dispatcher
from node.errors import ConfigError
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor
from node.logs import get_logger
from node.metrics import Metrics
from node.pipelines import ModelRunner, RegistryRunner
from node.queue import JobQueue
from node.reachability import Reachability, ReachabilityLoop
from node.retention import Retention, RetentionLoop
from node.roles import Identity, Stage, role_config, runs, worker_poll_seconds
from node.sdnotify import Notifier, service_health
from node.senders import DimseSender, Sender, StowSender
from node.signals import StopSignals
from node.spool import Spool
from node.states import Role
from node.supervise import EXIT_LOOP_FAILED, Heartbeats, Supervisor, beat_socketserver
from node.tls import crl_next_updates
from node.tls import expiry as tls_expiry
from node.tls import loaded_at_start as tls_loaded_at_start
from node.wakeup import DISPATCHER, WORKER, Wakeups
from node.worker import Worker

DIMSE_LOOP = "dimse"  # the DIMSE acceptor's name in the heartbeat registry
DIMSE_DRAIN_SECONDS = 10.0  # at a stop, running associations get this long to end before their A-ABORT


class Service:
    def __init__(self, config: NodeConfig, runner_factory: Callable[[], ModelRunner] | None = None, *,
                 role: Role = Role.ALL, identity: Identity | None = None,
                 processes: Callable[[], dict[str, Any]] | None = None) -> None:
        self.role = role
        self.identity = identity or Identity.of(config, role)
        config = role_config(config, role)
        self.config = config
        self.log = get_logger(component="service")
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine_for(config.database_url)
        init_schema(self.engine)
        self.index = Index(self.engine, node_id=self.identity.node_id)
        self.spool = Spool(config.node.spool_dir, spool_id=config.node.spool_id,
                           indexed_files=lambda: self.index.sample_files(config.node.spool_dir, config.node.spool_id))
        self.ingestor = Ingestor(self.spool, self.index)
        self.queue = JobQueue(self.engine, config.queue)
        self.metrics = Metrics()
        self.audit = AuditTrail(config.audit, config.node.data_dir, ae_title=config.node.ae_title,
                                on_failure=self.metrics.audit_failure)
        # Admission control sits in the ingestor, the one boundary both front doors pass (node.admission); it reads
        # every file system the node writes to (node.disks), so a full spool volume pauses it too.
        self.admission = Admission(config.admission, config.node.data_dir, queue_depth=self.queue.depth,
                                   series_activity=index_activity(self.index), paths=node_folders(config))
        self.ingestor.admission = self.admission
        self.metrics.bind_admission(self.admission.paused_by_reason)
        self.heartbeats = Heartbeats(stuck_after_periods=config.supervise.stuck_after_periods)
        self.supervisor = Supervisor(self.heartbeats, config.supervise, on_fatal=self._fatal)
        self.exit_code = 0
        self.commitments = Commitments(config, self.engine, heartbeats=self.heartbeats)
        self.reachability = ReachabilityLoop(Reachability(config, self.engine), self.heartbeats)
        self.dispatcher = Dispatcher(
            config,
            self.engine,
            _senders_for(config),
            on_delivered=self._on_delivered,
            heartbeats=self.heartbeats,
            identity=self.identity.instance_id,  # lease holders <instance>:dispatch:...: recover(own=True) scope
        )
        factory = runner_factory or (
            lambda: RegistryRunner(
                config.worker.classifier_version, config.worker.segmenter_version, config.worker.weights_dir,
                device=config.worker.device.value, gpu_index=config.worker.gpu_index,
                mixed_precision=config.worker.mixed_precision,
            )
        )
        self.worker = Worker(config, self.engine, self.queue, self.dispatcher, factory, metrics=self.metrics,
                             heartbeats=self.heartbeats, poll_seconds=worker_poll_seconds(config, role),
                             identity=self.identity.instance_id)  # one worker per instance: recover() scope
        # Across processes on this host, work committed here wakes its consumer at once (node.wakeup; the
        # consumers poll too). In one process (role all) the events above do it.
        self.wakeups = Wakeups(config.node.data_dir / "run")
        if role is not Role.ALL and not runs(role, Stage.DISPATCH):
            self.dispatcher.remote_wake = lambda: self.wakeups.notify(DISPATCHER)
        self.sweeper = CompletionSweeper(config, self.engine, self.queue, on_complete=self._work_queued,
                                         metrics=self.metrics, heartbeats=self.heartbeats)
        self.dimse = DimseServer(
            config, self.ingestor, self.index, on_released=self.sweeper.nudge, metrics=self.metrics,
            on_commitment_report=self.commitments.handle_report,
            audit=self.audit, reuse_port=role is Role.LISTENER,
        )
        self.retention = Retention(config, self.engine, audit=self.audit)
        self.retention_loop = RetentionLoop(self.retention, self.heartbeats)
        presented = tls_loaded_at_start(config)  # what the listeners present until a restart, however renewed
        self.metrics.bind(
            queue_depth=self.queue.depth, jobs=self.queue.counts, series=self.index.series_counts,
            deliveries=self.dispatcher.counts, disk=lambda: used_by_path(node_folders(config)),
            destination_up=self.reachability.reachability.up, uncommitted=self.commitments.uncommitted,
            clock_skew=lambda: clock_skew_seconds(self.engine), certificate_expiry=lambda: tls_expiry(config, presented),
            crl_next_update=lambda: crl_next_updates(config),
        )
        self.http = self._build_http(config, processes)
        self.sd = Notifier.from_environ(lambda settled: service_health(self, settled))  # systemd (node.sdnotify)
        self._dimse_threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self.parent_pid: int | None = None  # a role child of node.processes: stop when that process is gone
        self.on_tick: Callable[[], None] | None = None  # called every 0.5 s from the main loop (health reports)
        self.pid_file = config.node.data_dir / (
            "pacsnode.pid" if role is Role.ALL else f"pacsnode-{role.value}-{self.identity.index}.pid")

    @property
    def supervised(self) -> bool:
        """A role child of `node.processes`: its supervisor writes the node's audit records (start, stop, reload)."""
        return self.parent_pid is not None

    def _work_queued(self, *_: Any) -> None:
        """Completion queued a job: wake the worker (this process's, and the worker processes on this host)."""
        self.worker.wake()
        if self.role is not Role.ALL:
            self.wakeups.notify(WORKER)

    def _build_http(self, config: NodeConfig, processes: Callable[[], dict[str, Any]] | None) -> HttpServer:
        """The HTTP front door: STOW-RS/QIDO-RS, probes (``/readyz`` with the process table when supervised),
        metrics and ``/admin``."""
        models_ready = self.worker.ready.is_set if config.worker.enabled and runs(self.role, Stage.WORKER) else (
            lambda: True)  # a listener's models live in the worker process: `processes` reports it
        token = config.node.dicomweb_token.get_secret_value() if config.node.dicomweb_token else None
        auth = Authenticator(token, metrics=self.metrics, audit=self.audit)  # one check for every HTTP surface
        health = self.health = HealthProbe(self.engine, config.node.spool_dir, models_ready, self.heartbeats,
                             admission=self.admission.report, spool_root=self.spool.root_problem,
                             device=self.worker.device_report if config.worker.enabled else None,
                             processes=processes)
        app = create_app(
            config, self.ingestor, self.index,
            health=health,
            metrics=self.metrics, token=token, on_released=self.sweeper.nudge,
            max_request_bytes=config.node.stow_max_request_bytes, authenticator=auth, audit=self.audit,
        )
        # The status page reads the live config, so a hot reload shows; its actions need the DICOMweb token.
        app.router.routes.append(Mount("/admin", routes=admin_routes(
            lambda: self.config, self.engine, token=token, dispatcher=self.dispatcher, queue=self.queue,
            index=self.index, authenticator=auth, admission=self.admission.report,
        )))
        return HttpServer(config, app, health=health, heartbeats=self.heartbeats, metrics=self.metrics,
                          reuse_port=self.role is Role.LISTENER, audit=self.audit)

    # Settings bound at start-up (sockets, files, database); a reload that changes them is applied only after a restart.
    RESTART_ONLY = (
        "ae_title", "host", "port", "data_dir", "http_port", "max_associations", "dicomweb_token",
        "stow_max_request_bytes", "uid_root", "max_pdu_bytes", "max_instance_bytes", "max_inflated_bytes",
        "http_header_timeout_seconds", "http_body_timeout_seconds", "http_max_connections",
        "http_max_connections_per_peer", "http_max_header_bytes",
        "association_timeout_seconds",  # receive limits: both front doors take them at start, so one value holds
        "http_host", "metrics_require_token",
        "instance_id", "process_model", "listener_processes", "wake_poll_seconds",  # who this process is, how it runs
        "spool_id", "child_start",
    )
    # Settings outside [node] read once at start (the models, the worker's process, the sweep's schedule); [audit],
    # [database] and [tls] likewise, whole. A reload reports a change of any as needing a restart and keeps them.
    RESTART_ONLY_SETTINGS = (
        ("worker", "enabled"), ("worker", "classifier_version"), ("worker", "segmenter_version"),
        ("worker", "weights_dir"), ("worker", "device"), ("worker", "gpu_index"), ("worker", "mixed_precision"),
        ("worker", "prefetch"), ("worker", "retain_heap_mb"), ("completion", "sweep_seconds"),
    )
    RESTART_ONLY_SECTIONS = ("database", "tls", "audit")

    def reload(self, path: Path | None = None) -> bool:
        """Re-read the config file (SIGHUP, `pacsnode config reload`) and swap it in atomically: allow-list,
        destinations, completion window, queue and dispatch settings change without dropping associations.
        An invalid file is refused with the reason and the running config kept. Returns whether it applied."""
        source = path or (Path(self.config.source) if self.config.source else None)
        with self._reload_lock:
            try:  # a supervised child: what its supervisor accepted (node.config.snapshot), not the file as it reads now
                loaded = reload_snapshot(self.config.node.data_dir) if self.supervised and path is None \
                    else load_config(source)
                new = role_config(loaded, self.role)
            except ConfigError as exc:
                self.log.error("config_reload_refused", reason=str(exc))
                if not self.supervised:  # a supervised child's supervisor audits the reload once for the node
                    self.audit.config_changed(source=str(source) if source else None, applied=False, reason=str(exc))
                return False
            kept = restart_only_changes(self.config, new)
            new = with_restart_only(new, self.config)
            self.dimse.apply_config(new)
            self.sweeper.apply_config(new)
            self.dispatcher.apply_config(new, _senders_for(new) if new.dispatch != self.config.dispatch else None)
            self.worker.apply_config(new)
            self.retention.apply_config(new)
            self.commitments.apply_config(new)
            self.reachability.apply_config(new)  # and checks the destinations again now
            self.queue.apply_config(new)
            self.supervisor.apply_config(new)
            self.admission.apply_config(new.admission)
            self.config = new
            self.log.info(
                "config_reloaded", source=str(source), allowed_calling_aes=list(new.node.allowed_calling_aes),
                destinations=[d.name for d in new.destinations], needs_restart=kept,
            )
            if not self.supervised:
                self.audit.config_changed(source=str(source) if source else None, applied=True,
                                          reason="config reloaded", needs_restart=kept)
            return True

    def start(self) -> None:
        """Start the role's stages (node.roles.STAGES), in data-path order from the back: a front door opens
        last, so nothing is acknowledged before the stages behind it run."""
        self.log.info("node_starting", role=self.role.value, node_id=self.identity.node_id)
        if runs(self.role, Stage.FRONT_DOORS):
            # Only this process's own rows (role all in one process: every row of its instance).
            prefix = self.identity.instance_prefix if self.role is Role.ALL else None
            closed = self.index.abort_dangling_associations(prefix=prefix)
            audit_dangling_closed(self.audit, self.engine, closed,  # what they stored, and their end
                                  stow_user=user_for(self.config.node.http_authenticates()))
            dangling = len(closed)
            # The whole node was down: nothing judged completion meanwhile. A lone listener's restart is no such
            # gap (other listeners sweep on); under a supervisor, it re-timed them once before the children.
            retimed = self.index.retime_open_series() if self.role is Role.ALL else 0
            if dangling or retimed:
                self.log.warning("resuming_previous_run", open_associations_closed=dangling, series_retimed=retimed)
        if runs(self.role, Stage.DISPATCH):
            # Crash cleanup touches only deliveries an earlier process of this instance left sending, or expired leases.
            self.dispatcher.recover(own=True)
            self.dispatcher.start()
        if self.config.worker.enabled and runs(self.role, Stage.WORKER):
            self.worker.recover()  # jobs its earlier process left running: now, not after their lease
            self.worker.start()
        if self.role is Role.WORKER:  # consumers of work other processes make (node.wakeup)
            self.wakeups.listen(WORKER, self.worker.wake)
        elif self.role is Role.DISPATCHER:
            self.wakeups.listen(DISPATCHER, self.dispatcher.wake_local)
        for stage, loop in ((Stage.COMPLETION, self.sweeper), (Stage.RETENTION, self.retention_loop),
                            (Stage.COMMITMENT, self.commitments), (Stage.REACHABILITY, self.reachability)):
            if runs(self.role, stage):
                loop.start()
        if runs(self.role, Stage.FRONT_DOORS):
            self.http.start()
            self._start_dimse()
            self.heartbeats.register(DIMSE_LOOP, 1.0, alive=self._dimse_alive, restart=self._restart_dimse)
        self.pid_file.write_text(f"{os.getpid()}\n")
        if not self.supervised:  # a supervised child is part of its supervisor's application (node.processes)
            self.audit.application(started=True)

    def _start_dimse(self) -> None:
        """Start the DIMSE server and hook its acceptor loop up to the heartbeats: the new ``AcceptorServer@…``
        thread pynetdicom starts tells whether it runs; its ``serve_forever`` beats every turn."""
        before = set(threading.enumerate())
        self.dimse.start()
        self._dimse_threads = [
            t for t in threading.enumerate() if t not in before and t.name.startswith("AcceptorServer")
        ]
        for server in self.dimse.servers:  # plaintext and/or DICOM TLS
            beat_socketserver(server, lambda: self.heartbeats.beat(DIMSE_LOOP))

    def _dimse_alive(self) -> bool:
        return all(t.is_alive() for t in self._dimse_threads)  # none found: its heartbeat alone tells

    def _restart_dimse(self) -> None:
        """The supervisor's restart: close the ended acceptor, listen again on the same port."""
        self.dimse.stop()
        self._start_dimse()

    def problems(self) -> list[str]:
        """What makes this process not ready besides the database and spool: dead or stuck loops, and in a
        process that runs the worker, models not loaded yet."""
        problems = self.heartbeats.problems()
        if runs(self.role, Stage.WORKER) and self.config.worker.enabled and not self.worker.ready.is_set():
            problems.append("models are not loaded")
        return problems

    def _fatal(self, reason: str) -> None:
        """A loop exhausted its restarts: stop the node, exit non-zero (`run_forever` returns the status)."""
        self.log.critical("node_failing", reason=reason, exit_code=EXIT_LOOP_FAILED)
        self.exit_code = EXIT_LOOP_FAILED
        self._stop.set()

    def stop(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        self.sd.stopping()
        self.heartbeats.unregister(DIMSE_LOOP)
        self.dimse.stop(drain_seconds=min(DIMSE_DRAIN_SECONDS, timeout / 4))
        self.http.stop()
        self.sweeper.stop()
        self.retention_loop.stop()
        self.reachability.stop()
        self.worker.stop(timeout)
        self.dispatcher.stop(max(1.0, timeout - (time.monotonic() - t0)))
        self.commitments.stop()
        self.wakeups.close()
        if not self.supervised:
            self.audit.application(started=False)
        self.engine.dispose()
        self.audit.close()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self.log.info("node_stopped")

    def _on_delivered(self, series_uid: str, version: int, destination: str) -> None:
        """A result set reached a destination: its 110106 Export audit record, its proof of delivery
        (node.commitment), then the latency metric."""
        audit_export(self.audit, self.engine, self.config, series_uid, version, destination)
        self.commitments.delivered(series_uid, version, destination)
        self._observe_end_to_end(series_uid, version, destination)

    def _observe_end_to_end(self, series_uid: str, _version: int, _destination: str) -> None:
        """Latency metric: last instance of the series received → its results stored at a destination."""
        row = self.index.get_series(series_uid)
        if row is not None:
            self.metrics.end_to_end(time.time() - row.last_received_at)

    def run_forever(self, on_started: Callable[[], None] | None = None) -> int:
        """Start, supervise the loops until a signal (or a loop that keeps dying), stop; returns the exit status:
        0, or `EXIT_LOOP_FAILED`."""
        StopSignals(self.log, self._stop, self.pid_file, self.sd.around_reload(self.reload), force_exit=exit_now).install()
        self.start()
        if on_started is not None:
            on_started()
        try:
            while not self._stop.wait(0.5):
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.log.error("supervisor_gone", parent_pid=self.parent_pid)  # a role child outlives no one
                    break
                self.supervisor.check()
                self.sd.tick()
                if self.on_tick is not None:
                    self.on_tick()
                if runs(self.role, Stage.FRONT_DOORS):  # admission guards the front doors: only they pause
                    self.admission.state()  # re-evaluated without traffic too, so a pause ends (and is logged) on time
        finally:
            self.stop()
        return self.exit_code


def _senders_for(config: NodeConfig) -> dict[DestinationKind, Sender]:
    """The dispatcher's senders, with ``[dispatch] timeout_seconds`` (rebuilt when a reload changes it: the
    delivery lease follows the setting at once, so the senders must wait as long)."""
    return {DestinationKind.DIMSE: DimseSender(config.node.ae_title, config.dispatch.timeout_seconds),
            DestinationKind.DICOMWEB: StowSender(config.dispatch.timeout_seconds)}


def with_restart_only(new: NodeConfig, running: NodeConfig) -> NodeConfig:
    """``new`` with the settings that take effect only at a restart (`Service.RESTART_ONLY`, the database, TLS)
    taken from ``running``: what a reload applies, and what a role child restarted by the supervisor starts with
    (node.processes pins the supervisor's)."""
    kept: dict[str, dict[str, Any]] = {"node": {k: getattr(running.node, k) for k in Service.RESTART_ONLY}}
    for section, key in Service.RESTART_ONLY_SETTINGS:
        kept.setdefault(section, {})[key] = getattr(getattr(running, section), key)
    updates: dict[str, Any] = {name: getattr(new, name).model_copy(update=values) for name, values in kept.items()}
    updates.update({name: getattr(running, name) for name in Service.RESTART_ONLY_SECTIONS})
    return new.model_copy(update=updates)


def restart_only_changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The settings a reload from ``old`` to ``new`` changes that take effect only after a restart."""
    kept = [k for k in Service.RESTART_ONLY if getattr(new.node, k) != getattr(old.node, k)]
    kept += [f"{section}.{key}" for section, key in Service.RESTART_ONLY_SETTINGS
             if getattr(getattr(new, section), key) != getattr(getattr(old, section), key)]
    if new.database_url != old.database_url:
        kept.append("database.url")
    if new.tls != old.tls:
        kept.append("tls")  # listeners and their certificates are bound at start
    if new.audit != old.audit:
        kept.append("audit")  # the trail's file and syslog sender are opened at start
    return kept


def check_can_start(config: NodeConfig, *, ports: bool) -> None:
    """Fail fast, before any stage or child starts, on what would stop the node a moment later: ``data_dir`` or its
    spool not a folder the node can write, and (``ports``: the process that owns the listeners, `pacsnode serve`
    of role all) a DIMSE or HTTP port another program holds. Raises `ConfigError` naming the folder or address: the
    CLI prints one line and exits 2, where a listener child failing on its HTTP port was restarted until the
    supervisor gave up (exit 70, which ``Restart=on-failure`` restarts for ever)."""
    folders = [("[node] data_dir", config.node.data_dir), ("[node] data_dir", config.node.spool_dir)]
    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folders.append(("[database] url", Path(str(url.database)).parent))  # its journal and WAL files go there
    for key, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"{key}: {folder} is not a folder the node can write "
                              f"({exc.strerror or type(exc).__name__})") from exc
    if ports:
        for host, port in _listen_addresses(config):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as node.http and node.listenfds bind
            try:
                socket.create_server((host, port), family=family).close()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _listen_addresses(config: NodeConfig) -> Iterable[tuple[str, int]]:
    node, tls = config.node, config.tls
    if tls.plaintext_dimse:
        yield node.host, node.port
    if tls.dimse_port is not None:
        yield node.host, tls.dimse_port
    yield node.http_host, node.http_port


def leave(service: Service, exit_code: int) -> NoReturn:
    """The process's exit after `Service.run_forever` returned ``exit_code``: at once, without the interpreter's
    finalisation. Every stage has stopped, its threads joined (only daemon threads remain; measured for each
    role), and `Service.stop` has disposed the database engine and closed the audit trail, so finalisation protects
    nothing — yet it took 0.5–1 s per process here (tearing down TensorFlow's, SQLAlchemy's and pydicom's object
    graphs), on every stop and restart. A stage still running past `Service.stop`'s timeout ends here as under
    kill -9, which the node is built for (leases expire, acknowledged instances are already durable). When TensorFlow is still loading in the worker's thread (no job is claimed before the models are
    loaded, so nothing is held) an interpreter finalised under a native import can also crash. For the command
    line only — it ends the process."""
    if service.worker.loading:
        service.log.info("exiting_while_models_load")
    exit_now(exit_code)


def exit_now(exit_code: int) -> NoReturn:
    """Flush the logging handlers and the standard streams, then ``os._exit``: for a process whose work has
    stopped and whose files and connections are closed (see `leave`)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(exit_code)
