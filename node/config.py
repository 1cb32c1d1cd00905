"""One frozen, typed configuration object, loaded from TOML with ``PACSNODE_SECTION__KEY`` environment overrides.

`load_config(path, environ)` returns a `NodeConfig` or raises `ConfigError` naming the bad key. Nothing here reads
the environment or the disk unless asked to; the object is passed explicitly to every stage.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from node.errors import ConfigError
from node.states import ClientCertificates

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "node.toml"
ENV_PREFIX = "PACSNODE_"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash, not blank)")
    if value != value.strip():
        raise ValueError(f"{value!r} has leading or trailing spaces; AE titles are compared without them")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]

UID_ROOT_MAX_LENGTH = 32  # node.results.uids.MAX_ROOT_LENGTH: leaves >= 32 hash digits in a 64-character UID
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?$")  # PS3.5 9.1: no leading zeros


def _check_uid_root(value: str) -> str:
    """'' (pydicom's root) or an organisation's UID root, returned with its trailing dot."""
    if not value:
        return value
    root = value if value.endswith(".") else value + "."
    if not _UID_ROOT_RE.match(value) or len(root) > UID_ROOT_MAX_LENGTH:
        raise ValueError(
            f"{value[:80]!r} is not a UID root: digits and dots, no component with a leading zero, at most "
            f"{UID_ROOT_MAX_LENGTH} characters with the trailing dot (e.g. '1.2.826.0.1.3680043.10.999.')"
        )
    return root


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSection(_Frozen):
    ae_title: AETitle = "PACSNODE"
    host: str = "0.0.0.0"  # DIMSE listen address
    port: Port = 11112
    allowed_calling_aes: tuple[AETitle, ...] = ()
    data_dir: Path = Path("var")
    http_port: Port = 8080
    # HTTP listen address (DICOMweb, /admin, /metrics): loopback unless the HTTP side authenticates (see below).
    http_host: str = "127.0.0.1"
    metrics_require_token: bool = False  # /metrics answers 401 without the dicomweb_token when true
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    # Open DIMSE connections from one peer address; more are closed at accept (node.guard), so one host cannot hold
    # every association slot. Counts connections still negotiating too.
    max_associations_per_peer: Annotated[int, Field(ge=1, le=1000)] = 16
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Hostile-peer bounds (node.guard). A connection must complete association negotiation within this (ARTIM).
    association_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    # Largest PDU accepted, and the Maximum Length the node announces; a larger declared length is aborted unread.
    max_pdu_bytes: Annotated[int, Field(ge=16384, le=0xFFFFFFFF)] = 1 << 20
    # Largest data set per C-STORE and per STOW-RS part (0xA700 / 413); one over 16 MiB is held on disk beside the
    # spool while it is received, so this bounds disk per association, memory stays ~16 MiB + one PDU.
    max_instance_bytes: Annotated[int, Field(ge=1 << 16)] = 1 << 30
    # Largest Deflated (1.2.840.10008.1.2.1.99) data set once inflated (0xA700); inflated as it is parsed, in a
    # small window, so this bounds a deflate bomb's CPU time, not memory.
    max_inflated_bytes: Annotated[int, Field(ge=1 << 16)] = 256 << 20
    dicomweb_token: SecretStr | None = None  # bearer token required by STOW-RS/QIDO-RS when set
    # Largest STOW-RS request body (413 beyond, before more is read); None: no limit. 2 GiB by default: a large
    # CT study (~2,000 slices of 512 KiB is 1 GiB) fits in one request with room to spare, while a single request
    # cannot fill the data disk unnoticed; senders with bigger studies split them or raise this.
    stow_max_request_bytes: Annotated[int, Field(ge=1)] | None = 2 << 30
    # HTTP side (node.httpguard): a request head must be complete this long after its first byte (slowloris);
    http_header_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    # a request body that sends nothing for this long is dropped;
    http_body_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # requests beyond this many open connections get 503 (uvicorn limit_concurrency);
    http_max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    # connections from one address beyond this are closed at once;
    http_max_connections_per_peer: Annotated[int, Field(ge=1, le=100_000)] = 32
    # request line plus headers larger than this are answered 400 (h11's incomplete-event limit).
    http_max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 24)] = 16 << 10
    # The organisation's UID root for the SR/SEG the node creates ('' = pydicom's); result UIDs depend on it.
    uid_root: Annotated[str, AfterValidator(_check_uid_root)] = ""

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def http_authenticates(self) -> bool:
        """Whether HTTP clients must show the DICOMweb token (see `NodeConfig.http_authenticates` for certificates)."""
        return self.dicomweb_token is not None

    @model_validator(mode="after")
    def _token_settings(self) -> NodeSection:
        if self.metrics_require_token and self.dicomweb_token is None:
            raise ValueError("metrics_require_token = true needs node.dicomweb_token")
        if self.dicomweb_token is not None and not self.dicomweb_token.get_secret_value().strip():
            raise ValueError("dicomweb_token must not be empty")
        return self


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable only from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # wildcards ("", "0.0.0.0", "::") and names other than localhost may be reachable


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


class PipelineName(StrEnum):
    """The model pipelines a route can name (`node.pipelines` implements each)."""

    PNEUMONIA = "pneumonia"  # classifier + U-Net: pneumonia verdict, lung/lesion SEG
    LUNG_VOLUME = "lung-volume"  # U-Net only: lung and lesion volumes, SEG


IGNORE = "ignore"  # a route's pipeline value that drops the series without any result

# SOP classes by keyword or UID; resolved to UIDs when the config is validated.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _sop_class(value: str) -> str:
    if re.fullmatch(r"[0-9.]+", value):
        return value
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == value:
            return str(uid)
    raise ValueError(f"{value!r} is neither a UID nor a SOP class keyword (e.g. 'CTImageStorage')")


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from exc
    return value


class Route(_Frozen):
    """One routing rule: every condition given must hold (lists: any of; `image_type`: all of); the first route
    that matches a completed series names its pipeline, or `ignore`. Text is compared case-insensitively;
    regular expressions are searched (not anchored); "" in `body_part` matches a missing BodyPartExamined."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    pipeline: PipelineName | Literal["ignore"]
    modality: tuple[str, ...] = ()
    sop_class: tuple[Annotated[str, AfterValidator(_sop_class)], ...] = ()
    image_type: tuple[str, ...] = ()  # values that must all be present in ImageType
    image_type_not: tuple[str, ...] = ()  # values that must all be absent
    body_part: tuple[str, ...] = ()
    series_description: Annotated[str, AfterValidator(_regex)] | None = None
    protocol_name: Annotated[str, AfterValidator(_regex)] | None = None
    calling_ae: tuple[AETitle, ...] = ()
    min_slices: Annotated[int, Field(ge=1)] | None = None
    max_slices: Annotated[int, Field(ge=1)] | None = None
    min_slice_thickness_mm: Annotated[float, Field(ge=0)] | None = None
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] | None = None


