"""Prometheus metrics: one `Metrics` object per node, owning its own registry (never the global default one).

Stages report events through small methods — `instance_received`, `rejected`, `association`, `stow_request`,
`inference`, `end_to_end` — and the service binds callables (`bind(queue_depth=..., deliveries=...)`) that are
read at scrape time, so gauges show the database's state, not a copy that can drift. `render()` returns the
exposition text and its content type for ``GET /metrics``. Label values come from closed sets (SOP class and
transfer syntax keywords, else "other"), so a sender cannot grow the number of series without bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from pydicom.uid import UID

from node.logs import get_logger
from node.states import PeerRefusal

SOURCES = frozenset({"dimse", "stow"})
ASSOCIATION_EVENTS = frozenset({"accepted", "rejected", "released", "aborted"})
GUARD_SOURCES = frozenset({"dimse", "http"})

# Inference on 2 CPU cores takes seconds to minutes per series; end-to-end adds the completion wait and delivery.
INFERENCE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
END_TO_END_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, float("inf"))


JOB_OUTCOMES = frozenset({"result", "not_processed", "failed", "unreported"})


def uid_label(uid: str) -> str:
    """A bounded label for a SOP class or transfer syntax UID: its DICOM keyword when pydicom knows it, else
    "other" (private UIDs would otherwise create one series per UID a sender invents)."""
    keyword = UID(uid).keyword if uid else ""
    return keyword or "other"


def _check(value: str, allowed: frozenset[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, not {value!r}")
    return value


class _ScrapeTimeCollector:
    """Gauges read from bound callables at each scrape; a callable that fails is left out of that scrape and
    counted, so one broken source (e.g. the database) does not hide every other metric."""

    def __init__(self, on_error: Callable[[str, Exception], None]) -> None:
        self._lock = threading.Lock()
        self._on_error = on_error
        self.queue_depth: Callable[[], int] | None = None
        self.jobs: Callable[[], Mapping[str, int]] | None = None
        self.series: Callable[[], Mapping[str, int]] | None = None
        self.deliveries: Callable[[], Mapping[tuple[str, str], int]] | None = None
        self.disk: Callable[[], tuple[int, int]] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names are not reserved up front: the callables may not be bound yet

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            queue_depth, jobs, series, deliveries = self.queue_depth, self.jobs, self.series, self.deliveries
            disk = self.disk
        if queue_depth is not None:
            value = self._read("queue_depth", queue_depth)
            if value is not None:
                yield GaugeMetricFamily("pacsnode_queue_depth", "Inference jobs queued or running.", value=value)
        if jobs is not None:
            counts = self._read("jobs", jobs)
            if counts is not None:
                family = GaugeMetricFamily("pacsnode_jobs", "Inference jobs by state.", labels=["state"])
                for state, n in sorted(counts.items()):
                    family.add_metric([str(state)], n)
                yield family
        if series is not None:
            counts = self._read("series", series)
            if counts is not None:
                family = GaugeMetricFamily("pacsnode_series", "Received series by state.", labels=["state"])
                for state, n in sorted(counts.items()):
                    family.add_metric([str(state)], n)
                yield family
        if deliveries is not None:
            by_dest = self._read("deliveries", deliveries)
            if by_dest is not None:
                family = GaugeMetricFamily(
                    "pacsnode_deliveries", "Result deliveries by destination and state.", labels=["destination", "state"]
                )
                for (dest, state), n in sorted(by_dest.items()):
                    family.add_metric([str(dest), str(state)], n)
                yield family

        if disk is not None:
            usage = self._read("disk", disk)
            if usage is not None:
                used, total = usage
                yield GaugeMetricFamily("pacsnode_disk_used_bytes", "Bytes used on the data directory's file system.",
                                        value=used)
                yield GaugeMetricFamily("pacsnode_disk_total_bytes", "Size of the data directory's file system.",
                                        value=total)

    def _read(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a scrape must still answer; the failure is logged and counted
            self._on_error(name, exc)
            return None


class Metrics:
    """The node's metrics; thread-safe (prometheus_client's metric objects lock internally)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._log = get_logger(component="metrics")
        r = self.registry
        self._instances = Counter(
            "pacsnode_instances_received",
            "Instances stored durably and indexed, by SOP class, transfer syntax and front door.",
            ["sop_class", "transfer_syntax", "source"],
            registry=r,
        )
        self._bytes = Counter(
            "pacsnode_received_bytes", "Bytes of instances stored, by front door.", ["source"], registry=r
        )
        self._rejections = Counter(
            "pacsnode_rejections", "Instances refused, by reason and front door.", ["reason", "source"], registry=r
        )
        self._associations = Counter(
            "pacsnode_associations", "DIMSE associations by event.", ["event"], registry=r
        )
        self._stow_requests = Counter(
            "pacsnode_stow_requests", "STOW-RS requests by HTTP status.", ["status"], registry=r
        )
        self._peers_refused = Counter(
            "pacsnode_peers_refused",
            "Connections refused or cut off by a front door's guard, by reason (node.states.PeerRefusal) and source.",
            ["reason", "source"],
            registry=r,
        )
        self._inference = Histogram(
            "pacsnode_inference_seconds", "Model inference time per series.", buckets=INFERENCE_BUCKETS, registry=r
        )
        self._end_to_end = Histogram(
            "pacsnode_end_to_end_seconds",
            "Time from a series' last received instance to its results being delivered.",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self._routed = Counter(
            "pacsnode_series_routed",
            "Completed series by deciding route (config route name, or a built-in rule in brackets such as "
            "[own-result], [non-image], [unrouted]) and pipeline ('none' when nothing is made).",
            ["route", "pipeline"],
            registry=r,
        )
        self._outcomes = Counter(
            "pacsnode_jobs_ended",
            "Pipeline jobs ended, by pipeline and outcome (result, not_processed, failed, unreported: a dead job "
            "whose 'processing failed' report could not be built either; alert on it).",
            ["pipeline", "outcome"],
            registry=r,
        )
        self._gauges = _ScrapeTimeCollector(self._source_failed)
        r.register(self._gauges)
        # Registered after the gauges, so a scrape that hits a failing source already reports it.
        self._scrape_errors = Counter(
            "pacsnode_metrics_source_errors", "Scrape-time gauge sources that failed, by source.", ["source"], registry=r
        )

    # -- bindings (the service calls this once stages exist) ------------------------------------------------
    def bind(
        self,
        *,
        queue_depth: Callable[[], int] | None = None,
        jobs: Callable[[], Mapping[str, int]] | None = None,
        series: Callable[[], Mapping[str, int]] | None = None,
        deliveries: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        disk: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        """Set the callables read at scrape time (e.g. ``JobQueue.depth``, ``JobQueue.counts``,
        ``Index.series_counts``, ``Dispatcher.counts``, ``(used, total)`` bytes of the data disk); arguments left out
        keep their current binding."""
        with self._gauges._lock:
            for name, fn in (("queue_depth", queue_depth), ("jobs", jobs), ("series", series), ("deliveries", deliveries),
                             ("disk", disk)):
                if fn is not None:
                    if not callable(fn):
                        raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
                    setattr(self._gauges, name, fn)

    # -- events ---------------------------------------------------------------------------------------------
    def instance_received(self, sop_class: str, transfer_syntax: str, size: int, source: str) -> None:
        """One instance stored durably. ``source`` is "dimse" or "stow"; ``size`` in bytes as received."""
        _check(source, SOURCES, "source")
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        self._instances.labels(uid_label(sop_class), uid_label(transfer_syntax), source).inc()
        self._bytes.labels(source).inc(size)

    def rejected(self, reason: str, source: str) -> None:
        """One instance refused. ``reason`` must come from a closed set (an error class name such as
        ``InvalidDatasetError``, or a status like ``0xA900``), never from the data."""
        _check(source, SOURCES, "source")
        if not reason:
            raise ValueError("reason must not be empty")
        self._rejections.labels(reason, source).inc()

    def association(self, event: str) -> None:
        """A DIMSE association was accepted, rejected, released or aborted."""
        self._associations.labels(_check(event, ASSOCIATION_EVENTS, "event")).inc()

    def stow_request(self, status: int) -> None:
        """One STOW-RS request answered with HTTP ``status``."""
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {status}")
        self._stow_requests.labels(str(status)).inc()

    def peer_refused(self, reason: str, source: str) -> None:
        """One connection refused or cut off (``reason`` a `node.states.PeerRefusal` value; "dimse" or "http")."""
        self._peers_refused.labels(str(PeerRefusal(reason)), _check(source, GUARD_SOURCES, "source")).inc()

    def series_routed(self, route: str, pipeline: str) -> None:
        """One completed series decided by ``route`` (a config route name or a built-in label)."""
        self._routed.labels(route, pipeline).inc()

    def job_ended(self, pipeline: str, outcome: str) -> None:
        """One job ended; ``outcome`` is one of `JOB_OUTCOMES`."""
        self._outcomes.labels(pipeline, _check(outcome, JOB_OUTCOMES, "outcome")).inc()

    def inference(self, seconds: float) -> None:
        """Model inference time for one series."""
        self._inference.observe(_seconds(seconds))

    def end_to_end(self, seconds: float) -> None:
        """Last instance of a series received → its results delivered."""
        self._end_to_end.observe(_seconds(seconds))

    observe_end_to_end = end_to_end

    # -- exposition -----------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _source_failed(self, name: str, exc: Exception) -> None:
        self._scrape_errors.labels(name).inc()
        self._log.warning("metrics_source_failed", source=name, error=type(exc).__name__)


def _seconds(value: float) -> float:
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"seconds must be >= 0, not {value}")
    return float(value)
