"""One frozen, typed configuration object, loaded from TOML with ``PACSNODE_SECTION__KEY`` environment overrides.

`load_config(path, environ)` returns a `NodeConfig` or raises `ConfigError` naming the bad key. Nothing here reads
the environment or the disk unless asked to; the object is passed explicitly to every stage. The sections live in
`node.config.base` (shared types), `node.config.network` (listeners, TLS, destinations), `node.config.routes`
(routes, priorities) and `node.config.sections` (the stages' and loops' settings); all are re-exported here.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, model_validator

from node.config.base import (
    UID_ROOT_MAX_LENGTH,
    AETitle,
    Port,
    _Frozen,
    is_loopback,
)
from node.config.network import Destination, DestinationKind, NodeSection, TlsSection, without_credentials
from node.config.routes import (
    CT_IMAGE_STORAGE,
    DEFAULT_ROUTES,
    IGNORE,
    PipelineName,
    Priority,
    PriorityRule,
    Route,
)
from node.config.sections import (
    AdmissionSection,
    AuditSection,
    CompletionMode,
    CompletionSection,
    DatabaseSection,
    DispatchSection,
    GateSection,
    QueueSection,
    ReachabilitySection,
    RetentionSection,
    SenderProfile,
    SuperviseSection,
    SyslogProtocol,
    WorkerSection,
)
from node.errors import ConfigError
from node.states import ClientCertificates

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / "config" / "node.toml"
ENV_PREFIX = "PACSNODE_"


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
    # Other hosts' spools by spool id → where this host mounts them (node.spools); absolute paths.
    spools: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")], Path] = {}
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
        if self.tls.plaintext_dimse and self.node.port == self.node.http_port:  # the listener child's HTTP bind
            raise ValueError(f"node.port {self.node.port} is also node.http_port: DIMSE and HTTP need a port each")
        if self.tls.dimse_port is not None and self.tls.dimse_port in (
            self.node.http_port, self.node.port if self.tls.plaintext_dimse else None
        ):
            raise ValueError(f"tls.dimse_port {self.tls.dimse_port} is already [node] port or http_port")
        return self

    @model_validator(mode="after")
    def _spool_mounts(self) -> NodeConfig:
        for spool_id, root in self.spools.items():
            if self.node.spool_id is not None and spool_id == self.node.spool_id:
                raise ValueError(f"spools.{spool_id} names this node's own spool ([node] spool_id), which is "
                                 "always <data_dir>/spool")
            if not root.is_absolute():
                raise ValueError(f"spools.{spool_id} must be an absolute path, not {str(root)!r}")
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
            if dest.get("url") is not None:
                dest["url"] = without_credentials(dest["url"])
        data["database"]["url"] = without_credentials(self.database.url) if self.database.url else self.database.url
        data["database"]["effective_url"] = without_credentials(self.database_url)
        return data


def _coerce_env_value(raw: str, name: str = "an environment value") -> Any:
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            # not the value: it may hold a token (exc.pos says where it broke)
            raise ConfigError(f"{name} looks like JSON but does not parse: {exc.msg} at character {exc.pos}") from exc
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
        target[parts[-1]] = _coerce_env_value(raw, name)


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


_TLS_FILE_KEYS = ("certificate", "private_key", "ca_file", "crl_file")
_DESTINATION_FILE_KEYS = ("ca_file", "client_certificate", "client_private_key")
_SYSLOG_FILE_KEYS = ("syslog_ca_file", "syslog_client_certificate", "syslog_client_private_key")


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
    audit = {k: _readable(f"audit.{k}", getattr(config.audit, k), base) for k in _SYSLOG_FILE_KEYS
             if getattr(config.audit, k)}
    return config.model_copy(update={"tls": tls.model_copy(update=update), "destinations": tuple(destinations),
                                     "audit": config.audit.model_copy(update=audit)})


__all__ = [
    "CT_IMAGE_STORAGE", "DEFAULT_CONFIG_PATH", "DEFAULT_ROUTES", "ENV_PREFIX", "IGNORE", "UID_ROOT_MAX_LENGTH",
    "AETitle", "AdmissionSection", "AuditSection", "CompletionMode", "CompletionSection", "DatabaseSection",
    "Destination", "DestinationKind", "DispatchSection", "GateSection", "NodeConfig", "NodeSection", "PipelineName",
    "Port", "Priority", "PriorityRule", "QueueSection", "ReachabilitySection", "RetentionSection", "Route",
    "SenderProfile", "SuperviseSection", "SyslogProtocol", "TlsSection", "WorkerSection", "is_loopback",
    "load_config",
]
