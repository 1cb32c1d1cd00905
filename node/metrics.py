"""Prometheus metrics: one `Metrics` object per node, owning its own registry (never the global default one).

Stages report events through small methods — `instance_received`, `rejected`, `association`, `stow_request`,
`inference`, `end_to_end` — and the service binds callables (`bind(queue_depth=..., deliveries=...)`) that are
read at scrape time, so gauges show the database's state, not a copy that can drift. `render()` returns the
exposition text and its content type for ``GET /metrics``. Label values come from closed sets (SOP class and
transfer syntax keywords, else "other"), so a sender cannot grow the number of series without bound.

Under the processes model (node.processes) each role is its own process, so one process's counters would miss
what the others counted. The supervisor gives every child ``PROMETHEUS_MULTIPROC_DIR`` (`MULTIPROC_ENV`, a fresh
``<data_dir>/metrics`` per supervisor start), where prometheus_client keeps each process's values in memory-mapped
files; `render()` then merges them (prometheus_client's `MultiProcessCollector`: counters and histograms summed over
every process that ran since the start, the device gauges the highest among live processes) and adds the
scrape-time gauges, which read the shared database and so are the same whichever listener answers.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from pydicom.uid import UID

from node.logs import get_logger, on_dropped_line
from node.states import AdmissionReason, PeerRefusal

SOURCES = frozenset({"dimse", "stow"})
ASSOCIATION_EVENTS = frozenset({"accepted", "rejected", "released", "aborted"})
GUARD_SOURCES = frozenset({"dimse", "http"})
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set (by node.processes) before prometheus_client is imported

# Inference on 2 CPU cores takes seconds to minutes per series; end-to-end adds the completion wait and delivery.
INFERENCE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
END_TO_END_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, float("inf"))


AUDIT_SINKS = frozenset({"file", "syslog"})
JOB_OUTCOMES = frozenset({"result", "not_processed", "failed", "unreported", "superseded", "deferred"})
INFERENCE_DEVICES = frozenset({"cpu", "gpu"})
DEVICE_REQUESTS = frozenset({"auto", "cpu", "gpu"})


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
        self.disk: Callable[[], Mapping[str, tuple[int, int]]] | None = None
        self.destination_up: Callable[[], Mapping[str, bool]] | None = None
        self.uncommitted: Callable[[], Mapping[str, int]] | None = None
        self.clock_skew: Callable[[], float | None] | None = None
        self.certificate_expiry: Callable[[], Mapping[str, float]] | None = None
        self.crl_next_update: Callable[[], Mapping[str, float]] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names are not reserved up front: the callables may not be bound yet

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            queue_depth, jobs, series, deliveries = self.queue_depth, self.jobs, self.series, self.deliveries
            disk = self.disk
            destination_up, uncommitted, clock_skew = self.destination_up, self.uncommitted, self.clock_skew
            certificate_expiry, crl_next_update = self.certificate_expiry, self.crl_next_update
        if queue_depth is not None:
            value = self._read("queue_depth", queue_depth)
            if value is not None:
                yield GaugeMetricFamily("pacsnode_queue_depth", "Inference jobs queued or running.", value=value)
        yield from self._by_state("jobs", jobs, "pacsnode_jobs", "Inference jobs by state.")
        yield from self._by_state("series", series, "pacsnode_series", "Received series by state.")
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
            if usage:
                used = GaugeMetricFamily("pacsnode_disk_used_bytes", "Bytes used on each file system the node writes "
                                         "to, by the first of its folders there (node.disks).", labels=["path"])
                total = GaugeMetricFamily("pacsnode_disk_total_bytes", "Size of each file system the node writes to.",
                                          labels=["path"])
                for path, (n_used, n_total) in sorted(usage.items()):
                    used.add_metric([path], n_used)
                    total.add_metric([path], n_total)
                yield used
                yield total
        yield from self._per_destination("destination_up", destination_up, "pacsnode_destination_up",
                                         "1 when the destination answered its last check (C-ECHO / HTTP), else 0.")
        yield from self._per_destination("uncommitted", uncommitted, "pacsnode_deliveries_uncommitted",
                                         "Delivered result sets the destination has not (yet) committed to holding.")
        yield from self._tls(certificate_expiry, crl_next_update)
        skew = self._read("clock_skew", clock_skew) if clock_skew is not None else None
        if skew is not None:
            yield GaugeMetricFamily("pacsnode_clock_skew_seconds", "This host's clock minus the database server's "
                                    "(PostgreSQL): hosts sharing a database must agree on the time.", value=skew)

    def _tls(self, certificate_expiry: Callable[[], Mapping[str, float]] | None,
             crl_next_update: Callable[[], Mapping[str, float]] | None) -> Iterable[Metric]:
        expiry = self._read("certificate_expiry", certificate_expiry) if certificate_expiry is not None else None
        if expiry:
            family = GaugeMetricFamily("pacsnode_tls_certificate_expiry_seconds", "Seconds until a certificate the "
                                       "node presents expires (negative: expired).", labels=["certificate"])
            for name, left in sorted(expiry.items()):
                family.add_metric([name], max(left, -1e12))  # not yet valid (-inf): as expired
            yield family
        crls = self._read("crl_next_update", crl_next_update) if crl_next_update is not None else None
        if crls:
            family = GaugeMetricFamily("pacsnode_tls_crl_next_update_seconds", "Seconds until a CRL in [tls] crl_file "
                                       "passes its next update (negative: past it, and every client certificate of "
                                       "its CA is refused).", labels=["issuer"])
            for issuer, left in sorted(crls.items()):
                family.add_metric([issuer], left)
            yield family

    def _by_state(self, name: str, fn: Callable[[], Mapping[Any, int]] | None, metric: str,
                  doc: str) -> Iterable[Metric]:
        if fn is None:
            return
        counts = self._read(name, fn)
        if counts is not None:
            family = GaugeMetricFamily(metric, doc, labels=["state"])
            for state, n in sorted(counts.items()):
                family.add_metric([str(state)], n)
            yield family

    def _per_destination(self, name: str, fn: Callable[[], Mapping[str, Any]] | None, metric: str,
                         doc: str) -> Iterable[Metric]:
        if fn is None:
            return
        values = self._read(name, fn)
        if values is not None:
            family = GaugeMetricFamily(metric, doc, labels=["destination"])
            for dest, value in sorted(values.items()):
                family.add_metric([str(dest)], float(value))
            yield family

    def _read(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer; the failure is logged and counted
            self._on_error(name, exc)
            return None


class _AdmissionCollector:
    """``pacsnode_admission_paused{reason}`` read at scrape time; a failing source is left out and counted."""

    def __init__(self, paused: Callable[[], Mapping[str, bool]], on_error: Callable[[str, Exception], None]) -> None:
        self._paused = paused
        self._on_error = on_error

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            paused = self._paused()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer
            self._on_error("admission", exc)
            return
        family = GaugeMetricFamily("pacsnode_admission_paused",
                                   "1 while admission control refuses data for this reason.", labels=["reason"])
        for reason, on in sorted(paused.items()):
            family.add_metric([reason], 1 if on else 0)
        yield family


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
            "whose 'processing failed' report could not be built either; alert on it; superseded: a newer version "
            "of the series exists, nothing sent; deferred: the results disk was full, the job waits, its attempt "
            "not counted).",
            ["pipeline", "outcome"],
            registry=r,
        )
        self._auth_failures = Counter(
            "pacsnode_auth_failures", "HTTP requests refused 401, by surface (dicomweb, admin, metrics) and reason.",
            ["surface", "reason"], registry=r,
        )
        self._audit_failures = Counter(
            "pacsnode_audit_failures", "Audit records that could not be written, by sink (file, syslog).",
            ["sink"], registry=r,
        )
        on_dropped_line(Counter(
            "pacsnode_log_lines_dropped", "Log lines dropped because the log stream failed (full disk, closed pipe).",
            registry=r).inc)
        self._admission_refused = Counter(
            "pacsnode_admission_refused",
            "Refused by admission control, by reason (disk_floor, queue_ceiling, disk_reserve) and front door: "
            "instances, and STOW-RS requests refused whole before their body was read.",
            ["reason", "front_door"],
            registry=r,
        )
        self._device, self._gpu_fallback = _device_gauges(r)
        self._gauges = _ScrapeTimeCollector(self._source_failed)
        r.register(self._gauges)
        self._scrape_time: list[Any] = [self._gauges]  # collectors reading shared state at each scrape
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
        disk: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
        destination_up: Callable[[], Mapping[str, bool]] | None = None,
        uncommitted: Callable[[], Mapping[str, int]] | None = None,
        clock_skew: Callable[[], float | None] | None = None,
        certificate_expiry: Callable[[], Mapping[str, float]] | None = None,
        crl_next_update: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        """Set the callables read at scrape time (e.g. ``JobQueue.depth``, ``JobQueue.counts``,
        ``Index.series_counts``, ``Dispatcher.counts``, ``{path: (used, total)}`` bytes of each file system the node
        writes to, `node.disks.used_by_path`); arguments left out
        keep their current binding."""
        with self._gauges._lock:
            for name, fn in (("queue_depth", queue_depth), ("jobs", jobs), ("series", series), ("deliveries", deliveries),
                             ("disk", disk), ("destination_up", destination_up), ("uncommitted", uncommitted),
                             ("clock_skew", clock_skew), ("certificate_expiry", certificate_expiry),
                             ("crl_next_update", crl_next_update)):
                if fn is not None:
                    if not callable(fn):
                        raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
                    setattr(self._gauges, name, fn)

    def bind_admission(self, paused: Callable[[], Mapping[str, bool]]) -> None:
        """Serve ``pacsnode_admission_paused{reason}`` (1 while that reason pauses admission) from ``paused``,
        read at scrape time (`Admission.paused_by_reason`)."""
        if not callable(paused):
            raise TypeError(f"paused must be callable, not {type(paused).__name__}")
        collector = _AdmissionCollector(paused, self._source_failed)
        self._scrape_time.append(collector)
        self.registry.register(collector)

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

    def admission_refused(self, reason: str, front_door: str) -> None:
        """One instance (or a whole STOW-RS request) refused by admission control; ``reason`` an
        `AdmissionReason` value, ``front_door`` "dimse" or "stow"."""
        self._admission_refused.labels(AdmissionReason(reason).value, _check(front_door, SOURCES, "front_door")).inc()

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

    def inference_device(self, device: str, requested: str, mixed_precision: bool, fell_back: bool) -> None:
        """The device the models run on (node.device.announce), replacing what was set before."""
        for labels in list(self._device._metrics):  # kept in the shared files under the processes model: zeroed
            self._device.labels(*labels).set(0)
        with warnings.catch_warnings():  # under the processes model prometheus_client warns that clear() leaves the
            warnings.filterwarnings("ignore", "Clearing labels", UserWarning)  # shared files: zeroed just above
            self._device.clear()
        self._device.labels(_check(device, INFERENCE_DEVICES, "device"), _check(requested, DEVICE_REQUESTS, "requested"),
                            str(mixed_precision).lower()).set(1)
        self._gpu_fallback.set(1 if fell_back else 0)

    def end_to_end(self, seconds: float) -> None:
        """Last instance of a series received → its results delivered."""
        self._end_to_end.observe(_seconds(seconds))

    observe_end_to_end = end_to_end

    def auth_failure(self, surface: str, reason: str) -> None:
        """One HTTP request refused 401; both labels come from closed sets (node.auth)."""
        self._auth_failures.labels(surface, reason).inc()

    def audit_failure(self, sink: str) -> None:
        """One audit record lost by ``sink`` ("file" or "syslog")."""
        self._audit_failures.labels(_check(sink, AUDIT_SINKS, "sink")).inc()

    # -- exposition -----------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type; every process's values merged
        under the processes model (module docstring)."""
        shared = os.environ.get(MULTIPROC_ENV)
        if not shared:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        for collector in self._scrape_time:  # first, so a source failing in this scrape is counted in it
            merged.register(collector)
        merged.register(MultiProcessCollector(None, path=shared))
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def _source_failed(self, name: str, exc: Exception) -> None:
        self._scrape_errors.labels(name).inc()
        self._log.warning("metrics_source_failed", source=name, error=type(exc).__name__)


def _device_gauges(r: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """The inference device gauges (node.device): which device, and whether a requested GPU fell back to the CPU."""
    device = Gauge(
        "pacsnode_inference_device", "1 for the device the models run on (device: cpu|gpu; requested: "
        "[worker] device; mixed_precision: true|false); set once the worker has loaded them.",
        ["device", "requested", "mixed_precision"], registry=r, multiprocess_mode="livemax",
    )
    fallback = Gauge(
        "pacsnode_inference_gpu_fallback",
        "1 when [worker] device = 'gpu' but no GPU could be used, so the models run on the CPU; alert on it.",
        registry=r, multiprocess_mode="livemax",
    )
    return device, fallback


def _seconds(value: float) -> float:
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"seconds must be >= 0, not {value}")
    return float(value)
