"""The config of the node's network faces: its listeners (`NodeSection`), its TLS, and its destinations."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import quote_plus, unquote_plus, urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from node.config.base import AETitle, Port, _check_uid_root, _Frozen
from node.states import ChildStart, ClientCertificates, ProcessModel


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
    # At one of those caps, the slot longest without progress (a C-STORE stored, or 1 MiB received) is taken back
    # (A-ABORT) if that is at least this long, so C-ECHO keep-alives or a trickle cannot hold slots (node.slots).
    # None: never; the caps alone.
    reclaim_idle_seconds: Annotated[float, Field(gt=0, le=86400)] | None = 30.0
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
    # Process roles (node.roles, node.processes): who this node is on a shared database, how `serve` runs its roles.
    instance_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")] | None = None  # None: hostname
    process_model: ProcessModel = ProcessModel.PROCESSES
    listener_processes: Annotated[int, Field(ge=1, le=64)] = 1  # listener children sharing the ports (processes)
    child_start: ChildStart = ChildStart.FORK  # how the supervisor starts its children (node.processes)
    wake_poll_seconds: Annotated[float, Field(gt=0, le=10)] = 0.1  # a role process polls the database this often
    # Which spool this process writes (node.spools): recorded on each instance row with the path relative to the
    # spool root, so processes on other hosts find the file through their [spools] mount points. None: one machine,
    # rows keep absolute paths and no spool id (as before spool ids).
    spool_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")] | None = None

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


MASK = "********"
# Query parameter names whose values are masked: anything containing one of these (sslpassword, access_token, code,
# apikey, X-Amz-Signature, X-Amz-Credential, ...); sslmode, sslrootcert, connect_timeout stay visible.
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|code|sig|auth|credential", re.IGNORECASE)


def without_credentials(url: str) -> str:
    """``url`` as logs, send errors, /admin and `config check` show it: the password of its ``user:password@`` part
    masked whatever characters it holds, and the values of query (and fragment) parameters whose names look secret.

    An http(s) URL is read as httpx reads it (`urllib.parse.urlsplit`), except that its user part runs to the last
    '@' before the query, so an unescaped '/' in a password is masked too; any other URL is a database URL and is
    read as SQLAlchemy reads it (`make_url`: the password runs to the next '@', '/' and '?' included). A URL that
    neither reads is shown as its scheme only."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return MASK
    if scheme.lower() in ("http", "https"):
        try:
            return _web_url_shown(url)
        except ValueError:
            return f"{scheme}://{MASK}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is no number, libpq's multi-host lists
        return f"{scheme}://{MASK}"
    if parsed.host is not None and "@" in parsed.host:  # an unescaped '@' in the password: its rest reads as host
        return f"{scheme}://{MASK}"
    query = [(k, v) for k, values in parsed.query.items() for v in ((values,) if isinstance(values, str) else values)]
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    if query:
        shown += "?" + "&".join(f"{quote_plus(k)}={MASK if _SECRET_NAME.search(k) else quote_plus(v)}"
                                for k, v in query)
    return shown


def _web_url_shown(url: str) -> str:
    parts = urlsplit(url)
    netloc, path = parts.netloc, parts.path
    if "@" not in netloc and "@" in path and ":" in netloc and (
            not netloc.rpartition(":")[2].isdigit() or "@" in path[1:].split("/", 1)[0]):
        # an unescaped '/' in a password ends the netloc early ('user:pa' + '/ss@host/...'); a port (digits) with
        # an '@' deeper in the path ('host:8443/studies/x@1') is no password
        cut = path.index("@")
        netloc, path = netloc + path[:cut + 1] + path[cut + 1:].split("/", 1)[0], path[cut + 1:]
        path = path[path.find("/"):] if "/" in path else ""
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = f"{userinfo.partition(':')[0]}:{MASK}"
    shown = f"{parts.scheme}://{userinfo}{at}{host}{path}"
    if parts.query:
        shown += "?" + _masked_parameters(parts.query)
    if parts.fragment:
        shown += "#" + _masked_parameters(parts.fragment)
    return shown


def _masked_parameters(text: str) -> str:
    """``name=value&...`` with the values of secret-looking names masked, the rest as it was."""
    pieces = []
    for piece in text.split("&"):
        name, eq, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if eq and _SECRET_NAME.search(unquote_plus(name)) else piece)
    return "&".join(pieces)


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
    # Who may send this destination's N-EVENT-REPORT on an association of its own (node.commitment_peer.
    # foreign_reporter): the destination's ae_title or one listed here; and, only when hosts are listed, from one of
    # them (names resolved when a report comes). A report on the node's own N-ACTION association is the dialled peer's.
    commitment_report_ae_titles: tuple[AETitle, ...] = ()
    commitment_report_hosts: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = ()
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
        elif self.commitment_report_ae_titles or self.commitment_report_hosts:
            raise ValueError("commitment_report_ae_titles / _hosts apply only to a 'dimse' destination")
        return self

    @property
    def shown_url(self) -> str | None:
        """``url`` as logs, errors, /admin and `config check` show it: without a user or password in it."""
        return None if self.url is None else without_credentials(self.url)

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


# A DNS name or subject CN as a certificate carries it, compared without regard to case; no wildcards.
CertificateName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[^*\s](?:[^*]*[^*\s])?$")]


def _one_or_more(value: object) -> object:
    return (value,) if isinstance(value, str) else value


class TlsSection(_Frozen):
    """The node's own TLS (node.tls): DICOM TLS on a DIMSE port of its own, HTTPS on ``http_port``."""

    certificate: Path | None = None  # PEM: the node's certificate (then any intermediates)
    private_key: Path | None = None  # PEM, unencrypted
    ca_file: Path | None = None  # PEM bundle: the CAs whose client certificates are accepted
    client_certificates: ClientCertificates = ClientCertificates.NONE
    dimse_port: Port | None = None  # DICOM TLS listener (conventionally 2762); None: none
    plaintext_dimse: bool = True  # false: TLS only, nothing listens on [node] port
    https: bool = False  # serve [node] http_port over HTTPS
    # PEM, one or more CRLs of the CAs in ca_file: a revoked client certificate is refused (DICOM TLS and HTTPS).
    # Re-read when the file changes (node.tls.ServerContext), so revoking needs neither a restart nor a reload.
    crl_file: Path | None = None
    # Calling AE title -> the names (subjectAltName DNS name or subject CN) its client certificate must carry.
    # Non-empty: on the DICOM TLS port only these AE titles may associate, each with a certificate naming it; on the
    # plaintext port these AE titles are refused (they have to prove who they are). node.tls.calling_ae_refusal.
    calling_ae_certificates: dict[AETitle, Annotated[tuple[CertificateName, ...], BeforeValidator(_one_or_more),
                                                     Field(min_length=1)]] = {}

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
        if self.crl_file is not None and (self.ca_file is None or self.client_certificates is ClientCertificates.NONE):
            raise ValueError("crl_file needs ca_file and client_certificates = 'required' or 'optional'")
        if self.calling_ae_certificates and (
                self.dimse_port is None or self.client_certificates is not ClientCertificates.REQUIRED):
            raise ValueError("calling_ae_certificates needs dimse_port and client_certificates = 'required'")
        return self


