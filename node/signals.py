"""Process signals of ``pacsnode serve``: the two-stage stop and SIGHUP's reload, one implementation for the
one-process node (`node.service.Service`) and the supervisor of role processes (`node.processes.ProcessSupervisor`).

`StopSignals(...).install()` (from the main thread): the first SIGINT/SIGTERM logs ``shutting_down`` and sets the
owner's ``stop`` event, so its main loop stops the stages in order; a second logs ``forced_exit``, runs
``on_force`` (the supervisor kills its children), removes the pid file and ends the process with status 130:
through ``force_exit`` when given (`node.service.exit_now`, at once: a raised ``SystemExit`` made the interpreter
wait for pynetdicom's non-daemon DUL threads, so an idle association held the one-process node up to its network
timeout), else by raising ``SystemExit(130)``. SIGHUP runs ``reload`` in a ``config-reload`` thread — not in the handler itself: reload takes locks that the interrupted
thread may hold.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any


class StopSignals:
    """The handlers of one process; ``log`` is its structlog logger."""

    def __init__(self, log: Any, stop: threading.Event, pid_file: Path, reload: Callable[[], object], *,
                 on_force: Callable[[], None] | None = None,
                 force_exit: Callable[[int], object] | None = None) -> None:
        self._log = log
        self._stop = stop
        self._pid_file = pid_file
        self._reload = reload
        self._on_force = on_force
        self._force_exit = force_exit
        self._signals = 0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        # A role child starts with SIGHUP blocked (node.processes: its default action would end a child that is
        # still starting when a reload is forwarded); one that arrived meanwhile is delivered now, to this handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            self._log.warning("forced_exit", signal=signal.Signals(signum).name)
            if self._on_force is not None:
                self._on_force()
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()
            if self._force_exit is not None:
                self._force_exit(130)
            raise SystemExit(130)
        self._log.info("shutting_down", signal=signal.Signals(signum).name)
        self._stop.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=self._reload, name="config-reload", daemon=True).start()


__all__ = ["StopSignals"]
