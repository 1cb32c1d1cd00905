"""Supervised loops: each long-running loop beats a shared `Heartbeats` registry; `Supervisor` restarts one whose
thread ended, or asks the process to exit non-zero; `/readyz` reports `Heartbeats.snapshot()`.

A loop registers with its period (the longest it waits between two turns when idle), a check that its thread still
runs, and how to restart it. It beats once per turn; before an item that may hold it longer (a job, a delivery, a
back-off wait) it beats with ``busy_for`` seconds. A loop is *stuck* when its last beat is older than
``stuck_after_periods`` × its period, or than its busy allowance when that is longer; *dead* when its thread ended
although nobody stopped it (a stopped loop unregisters first). A stuck thread cannot be killed from Python, so a
stuck loop only turns the node not-ready; a dead one is restarted after a back-off that doubles with each restart,
at most ``max_restarts`` times within ``restart_window_seconds`` — one more death takes the process down
(`Supervisor` calls ``on_fatal``; the service exits with `EXIT_LOOP_FAILED`) so a process supervisor restarts it.

`failure(exc)` describes an exception for logs without quoting header values: its type, where it was raised, and
the message only for the node's and models' own errors (PHI-free by contract).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import NodeConfig, SuperviseSection
from node.logs import get_logger

EXIT_LOOP_FAILED = 70  # EX_SOFTWARE: a loop kept dying; restart the process
MAX_RESTART_DELAY_SECONDS = 60.0


def restart_delay(settings: SuperviseSection, deaths: int) -> float:
    """The wait before restarting a loop (or, in `node.processes`, a child process) that has died ``deaths``
    times within the restart window before this death: ``restart_backoff_seconds`` doubled per earlier death, at
    most `MAX_RESTART_DELAY_SECONDS`."""
    return min(MAX_RESTART_DELAY_SECONDS, settings.restart_backoff_seconds * 2.0 ** deaths)
MIN_PERIOD_SECONDS = 1.0  # a loop that beats more often still counts its limit from one second


@dataclass(frozen=True)
class LoopStatus:
    """One loop at the moment of `Heartbeats.snapshot`."""

    name: str
    age_seconds: float  # since its last beat
    period_seconds: float
    limit_seconds: float  # no beat for longer than this: stuck
    alive: bool  # its thread runs
    restarts: int  # by the supervisor, since the process started

    @property
    def stuck(self) -> bool:
        return self.alive and self.age_seconds > self.limit_seconds

    @property
    def ok(self) -> bool:
        return self.alive and not self.stuck

    def problem(self) -> str | None:
        """None when the loop is fine, else a one-line reason (for `/readyz` and logs)."""
        if not self.alive:
            return f"{self.name}: dead (its thread ended; last beat {self.age_seconds:.1f} s ago)"
        if self.stuck:
            return f"{self.name}: stuck (no heartbeat for {self.age_seconds:.1f} s, limit {self.limit_seconds:.1f} s)"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "alive": self.alive, "stuck": self.stuck, "age_seconds": round(self.age_seconds, 3),
            "period_seconds": self.period_seconds, "limit_seconds": round(self.limit_seconds, 3),
            "restarts": self.restarts,
        }


@dataclass
class _Loop:
    period: float
    alive: Callable[[], bool]
    restart: Callable[[], None] | None
    last_beat: float
    busy_for: float = 0.0
    restarts: int = 0


class Heartbeats:
    """The registry of supervised loops; thread-safe. ``clock`` is monotonic seconds (injected in tests)."""

    def __init__(self, *, stuck_after_periods: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.configure(stuck_after_periods)
        self._clock = clock
        self._lock = threading.Lock()
        self._loops: dict[str, _Loop] = {}

    def configure(self, stuck_after_periods: float) -> None:
        if not stuck_after_periods >= 1:
            raise ValueError(f"stuck_after_periods must be >= 1, not {stuck_after_periods!r}")
        self._factor = float(stuck_after_periods)

    def register(self, name: str, period: float, *, alive: Callable[[], bool],
                 restart: Callable[[], None] | None = None) -> None:
        """Supervise loop ``name`` (replacing an entry of that name); it counts as just beaten. A ``period`` under
        `MIN_PERIOD_SECONDS` counts as that much (a few late sub-second beats are no stuck loop)."""
        if not name:
            raise ValueError("a loop needs a name")
        if not period > 0:
            raise ValueError(f"period of loop {name!r} must be > 0, not {period!r}")
        if not callable(alive):
            raise TypeError(f"alive of loop {name!r} must be callable")
        with self._lock:
            old = self._loops.get(name)
            self._loops[name] = _Loop(max(MIN_PERIOD_SECONDS, float(period)), alive, restart, self._clock(),
                                      restarts=old.restarts if old is not None else 0)

    def unregister(self, name: str) -> None:
        """Stop supervising ``name`` (call before stopping the loop on purpose)."""
        with self._lock:
            self._loops.pop(name, None)

    def beat(self, name: str, *, busy_for: float = 0.0) -> None:
        """Loop ``name`` is making progress; ``busy_for``: its next beat may take up to that many seconds."""
        with self._lock:
            loop = self._loops.get(name)
            if loop is not None:
                loop.last_beat = self._clock()
                loop.busy_for = max(0.0, float(busy_for))

    def restarted(self, name: str) -> int:
        """Record a restart by the supervisor; returns the loop's restart count."""
        with self._lock:
            loop = self._loops.get(name)
            if loop is None:
                return 0
            loop.restarts += 1
            loop.last_beat = self._clock()
            loop.busy_for = 0.0
            return loop.restarts

    def restart_of(self, name: str) -> Callable[[], None] | None:
        with self._lock:
            loop = self._loops.get(name)
            return loop.restart if loop is not None else None

    def snapshot(self) -> dict[str, LoopStatus]:
        """Every registered loop's state, by name."""
        now = self._clock()
        with self._lock:
            loops = list(self._loops.items())
        out = {}
        for name, loop in loops:
            try:
                alive = bool(loop.alive())
            except Exception:  # noqa: BLE001 - a broken liveness check reports the loop dead, never raises
                alive = False
            limit = max(self._factor * loop.period, loop.busy_for)
            out[name] = LoopStatus(name, max(0.0, now - loop.last_beat), loop.period, limit, alive, loop.restarts)
        return out

    def problems(self) -> list[str]:
        """One line per dead or stuck loop (empty when all are fine)."""
        return [p for status in self.snapshot().values() if (p := status.problem()) is not None]