_CHEST_CT: dict[str, Any] = dict(
    pipeline=PipelineName.PNEUMONIA, modality=("CT",), sop_class=(CT_IMAGE_STORAGE,),
    image_type=("ORIGINAL", "AXIAL"), image_type_not=("LOCALIZER",),
)
# The default: axial CT image series of the chest go to the pneumonia pipeline (by BodyPartExamined, or by the
# series description when the body part is missing); everything else is ignored. config/node.toml spells it out.
DEFAULT_ROUTES = (
    Route(name="chest-ct", body_part=("CHEST", "THORAX", "LUNG", "LUNGS"), **_CHEST_CT),
    Route(name="chest-ct-by-description", body_part=("",),
          series_description=r"chest|thorax|thoracic|lung|pulmo", **_CHEST_CT),
    Route(name="everything-else", pipeline="ignore"),
)


class Priority(StrEnum):
    STAT = "stat"
    ROUTINE = "routine"


class PriorityRule(_Frozen):
    """A series matches when every given condition holds: the calling AE, and/or a header keyword's value."""

    priority: Priority = Priority.STAT
    calling_ae: AETitle | None = None
    keyword: str | None = None
    equals: str | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> PriorityRule:
        if self.calling_ae is None and self.keyword is None:
            raise ValueError("a priority rule needs calling_ae and/or keyword")
        if (self.keyword is None) != (self.equals is None):
            raise ValueError("keyword and equals go together")
        if self.keyword is not None:
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(self.keyword) is None:
                raise ValueError(f"{self.keyword!r} is not a DICOM keyword")
        return self


class QueueSection(_Frozen):
    lease_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_delay_seconds: Annotated[float, Field(ge=0, le=86400)] = 10.0
    priority_rules: tuple[PriorityRule, ...] = ()


class WorkerSection(_Frozen):
    enabled: bool = True
    classifier_version: str | None = None  # None: the newest shipped version
    segmenter_version: str | None = None
    weights_dir: Path | None = None  # None: the weights shipped in models/weights


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


