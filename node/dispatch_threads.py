"""The dispatcher's threads: one supervised sending thread per destination and the dead-letter sweep.

`DispatchThreads` runs what `node.dispatch.Dispatcher` gives it — ``drain(destination, stop, beat)`` (send that
destination's due rows) and ``sweep()`` (dead-letter rows past their give-up time) — in loops that beat the
heartbeat registry (``dispatch:<destination>``, ``dispatch-sweep``), wait for a wake-up or the poll between turns,
and outlive any one failure (a database failure is logged and retried with a growing pause; a row a thread held is
reclaimed when its lease expires). The supervisor restarts a thread that ended. No delivery state is written here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from node.config import NodeConfig
from node.supervise import Heartbeats, failure

_MAX_ERROR_BACKOFF = 30.0  # seconds between a loop's turns while every turn fails (e.g. the database is down)
SWEEP_LOOP = "dispatch-sweep"  # loop names in the heartbeat registry; a destination's is "dispatch:<name>"

Drain = Callable[[str, threading.Event, Callable[[float], None]], int]


def loop_name(destination: str) -> str:
    return f"dispatch:{destination}"


@dataclass
class _DestinationThread:
    """One destination's delivery thread and the events that wake and stop it."""

    name: str
    thread: threading.Thread | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


def _running(worker: _DestinationThread) -> bool:
    return worker.thread is not None and worker.thread.is_alive()


def pause_after(period: float, errors: int) -> float:
    """The wait before a loop's next turn: its period, doubling with each further failed turn (at most 30 s)."""
    return min(_MAX_ERROR_BACKOFF, period * 2.0 ** max(0, errors - 1))


class DispatchThreads:
    """The threads of one dispatcher; ``stopping`` is the dispatcher's own stop event (set by `stop`)."""

    def __init__(self, drain: Drain, sweep: Callable[[], int], heartbeats: Heartbeats, stopping: threading.Event,
                 log: Any) -> None:
        self._drain = drain
        self._sweep = sweep
        self._heartbeats = heartbeats
        self._stopping = stopping
        self._log = log
        self._config: NodeConfig | None = None
        self._lock = threading.Lock()  # start/stop/sync and the thread set
        self._workers: dict[str, _DestinationThread] = {}
        self._sweeper: threading.Thread | None = None
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def start(self, config: NodeConfig) -> list[str]:
        """One thread per destination of ``config`` and the sweeper; returns the destinations' names."""
        with self._lock:
            if self._running:
                raise RuntimeError("the dispatcher is already running")
            self._running = True
            self._stopping.clear()
            self._config = config
            self._sync()
            self._heartbeats.register(SWEEP_LOOP, self._sweep_period(), alive=self._sweeper_alive,
                                      restart=self._revive_sweeper)
            self._start_sweeper()
            return sorted(self._workers)

    def apply_config(self, config: NodeConfig) -> None:
        """Threads for the destinations of a reloaded config (new ones started, removed ones stopped)."""
        with self._lock:
            self._config = config
            if self._running:
                self._sync()

    def wake(self) -> None:
        """Look for due work now instead of at the next poll."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.wake.set()

    def stop(self, timeout: float) -> bool:
        """Stop claiming, let each thread finish the delivery it holds, wait up to ``timeout`` seconds; returns
        whether every thread ended."""
        with self._lock:
            if not self._running:
                return True
            self._running = False
            self._stopping.set()
            workers = list(self._workers.values())
            for name in [*self._workers, None]:
                self._heartbeats.unregister(SWEEP_LOOP if name is None else loop_name(name))
            self._workers.clear()
            threads = [w.thread for w in workers if w.thread is not None]
            if self._sweeper is not None:
                threads.append(self._sweeper)
                self._sweeper = None
        for worker in workers:
            worker.stop.set()
            worker.wake.set()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in threads if t.is_alive()]
        self._log.info("dispatch_stopped", unfinished=unfinished)
        return not unfinished

    # -- threads ------------------------------------------------------------------------------------------------
    def _poll(self) -> float:
        assert self._config is not None
        return self._config.dispatch.poll_seconds

    def _sweep_period(self) -> float:
        return max(1.0, self._poll())

    def _sync(self) -> None:
        """Threads for the configured destinations (caller holds ``_lock``)."""
        assert self._config is not None
        wanted = [x.name for x in self._config.destinations]
        for name in set(self._workers) - set(wanted):
            self._heartbeats.unregister(loop_name(name))
            worker = self._workers.pop(name)
            worker.stop.set()
            worker.wake.set()
        for name in wanted:
            if name not in self._workers:
                worker = _DestinationThread(name)
                self._workers[name] = worker
                self._heartbeats.register(
                    loop_name(name), self._poll(),
                    alive=partial(_running, worker), restart=partial(self._revive, name),
                )
                self._start_worker(worker)

    def _start_worker(self, worker: _DestinationThread) -> None:
        """(Caller holds ``_lock``.)"""
        worker.thread = threading.Thread(
            target=self._worker_loop, args=(worker,), name=f"pacsnode-dispatch-{worker.name}", daemon=True
        )
        worker.thread.start()

    def _start_sweeper(self) -> None:
        """(Caller holds ``_lock``.)"""
        self._sweeper = threading.Thread(target=self._sweep_loop, name="pacsnode-dispatch-sweep", daemon=True)
        self._sweeper.start()

    def _sweeper_alive(self) -> bool:
        sweeper = self._sweeper
        return sweeper is not None and sweeper.is_alive()

    def _revive_sweeper(self) -> None:
        """The supervisor's restart: a new sweep thread if the dispatcher runs and the old one ended."""
        with self._lock:
            if self._running and not self._sweeper_alive():
                self._start_sweeper()

    def _revive(self, name: str) -> None:
        """The supervisor's restart: a new thread for destination ``name`` if its old one ended."""
        with self._lock:
            worker = self._workers.get(name)
            if self._running and worker is not None and not _running(worker):
                self._start_worker(worker)

    def _worker_loop(self, worker: _DestinationThread) -> None:
        """Drain the destination, wait for a wake-up or the poll; no exception ends it (a failed send is the row's
        outcome; a database failure is logged and retried with a growing pause)."""
        loop = loop_name(worker.name)
        errors = 0
        while not (worker.stop.is_set() or self._stopping.is_set()):
            self._heartbeats.beat(loop)
            worker.wake.clear()
            try:
                self._drain(worker.name, worker.stop, lambda seconds: self._heartbeats.beat(loop, busy_for=seconds))
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure, see the docstring
                errors += 1
                self._log.error("dispatch_loop_error", destination=worker.name, error=failure(exc),
                                consecutive_errors=errors)
            wait = pause_after(self._poll(), errors)
            self._heartbeats.beat(loop, busy_for=wait)
            worker.wake.wait(wait)

    def _sweep_loop(self) -> None:
        """Dead-letter expired rows every poll; no exception ends it."""
        errors = 0
        while not self._stopping.is_set():
            self._heartbeats.beat(SWEEP_LOOP)
            try:
                self._sweep()
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
                errors += 1
                self._log.error("dispatch_sweep_error", error=failure(exc), consecutive_errors=errors)
            wait = pause_after(self._sweep_period(), errors)
            self._heartbeats.beat(SWEEP_LOOP, busy_for=wait)
            self._stopping.wait(wait)
