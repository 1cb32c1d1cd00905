"""The config sections of the stages and loops: completion, gate, queue, worker, dispatch, retention, supervision,
destination checks, audit, admission, database."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from node.config.base import AETitle, Port, _Frozen
from node.config.routes import PriorityRule
from node.states import InferenceDevice


class CompletionMode(StrEnum):
    """How the node decides that a sender has finished a series."""

    QUIET = "quiet"  # no new instance for stable_seconds (or the expected count reached)
    RELEASE = "release"  # also: the association that sent an evenly spaced stack was released normally


class SenderProfile(_Frozen):
    """Completion settings for one calling AE (a scanner, a PACS forwarding studies)."""

    calling_ae: AETitle
    mode: CompletionMode = CompletionMode.QUIET
    stable_seconds: Annotated[float, Field(gt=0, le=86400)] | None = None  # None: [completion] stable_seconds
    release_grace_seconds: Annotated[float, Field(ge=0, le=600)] | None = None


class CompletionSection(_Frozen):
    stable_seconds: Annotated[float, Field(gt=0, le=86400)] = 30.0
    sweep_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    early: bool = True  # complete before the quiet timer when the series shows it is whole (expected count, etc.)
    mode: CompletionMode = CompletionMode.QUIET  # for calling AEs without a profile in `senders`
    release_grace_seconds: Annotated[float, Field(ge=0, le=600)] = 1.0
    # A known expected count (ImagesInAcquisition) not yet reached holds completion back this long after the last
    # instance; then the series completes and the gate refuses it as incomplete.
    expected_count_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    senders: tuple[SenderProfile, ...] = ()

    @model_validator(mode="after")
    def _unique_senders(self) -> CompletionSection:
        aes = [s.calling_ae for s in self.senders]
        dupes = sorted({a for a in aes if aes.count(a) > 1})
        if dupes:
            raise ValueError(f"one sender profile per calling AE: {', '.join(dupes)}")
        return self

    def profile(self, calling_ae: str | None) -> tuple[CompletionMode, float, float]:
        """(mode, stable_seconds, release_grace_seconds) for series from ``calling_ae``."""
        for sender in self.senders:
            if sender.calling_ae == calling_ae:
                return (
                    sender.mode,
                    sender.stable_seconds if sender.stable_seconds is not None else self.stable_seconds,
                    sender.release_grace_seconds
                    if sender.release_grace_seconds is not None
                    else self.release_grace_seconds,
                )
        return self.mode, self.stable_seconds, self.release_grace_seconds


class GateSection(_Frozen):
    modalities: tuple[str, ...] = ("CT",)
    min_slices: Annotated[int, Field(ge=2)] = 16
    spacing_tolerance_mm: Annotated[float, Field(gt=0)] = 0.05
    max_tilt_degrees: Annotated[float, Field(ge=0, le=45)] = 0.5  # slices sheared more than this are refused
    scope_check: bool = True  # image-based "is this a chest CT the model can judge?" before any verdict
    refuse_contrast: bool = True  # contrast named in the header, or (scope_check) seen in the image: never trained on
    # slices x rows x columns, in millions, above which a series is refused before it is loaded: the worker peaks at
    # ~13.4 bytes per voxel over the loaded models (measured: 600 x 512^2 slices +2.0 GB), so 400 is ~5.4 GB
    max_series_megavoxels: Annotated[float, Field(gt=0)] = 400.0


class QueueSection(_Frozen):
    lease_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_delay_seconds: Annotated[float, Field(ge=0, le=86400)] = 10.0
    # An attempt still running this long is taken for hung (a hard-mounted NFS spool that stopped answering, a GPU
    # hang): its lease is no longer renewed, so another worker takes the job (node.worker, job_overran). Generous:
    # the largest series the gate admits (max_series_megavoxels) takes minutes on a CPU.
    attempt_limit_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0
    priority_rules: tuple[PriorityRule, ...] = ()

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> QueueSection:
        if self.heartbeat_seconds > self.lease_seconds / 2:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of lease_seconds "
                f"({self.lease_seconds:g}): a lease that ends before the next heartbeat renews it lets another "
                "worker claim the running job, which then runs twice and spends an attempt")
        if self.attempt_limit_seconds < self.lease_seconds:
            raise ValueError(f"attempt_limit_seconds ({self.attempt_limit_seconds:g}) must be at least lease_seconds "
                             f"({self.lease_seconds:g})")
        return self


class WorkerSection(_Frozen):
    enabled: bool = True
    classifier_version: str | None = None  # None: the newest shipped version
    segmenter_version: str | None = None
    weights_dir: Path | None = None  # None: the weights shipped in models/weights
    device: InferenceDevice = InferenceDevice.AUTO  # where the models run (models.device; restart to change)
    gpu_index: Annotated[int, Field(ge=0, le=64)] | None = None  # which visible GPU; None: the first
    mixed_precision: bool = False  # float16 compute on a GPU (within models.device.Tolerance); ignored on a CPU
    # streaming inference: per-slice work while a series arrives (node.prefetch); None: on when the worker has its
    # own process ([node] process_model = "processes"), off in the threads model (it would share the receive's GIL)
    prefetch: bool | None = None
    prefetch_max_series: Annotated[int, Field(ge=1, le=64)] = 2  # series whose per-slice work is kept (LRU)
    prefetch_max_mb: Annotated[int, Field(ge=1)] = 1024  # no more prefetching while the cache holds this much
    prefetch_poll_seconds: Annotated[float, Field(gt=0, le=60)] = 0.25  # how often it looks for new instances
    # freed memory the worker's process keeps for the next series instead of returning it (node.heap); 0: glibc's
    retain_heap_mb: Annotated[int, Field(ge=0, le=2047)] = 1024


class DispatchSection(_Frozen):
    initial_backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 2.0
    max_backoff_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    give_up_after_seconds: Annotated[float, Field(gt=0)] = 86400.0
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0


class RetentionSection(_Frozen):
    """How long files stay after they have served their purpose (0 = forever); see `node.retention`."""

    instances_days: Annotated[float, Field(ge=0)] = 7.0  # received instances, after the series settled
    results_days: Annotated[float, Field(ge=0)] = 30.0  # SR/SEG/KOS files, after delivery
    dead_letter_days: Annotated[float, Field(ge=0)] = 30.0  # series with a dead job or delivery
    max_disk_percent: Annotated[float, Field(gt=0, le=100)] | None = 90.0  # then oldest settled first
    interval_minutes: Annotated[float, Field(gt=0, le=1440)] = 60.0  # how often the node purges


class SuperviseSection(_Frozen):
    """Supervised loops (`node.supervise`): when one counts as stuck, how often a dead one is restarted."""

    stuck_after_periods: Annotated[float, Field(ge=2, le=1000)] = 10.0  # no heartbeat for this many periods: stuck
    item_seconds: Annotated[float, Field(gt=0, le=86400)] = 1800.0  # one job (models) may hold the worker this long
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 5  # per loop within the window; one more death: exit 70
    restart_window_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    restart_backoff_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0  # doubles with each restart in the window


class ReachabilitySection(_Frozen):
    """Destination checks (`node.reachability`): C-ECHO / HTTP GET at start, at reload and every interval."""

    interval_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0


class SyslogProtocol(StrEnum):
    UDP = "udp"  # RFC 5426: one message per datagram
    TCP = "tcp"  # RFC 6587 octet counting
    TLS = "tls"  # RFC 5425: TLS over TCP, octet counting (section 4.3)


SYSLOG_TLS_PORT = 6514  # RFC 5425 section 4.1


class AuditSection(_Frozen):
    """The audit trail (`node.audit`): IHE ATNA-style records, JSON lines in their own file, optionally syslog."""

    enabled: bool = True
    path: Path | None = None  # None: <data_dir>/audit/audit.jsonl
    rotate_bytes: Annotated[int, Field(ge=0)] = 64 << 20  # 0: never by size
    rotate_daily: bool = True  # start a new file on the first record of each UTC day
    # Rotated files whose newest record is older than this are deleted at the next rotation; 0 keeps them for ever
    # (the default: a site's ATNA retention period is its own policy; a syslog collector may hold the trail instead)
    keep_days: Annotated[int, Field(ge=0)] = 0
    syslog_host: str | None = None  # RFC 5424 copy of each record
    syslog_port: Port = 514  # 6514 (SYSLOG_TLS_PORT) when syslog_protocol = "tls" and no port is given
    syslog_protocol: SyslogProtocol = SyslogProtocol.UDP
    # "tls": the collector's certificate must chain to syslog_ca_file (None: the system's CAs) and name syslog_host
    syslog_ca_file: Path | None = None
    syslog_client_certificate: Path | None = None  # PEM, for collectors that require a client certificate
    syslog_client_private_key: Path | None = None  # PEM, unencrypted
    syslog_facility: Annotated[int, Field(ge=0, le=23)] = 10  # 10 = authpriv (security/authorization)
    site_id: Annotated[str, Field(max_length=64)] = ""  # AuditEnterpriseSiteID (e.g. the hospital's name)

    @model_validator(mode="before")
    @classmethod
    def _tls_default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("syslog_protocol") == SyslogProtocol.TLS and "syslog_port" not in data:
            return {**data, "syslog_port": SYSLOG_TLS_PORT}
        return data

    @model_validator(mode="after")
    def _tls_files(self) -> AuditSection:
        if self.syslog_protocol is not SyslogProtocol.TLS:
            given = [f"syslog_{k}" for k in ("ca_file", "client_certificate", "client_private_key")
                     if getattr(self, f"syslog_{k}") is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply only with syslog_protocol = 'tls'")
        if (self.syslog_client_certificate is None) != (self.syslog_client_private_key is None):
            raise ValueError("syslog_client_certificate and syslog_client_private_key go together")
        return self


class AdmissionSection(_Frozen):
    """Admission control (`node.admission`): refuse new data before the disk is full or the queue runs away.

    The floor is the larger of ``min_free_bytes`` and ``min_free_percent`` of each file system the node writes to
    (`node.disks`; the byte figures in full on the spool's, capped to a share of a smaller dedicated volume's size
    elsewhere), the hard reserve likewise, the fullest deciding; below the floor (or with ``max_queue_depth`` jobs waiting) new series are refused
    and series already being received may finish; below the reserve everything is refused."""

    enabled: bool = True
    min_free_bytes: Annotated[int, Field(ge=0)] = 2 << 30  # floor: keep at least 2 GiB ...
    min_free_percent: Annotated[float, Field(ge=0, lt=100)] = 5.0  # ... or 5 % free, whichever is larger
    reserve_free_bytes: Annotated[int, Field(ge=0)] = 512 << 20  # hard reserve: 512 MiB ...
    reserve_free_percent: Annotated[float, Field(ge=0, lt=100)] = 1.0  # ... or 1 %, whichever is larger
    max_queue_depth: Annotated[int, Field(ge=0)] = 500  # jobs queued or running; 0 = no ceiling
    active_series_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0  # "being received": an instance this recent
    retry_after_seconds: Annotated[int, Field(ge=1, le=86400)] = 60  # STOW-RS 503 Retry-After
    check_interval_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5  # free space and queue depth re-read this often

    @model_validator(mode="after")
    def _reserve_below_floor(self) -> AdmissionSection:
        if self.reserve_free_bytes > self.min_free_bytes:
            raise ValueError("reserve_free_bytes must not exceed min_free_bytes (the reserve lies below the floor)")
        if self.reserve_free_percent > self.min_free_percent:
            raise ValueError("reserve_free_percent must not exceed min_free_percent (the reserve lies below the floor)")
        return self


def _database_url(value: str) -> str:
    """A URL SQLAlchemy reads, of a backend the node runs on, whose driver is installed; the messages never quote
    the URL (it may hold a password)."""
    if not value:
        return value
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    expected = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL (expected {expected})") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"{url.get_backend_name()!r} is not a database this node runs on (expected {expected})")
    try:
        url.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        name = getattr(exc, "name", None) or url.drivername
        raise ValueError(f"the driver of {url.drivername!r} is not installed ({name}); expected {expected} "
                         "(the [postgres] extra installs psycopg)") from None
    return value


class DatabaseSection(_Frozen):
    url: Annotated[str, AfterValidator(_database_url)] = ""  # empty: SQLite under data_dir