@dataclass
class _History:
    deaths: deque[float] = field(default_factory=deque)  # restart times within the window
    due_at: float | None = None  # when the pending restart may run
    stuck_reported: bool = False


class Supervisor:
    """Restarts dead loops, reports stuck ones; `check()` runs one round (the service calls it every 0.5 s from
    its main thread). ``on_fatal(reason)`` is called once when a loop died more often than the settings allow."""

    def __init__(self, heartbeats: Heartbeats, settings: SuperviseSection, *, on_fatal: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeats = heartbeats
        self.settings = settings
        self._on_fatal = on_fatal
        self._clock = clock
        self._history: dict[str, _History] = {}
        self._fatal: str | None = None
        self._log = get_logger(component="supervise")

    def apply_config(self, config: NodeConfig) -> None:
        """Swap in a reloaded config's ``[supervise]``: restart limits here, the stuck threshold in the heartbeats."""
        self.settings = config.supervise
        self.heartbeats.configure(config.supervise.stuck_after_periods)

    @property
    def fatal(self) -> str | None:
        """The reason the process must exit, once a loop exhausted its restarts."""
        return self._fatal

    def check(self) -> None:
        """One round over the registered loops; never raises."""
        try:
            self._check()
        except Exception as exc:  # noqa: BLE001 - the watchdog must outlive its own bugs
            self._log.error("supervisor_check_failed", error=failure(exc))

    def _check(self) -> None:
        if self._fatal is not None:
            return
        now = self._clock()
        settings = self.settings
        for name, status in self.heartbeats.snapshot().items():
            history = self._history.setdefault(name, _History())
            if status.alive:
                history.due_at = None
                if status.stuck and not history.stuck_reported:
                    self._log.error("loop_stuck", loop=name, seconds_since_beat=round(status.age_seconds, 1),
                                    limit_seconds=round(status.limit_seconds, 1))
                elif history.stuck_reported and not status.stuck:
                    self._log.warning("loop_unstuck", loop=name)
                history.stuck_reported = status.stuck
                continue
            while history.deaths and history.deaths[0] < now - settings.restart_window_seconds:
                history.deaths.popleft()
            restart = self.heartbeats.restart_of(name)
            if restart is None or len(history.deaths) >= settings.max_restarts:
                reason = (f"loop {name!r} ended and cannot be restarted" if restart is None else
                          f"loop {name!r} died {len(history.deaths) + 1} times within "
                          f"{settings.restart_window_seconds:g} s")
                self._log.critical("loop_failed", loop=name, reason=reason)
                self._fatal = reason
                self._on_fatal(reason)
                return
            if history.due_at is None:
                delay = restart_delay(settings, len(history.deaths))
                history.due_at = now + delay
                self._log.error("loop_died", loop=name, restart_in_seconds=round(delay, 3),
                                restarts_in_window=len(history.deaths))
            if now < history.due_at:
                continue
            history.deaths.append(now)
            history.due_at = None
            try:
                restart()
            except Exception as exc:  # noqa: BLE001 - a failed restart counts as one more death
                self._log.error("loop_restart_failed", loop=name, error=failure(exc))
                continue
            count = self.heartbeats.restarted(name)
            self._log.warning("loop_restarted", loop=name, restarts=count)


def beat_socketserver(server: Any, beat: Callable[[], None]) -> None:
    """Make a running `socketserver` server (pynetdicom's association server is one) call ``beat`` once per turn
    of its ``serve_forever`` loop — every poll interval, 0.5 s — through its ``service_actions`` hook."""
    original = server.service_actions

    def service_actions() -> None:
        beat()
        original()

    server.service_actions = service_actions


def failure(exc: BaseException) -> str:
    """``Type at file:line in function``, plus the message for the node's and models' own errors (their messages
    are PHI-free by contract; other libraries' may quote header values)."""
    from models.errors import ModelError
    from node.errors import NodeError

    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" at {Path(last.filename).name}:{last.lineno} in {last.name}"
    text = f"{type(exc).__name__}{where}"
    if isinstance(exc, (NodeError, ModelError)):
        text += f": {exc}"
    return text[:1000]


__all__ = ["EXIT_LOOP_FAILED", "MAX_RESTART_DELAY_SECONDS", "Heartbeats", "LoopStatus", "Supervisor",
           "beat_socketserver", "failure", "restart_delay"]