class AuditSection(_Frozen):
    """The audit trail (`node.audit`): IHE ATNA-style records, JSON lines in their own file, optionally syslog."""

    enabled: bool = True
    path: Path | None = None  # None: <data_dir>/audit/audit.jsonl
    rotate_bytes: Annotated[int, Field(ge=0)] = 64 << 20  # 0: never by size
    rotate_daily: bool = True  # start a new file on the first record of each UTC day
    syslog_host: str | None = None  # RFC 5424 copy of each record
    syslog_port: Port = 514
    syslog_protocol: SyslogProtocol = SyslogProtocol.UDP
    syslog_facility: Annotated[int, Field(ge=0, le=23)] = 10  # 10 = authpriv (security/authorization)
    site_id: Annotated[str, Field(max_length=64)] = ""  # AuditEnterpriseSiteID (e.g. the hospital's name)


class AdmissionSection(_Frozen):
    """Admission control (`node.admission`): refuse new data before the disk is full or the queue runs away.

    The floor is the larger of ``min_free_bytes`` and ``min_free_percent`` of the data directory's file system,
    the hard reserve likewise; below the floor (or with ``max_queue_depth`` jobs waiting) new series are refused
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


class DatabaseSection(_Frozen):
    url: str = ""  # empty: SQLite under data_dir


class DestinationKind(StrEnum):
    DIMSE = "dimse"
    DICOMWEB = "dicomweb"


class Destination(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: DestinationKind
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = None
    token: SecretStr | None = None
    # Proof of delivery (node.commitment): DIMSE → Storage Commitment (N-ACTION, then the PACS's N-EVENT-REPORT);
    # DICOMweb → QIDO-RS finds every stored instance. No proof within commit_timeout_seconds: reported uncommitted.
    commitment: bool = False
    commit_timeout_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 300.0
    # TLS to this destination (node.tls): DIMSE with `tls = true`, DICOMweb with an https:// url. The peer's
    # certificate must chain to `ca_file` (None: the system's CAs) and name `host` (or the url's host).
    tls: bool = False
    ca_file: Path | None = None
    client_certificate: Path | None = None  # PEM, for peers that require a client certificate
    client_private_key: Path | None = None  # PEM, unencrypted

    @model_validator(mode="after")
    def _kind_needs(self) -> Destination:
        if self.kind is DestinationKind.DIMSE:
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a 'dimse' destination needs {', '.join(missing)}")
        elif self.url is None or not re.match(r"^https?://", self.url):
            raise ValueError("a 'dicomweb' destination needs url = 'http(s)://...'")
        return self

    @property
    def uses_tls(self) -> bool:
        """DIMSE with ``tls = true``, or DICOMweb with an https:// url."""
        if self.kind is DestinationKind.DIMSE:
            return self.tls
        return self.url is not None and self.url.lower().startswith("https://")

    @model_validator(mode="after")
    def _tls_needs(self) -> Destination:
        if self.kind is DestinationKind.DICOMWEB and self.tls and not self.uses_tls:
            raise ValueError("tls = true on a 'dicomweb' destination needs an https:// url")
        if not self.uses_tls:
            given = [k for k in ("ca_file", "client_certificate", "client_private_key") if getattr(self, k)]
            if given:
                need = "tls = true" if self.kind is DestinationKind.DIMSE else "an https:// url"
                raise ValueError(f"{', '.join(given)} apply only with {need}")
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together")
        return self


class TlsSection(_Frozen):
    """The node's own TLS (node.tls): DICOM TLS on a DIMSE port of its own, HTTPS on ``http_port``."""

    certificate: Path | None = None  # PEM: the node's certificate (then any intermediates)
    private_key: Path | None = None  # PEM, unencrypted
    ca_file: Path | None = None  # PEM bundle: the CAs whose client certificates are accepted
    client_certificates: ClientCertificates = ClientCertificates.NONE
    dimse_port: Port | None = None  # DICOM TLS listener (conventionally 2762); None: none
    plaintext_dimse: bool = True  # false: TLS only, nothing listens on [node] port
    https: bool = False  # serve [node] http_port over HTTPS

    @model_validator(mode="after")
    def _needs(self) -> TlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if (self.dimse_port is not None or self.https) and self.certificate is None:
            raise ValueError("dimse_port and https need certificate and private_key")
        if self.client_certificates is not ClientCertificates.NONE and self.ca_file is None:
            raise ValueError(f"client_certificates = {self.client_certificates.value!r} needs ca_file")
        if not self.plaintext_dimse and self.dimse_port is None:
            raise ValueError("plaintext_dimse = false (TLS only) needs dimse_port")
        return self


