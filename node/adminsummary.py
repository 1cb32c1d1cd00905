"""What the status page shows of retention: the last dry run, computed in a background thread, never on a request.

A retention dry run walks every settled series the node ever received (seconds over a long history). The page
(`node.admin`) asks `RetentionPreview.view`, which answers at once with the last computed summary — or that none is
computed yet — and, when that summary is due for a refresh and no dry run is under way, starts one in a thread of its
own. So at most one dry run runs per process, at most once per `RetentionPreview.interval` (at least
``MIN_INTERVAL_SECONDS``, and ``DUTY_FACTOR`` times as long as the last one took, so a slow one costs at most a tenth
of a core), and no request waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.config import NodeConfig
from node.logs import get_logger

MIN_INTERVAL_SECONDS = 60.0
DUTY_FACTOR = 10.0


@dataclass(frozen=True)
class RetentionView:
    """The last dry run's summary (`PurgeReport.as_dict`) or why there is none, as of ``at`` (epoch seconds; None:
    nothing computed yet); ``running``: a dry run is under way now."""

    at: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    running: bool = False
    interval: float = MIN_INTERVAL_SECONDS  # the page says how often it is refreshed


class RetentionPreview:
    """The page's retention summary. ``dry_run(config)`` computes one (blocking; e.g. ``Retention(config,
    engine).purge(dry_run=True).as_dict()``); ``clock`` returns epoch seconds (the page's)."""

    def __init__(self, dry_run: Callable[[NodeConfig], dict[str, Any]], clock: Callable[[], float] = time.time,
                 *, min_interval: float = MIN_INTERVAL_SECONDS) -> None:
        if not callable(dry_run):
            raise TypeError(f"dry_run must be callable, not {type(dry_run).__name__}")
        if min_interval <= 0:
            raise ValueError(f"min_interval must be positive, not {min_interval!r}")
        self._dry_run = dry_run
        self._clock = clock
        self._min_interval = min_interval
        self._busy = threading.Lock()  # held by the thread computing; only ever tried without blocking
        self._view = RetentionView(interval=min_interval)
        self._started_at: float | None = None  # clock time the last dry run started
        self._took = 0.0  # seconds the last one took

    @property
    def interval(self) -> float:
        """Seconds between dry runs: ``min_interval``, or ``DUTY_FACTOR`` times the last one's duration if longer."""
        return max(self._min_interval, DUTY_FACTOR * self._took)

    def view(self, config: NodeConfig) -> RetentionView:
        """The last summary, at once; starts a dry run over ``config`` in the background when one is due (none
        yet, or the last started ``interval`` ago or longer) and none is under way. Never blocks, never raises
        for a failing dry run (its error is the next summary)."""
        if self._due() and self._busy.acquire(blocking=False):
            started = False
            try:
                if self._due():  # not if one just ended between the two looks
                    self._started_at = self._clock()
                    threading.Thread(target=self._refresh, args=(config,), name="admin-retention-dry-run",
                                     daemon=True).start()
                    started = True  # the thread releases the lock
            finally:
                if not started:
                    self._busy.release()
        view = self._view
        return RetentionView(view.at, view.report, view.error, running=self._busy.locked(), interval=self.interval)

    def _due(self) -> bool:
        started = self._started_at
        return started is None or not 0 <= self._clock() - started < self.interval

    def _refresh(self, config: NodeConfig) -> None:
        log = get_logger(component="admin")
        began = time.monotonic()
        try:
            try:
                view = RetentionView(at=self._clock(), report=self._dry_run(config))
            except Exception as exc:  # noqa: BLE001 - the page shows it; the thread must end and free the lock
                log.warning("admin_retention_dry_run_failed", error=type(exc).__name__)
                view = RetentionView(at=self._clock(), error=type(exc).__name__)
            self._view = view
        finally:
            self._took = time.monotonic() - began
            self._busy.release()
        log.debug("admin_retention_dry_run", seconds=round(self._took, 3), failed=view.error is not None)


__all__ = ["MIN_INTERVAL_SECONDS", "RetentionPreview", "RetentionView"]
