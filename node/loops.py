"""The thread plumbing of a supervised background loop, shared by the node's own loops (commitment, reachability,
retention, the inference worker): a daemon thread under a fixed name, its registration with
`node.supervise.Heartbeats` (period, liveness, how the `Supervisor` restarts it), the stop and wake events, its
beats, and the back-off after failed turns.

What a loop does in one turn stays in its own module; `LoopThread` holds only what each of them repeated. Stopping
unregisters the loop first, so the supervisor never counts a loop stopped on purpose as dead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LoopThread:
    """Runs ``target`` (the loop body) in a daemon thread named ``thread_name``, supervised as ``loop`` in
    ``heartbeats`` (a `node.supervise.Heartbeats`).

    The body runs ``while not stopping.is_set()``, beats with `beat` and waits on ``wake`` (cut short by whoever
    has new work, and by `stop`) or with `sleep` (cut short only by `stop`)."""

    def __init__(self, heartbeats: Any, loop: str, thread_name: str, target: Callable[[], None]) -> None:
        if not loop or not thread_name:
            raise ValueError(f"a loop needs a loop name and a thread name, not {loop!r}, {thread_name!r}")
        self.heartbeats = heartbeats
        self.loop = loop
        self.thread_name = thread_name
        self.target = target
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, period: float, restart: Callable[[], None]) -> None:
        """Start a thread, then supervise it with ``period`` (`Heartbeats.register`); the supervisor calls
        ``restart`` once the thread has died."""
        self.stopping.clear()
        self.spawn()
        self.supervise(period, restart)

    def spawn(self) -> None:
        """Start a new thread running the body."""
        self._thread = threading.Thread(target=self.target, name=self.thread_name, daemon=True)
        self._thread.start()

    def respawn(self) -> None:
        """Start the thread again unless it runs or the loop was stopped (a restart that may race `stop`)."""
        if self.alive() or self.stopping.is_set():
            return
        self.spawn()

    def supervise(self, period: float, restart: Callable[[], None]) -> None:
        """Register with the heartbeats: beats expected every ``period`` s; ``restart`` revives a dead thread."""
        self.heartbeats.register(self.loop, period, alive=self.alive, restart=restart)

    def stop(self, timeout: float) -> None:
        """Unregister, ask the body to end, wake it, and wait up to ``timeout`` s for the thread."""
        self.heartbeats.unregister(self.loop)
        self.stopping.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def beat(self, busy_for: float = 0.0) -> None:
        """The loop is making progress; ``busy_for``: its next beat may take up to that many seconds."""
        self.heartbeats.beat(self.loop, busy_for=busy_for)

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until `stop`; True when stopped."""
        return self.stopping.wait(seconds)


def backoff_seconds(period: float, failures: int, cap: float) -> float:
    """The wait after ``failures`` turns in a row failed: ``period`` when none or one did, doubled for each
    further one, at most ``cap``."""
    return min(cap, period * 2.0 ** max(0, failures - 1))


__all__ = ["LoopThread", "backoff_seconds"]
