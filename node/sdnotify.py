"""systemd's service notifications (sd_notify(3)) for ``pacsnode serve`` under ``Type=notify`` (deploy/pacsnode.service).

`Notifier.from_environ(health)` takes ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` out of the process's
environment — so no role child (forked or exec'd) and no other program the node starts inherits them: only the main
process talks to systemd, as ``NotifyAccess=main`` expects — and is a no-op without ``NOTIFY_SOCKET``. Its owner's
main loop calls `tick()`; ``health(settled)`` (`service_health`, `processes_health`) answers what ``/readyz``
answers (``settled``: once ready, without the checks that wait on I/O, which would hold up the loop it runs in):

* ``READY=1`` once, the first time the node is ready by the same checks as ``/readyz`` (one process: database,
  spool, models, loops; the process model: every role child alive and reporting no problem), never at the fork;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` (``WatchdogSec=``) while nothing is *wedged*: a stuck loop (no
  heartbeat past its limit, node.supervise) or a role child whose health report went stale. A dead loop or child
  is not a wedge — the node restarts it itself, or exits 70 — nor is a database or spool outage, which a restart
  does not cure: those only show in ``STATUS=``. A wedged main loop sends nothing, which is the point;
* ``STATUS=`` a short line (``ready``, or the first readiness problems: loop, process and check names, never PHI)
  whenever it changes;
* `around_reload`: ``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd ≥ 253 needs both) before a SIGHUP reload and
  ``READY=1`` after it, applied or refused (the node runs on either way); only once ``READY=1`` was sent;
* `stopping()`: ``STOPPING=1`` when the stop begins.

A datagram that cannot be sent is logged once and never raised: notifications report, they do not stop the node.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.logs import get_logger

if TYPE_CHECKING:
    from node.service import Service

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
CHECK_SECONDS = 1.0  # once ready, health is read at most this often (before: at every tick of the main loop)
STATUS_CHARS = 200
STALE_MARK = "no health report for"  # node.processes: a live child whose report went stale
STUCK_MARK = ": stuck ("  # node.supervise.LoopStatus.problem of a stuck loop


@dataclass(frozen=True)
class Health:
    """``problems``: why the node is not ready (empty: ready, as ``/readyz`` answers 200); ``wedged``: the subset a
    restart by systemd is for (the watchdog is held while any)."""

    problems: list[str] = field(default_factory=list)
    wedged: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems


class Notifier:
    """The notifications of one ``pacsnode serve`` main process (see the module docstring). ``address`` is
    ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace; None: disabled)."""

    def __init__(self, address: str | None, health: Callable[[bool], Health], *, watchdog_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if address is not None and not address.startswith(("/", "@")):
            get_logger(component="sdnotify").warning("notify_socket_ignored", reason="not a path or @name")
            address = None
        if watchdog_seconds is not None and not watchdog_seconds > 0:
            raise ValueError(f"watchdog_seconds must be > 0, not {watchdog_seconds!r}")
        self._address = address
        self._health = health
        self._clock = clock
        self._ping_every = watchdog_seconds / 2 if watchdog_seconds else None
        self._check_every = min(CHECK_SECONDS, self._ping_every / 2) if self._ping_every else CHECK_SECONDS
        self._lock = threading.Lock()  # the main loop's tick and the config-reload thread both send
        self._ready_sent = False
        self._last_ping: float | None = None
        self._next_check = 0.0
        self._status: str | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, health: Callable[[bool], Health], environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take systemd's variables out of ``environ`` (``os.environ``); disabled when ``NOTIFY_SOCKET`` is unset.
        The watchdog is on when ``WATCHDOG_USEC`` is a positive number and ``WATCHDOG_PID``, if set, is this
        process (as libsystemd's ``sd_watchdog_enabled``)."""
        env = os.environ if environ is None else environ
        address = env.pop(SOCKET_ENV, None) or None
        usec, pid = env.pop(WATCHDOG_USEC_ENV, ""), env.pop(WATCHDOG_PID_ENV, "")
        watchdog = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None
        if pid and pid != str(os.getpid()):
            watchdog = None
        return cls(address, health, watchdog_seconds=watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_seconds(self) -> float | None:
        return self._ping_every * 2 if self._ping_every else None

    def tick(self) -> None:
        """One turn of the owner's main loop: READY=1 when first ready, STATUS= when it changed, WATCHDOG=1 when due
        and nothing is wedged. Health is read at every tick until ready, then at most every `CHECK_SECONDS`."""
        if self._address is None:
            return
        now = self._clock()
        if self._ready_sent and now < self._next_check:
            return
        self._next_check = now + self._check_every
        try:
            health = self._health(self._ready_sent)
        except Exception as exc:  # noqa: BLE001 - reads status files and the database: report it, hold the watchdog
            health = Health([f"health unreadable: {type(exc).__name__}"], ["health unreadable"])
        with self._lock:
            lines = []
            if health.ready and not self._ready_sent:
                self._ready_sent = True
                lines.append("READY=1")
            status = _status_line(health)
            if status != self._status:
                self._status = status
                lines.append(f"STATUS={status}")
            due = self._ping_every is not None and (self._last_ping is None or now - self._last_ping >= self._ping_every)
            if due and not health.wedged:
                self._last_ping = now
                lines.append("WATCHDOG=1")
            if lines:
                self._send(lines)

    def around_reload(self, reload: Callable[[], bool]) -> Callable[[], bool]:
        """``reload`` (SIGHUP's handler thread, node.signals) between RELOADING=1 and READY=1."""

        def reloading() -> bool:
            announce = self.enabled and self._ready_sent  # a reload while starting is no reload to systemd
            if announce:
                self._locked_send(["RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                                   "STATUS=reloading the config"])
            applied = False
            try:
                applied = reload()
            finally:
                if announce:
                    status = "config reloaded" if applied else "config reload refused: running config kept"
                    self._locked_send(["READY=1", f"STATUS={status}"])
            return applied

        return reloading

    def stopping(self) -> None:
        """The stop begins: STOPPING=1."""
        if self.enabled:
            self._locked_send(["STOPPING=1", "STATUS=stopping"])

    def _locked_send(self, lines: list[str]) -> None:
        with self._lock:
            self._status = None  # the next tick states the node's status again
            self._send(lines)

    def _send(self, lines: list[str]) -> None:
        assert self._address is not None
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                get_logger(component="sdnotify").error("sd_notify_failed", error=exc.strerror or type(exc).__name__)
            return
        if self._failed:
            self._failed = False
            get_logger(component="sdnotify").info("sd_notify_sent_again")


def _status_line(health: Health) -> str:
    text = "ready" if health.ready else "not ready: " + "; ".join(health.problems)
    if health.wedged:
        text = f"watchdog held; {text}"
    return text if len(text) <= STATUS_CHARS else text[:STATUS_CHARS - 3] + "..."


def service_health(service: Service, settled: bool = False) -> Health:
    """One process (``process_model = "threads"``, or a role run by hand): ``/readyz``'s checks; once ``settled``
    only those in memory (loops, models: a database or spool that hangs must not hold up the main loop, which also
    restarts dead loops); wedged: a stuck loop."""
    if settled:
        problems = service.problems()
    else:
        checks = service.health.check()
        problems = [reason if name in ("loops", "processes") else f"{name}: {reason}"
                    for name, reason in checks.items() if reason != "ok"]
    wedged = [p for s in service.heartbeats.snapshot().values() if s.stuck and (p := s.problem()) is not None]
    return Health(problems, wedged)


def processes_health(data_dir: Path, _settled: bool = False) -> Health:
    """The supervisor of role children: every child in its table alive and reporting no problem (what a listener's
    ``/readyz`` reads, node.processes.read_table); wedged: a live child whose report is stale or names a stuck loop."""
    from node.processes import read_table

    table: dict[str, Any] = read_table(data_dir)
    entries = table.get("processes", [])
    problems = [f"{p['name']}: not running" for p in entries if not p.get("alive")]
    problems += [f"{p['name']}: {problem}" for p in entries for problem in p.get("problems", [])]
    if not entries:
        problems.append("no process table yet")
    wedged = [p for p in problems if STALE_MARK in p or STUCK_MARK in p]
    return Health(problems, wedged)


__all__ = ["Health", "Notifier", "processes_health", "service_health"]
