"""Refused and cut-off peers: one counter per reason, and log events rate-limited per peer address.

A hostile peer can make the node refuse or abort it thousands of times a second (a connection flood, a loop of
oversized PDUs, slowloris HTTP). Each refusal is counted in the metrics (``pacsnode_peers_refused``), but only the
first `LOG_BURST` events of one kind from one address within `LOG_WINDOW_SECONDS` are logged; after that the
events are only counted, and the next event once the window has passed first logs ``peer_refusals_suppressed``
with how many were left out. At most `MAX_TRACKED_PEERS` (address, event) pairs are remembered (least recently
seen forgotten first), so an attacker with many addresses cannot grow this table without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.logs import get_logger
from node.metrics import Metrics
from node.states import PeerRefusal

LOG_BURST = 5
LOG_WINDOW_SECONDS = 60.0
MAX_TRACKED_PEERS = 4096


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class Refusals:
    """Records refusals for one front door (``source`` "dimse" or "http"); thread-safe."""

    def __init__(
        self,
        source: str,
        metrics: Metrics | None = None,
        *,
        burst: int = LOG_BURST,
        window_seconds: float = LOG_WINDOW_SECONDS,
        max_peers: int = MAX_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_seconds <= 0 or max_peers < 1:
            raise ValueError(
                f"burst and max_peers must be >= 1 and window_seconds > 0, not {burst}, {max_peers}, {window_seconds}"
            )
        self.source = source
        self.metrics = metrics
        self.burst = burst
        self.window_seconds = window_seconds
        self.max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, PeerRefusal], _Window] = OrderedDict()
        self._log = get_logger(component=f"{source}_guard")

    def record(self, reason: PeerRefusal, peer: str, port: int | None = None, **context: Any) -> bool:
        """Count one refusal of ``peer`` (an address, without the port) and log it as event ``reason`` unless that
        peer's burst for this reason is used up. Returns whether it was logged."""
        return self.record_counted(reason, peer, port, **context)[0]

    def record_counted(self, reason: PeerRefusal, peer: str, port: int | None = None,
                       **context: Any) -> tuple[bool, int]:
        """`record`, also returning how many of the peer's refusals for this reason the window before left out
        (logged now as ``peer_refusals_suppressed``): what the audit trail records one by one follows the log
        (node.dimse, node.acceptor), so a flood of refusals cannot grow the trail without bound either."""
        if self.metrics is not None:
            self.metrics.peer_refused(str(reason), self.source)
        now = self._clock()
        key = (peer, reason)
        summary = 0
        with self._lock:
            window = self._windows.pop(key, None)
            if window is None or now - window.started >= self.window_seconds:
                summary = window.suppressed if window is not None else 0
                window = _Window(started=now)
            self._windows[key] = window  # most recently seen last
            while len(self._windows) > self.max_peers:
                self._windows.popitem(last=False)
            log_it = window.logged < self.burst
            if log_it:
                window.logged += 1
            else:
                window.suppressed += 1
        if summary:
            self._log.warning(
                "peer_refusals_suppressed", peer=peer, reason=str(reason), count=summary,
                window_seconds=self.window_seconds,
            )
        if log_it:
            where = f"{peer}:{port}" if port is not None else peer
            self._log.warning(str(reason), peer=where, **context)
        return log_it, summary


__all__ = ["LOG_BURST", "LOG_WINDOW_SECONDS", "MAX_TRACKED_PEERS", "Refusals"]