class NodeConfig(_Frozen):
    node: NodeSection = NodeSection()
    completion: CompletionSection = CompletionSection()
    gate: GateSection = GateSection()
    database: DatabaseSection = DatabaseSection()
    queue: QueueSection = QueueSection()
    worker: WorkerSection = WorkerSection()
    dispatch: DispatchSection = DispatchSection()
    retention: RetentionSection = RetentionSection()
    supervise: SuperviseSection = SuperviseSection()
    reachability: ReachabilitySection = ReachabilitySection()
    audit: AuditSection = AuditSection()
    admission: AdmissionSection = AdmissionSection()
    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    tls: TlsSection = TlsSection()
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        routes = [r.name for r in self.routes]
        dupes = sorted({n for n in routes if routes.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique: {', '.join(dupes)}")
        if self.tls.dimse_port is not None and self.tls.dimse_port in (
            self.node.http_port, self.node.port if self.tls.plaintext_dimse else None
        ):
            raise ValueError(f"tls.dimse_port {self.tls.dimse_port} is already [node] port or http_port")
        return self

    def http_authenticates(self) -> bool:
        """Whether HTTP clients must prove who they are: the DICOMweb token is set, or HTTPS requires client
        certificates signed by ``[tls] ca_file``."""
        certificates = self.tls.https and self.tls.client_certificates is ClientCertificates.REQUIRED
        return self.node.http_authenticates() or certificates

    @model_validator(mode="after")
    def _secure_http_bind(self) -> NodeConfig:
        # Secure by default: an HTTP bind reachable from other machines needs authentication; refused, never
        # silently narrowed to loopback (the admin asked for the address and must learn why it cannot be had).
        if not is_loopback(self.node.http_host) and not self.http_authenticates():
            raise ValueError(
                f"node.http_host = {self.node.http_host!r} is reachable from other machines but neither "
                "node.dicomweb_token nor HTTPS with tls.client_certificates = 'required' is set; set "
                "node.dicomweb_token (env PACSNODE_NODE__DICOMWEB_TOKEN) or bind node.http_host to 127.0.0.1"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'node.db'}"

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (for `pacsnode config check`)."""
        data = self.model_dump(mode="json")
        if self.node.dicomweb_token is not None:
            data["node"]["dicomweb_token"] = "********"
        for dest in data["destinations"]:
            if dest.get("token") is not None:
                dest["token"] = "********"
        data["database"]["url"] = _mask_url_password(self.database.url)
        data["database"]["effective_url"] = _mask_url_password(self.database_url)
        return data


def _mask_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1********@", url)


def _coerce_env_value(raw: str) -> Any:
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"environment value {raw!r} looks like JSON but does not parse: {exc}") from exc
    return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Apply ``PACSNODE_SECTION__KEY=value`` overrides (``PACSNODE_DESTINATIONS`` takes a JSON list)."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "PACSNODE_CONFIG":
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if any(not p for p in parts):
            raise ConfigError(f"environment override {name}: expected PACSNODE_SECTION__KEY")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment override {name}: {part!r} is not a section")
        target[parts[-1]] = _coerce_env_value(raw)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (default `DEFAULT_CONFIG_PATH`), apply environment overrides, validate.

    Relative ``data_dir`` paths are taken relative to the config file's parent's parent when the file lives in a
    ``config/`` folder (the repository layout), else relative to the file's folder. Raises `ConfigError`.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    environ = os.environ if environ is None else environ
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _apply_env(data, environ)
    try:
        config = NodeConfig.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
    data_dir = config.node.data_dir
    if not data_dir.is_absolute():
        base = path.resolve().parent
        if base.name == "config":
            base = base.parent
        node = config.node.model_copy(update={"data_dir": (base / data_dir).resolve()})
        config = config.model_copy(update={"node": node})
    return _check_tls_files(config, _config_base(path))


def _config_base(path: Path) -> Path:
    base = path.resolve().parent
    return base.parent if base.name == "config" else base


_TLS_FILE_KEYS = ("certificate", "private_key", "ca_file")
_DESTINATION_FILE_KEYS = ("ca_file", "client_certificate", "client_private_key")


def _readable(key: str, path: Path, base: Path) -> Path:
    """``path`` made absolute (relative to ``base``, like data_dir); `ConfigError` naming ``key`` if it cannot
    be read."""
    full = path if path.is_absolute() else (base / path).resolve()
    try:
        with full.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: {full} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    return full


def _check_tls_files(config: NodeConfig, base: Path) -> NodeConfig:
    """Fail fast on a TLS file that is missing or unreadable; relative paths become absolute."""
    tls = config.tls
    update = {k: _readable(f"tls.{k}", getattr(tls, k), base) for k in _TLS_FILE_KEYS if getattr(tls, k)}
    destinations = []
    for i, dest in enumerate(config.destinations):
        files = {k: _readable(f"destinations[{i}] ({dest.name}).{k}", getattr(dest, k), base)
                 for k in _DESTINATION_FILE_KEYS if getattr(dest, k)}
        destinations.append(dest.model_copy(update=files) if files else dest)
    return config.model_copy(update={"tls": tls.model_copy(update=update), "destinations": tuple(destinations)})
