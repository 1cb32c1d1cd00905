"""Who may use the HTTP side: one bearer-token check for STOW-RS/QIDO-RS, the /admin actions and /metrics, and
the warnings `pacsnode config check` gives about an open, plaintext setup.

`Authenticator(token, metrics=..., audit=...)`: `check(request, surface)` returns None when the request may
proceed, else the 401 answer (``WWW-Authenticate: Bearer``); `failed(...)` records a failure found elsewhere (the
admin form's token). Each failure is counted (``pacsnode_auth_failures``), logged as ``auth_failed`` without the
presented value, and audited (DCM 110114 User Authentication). `token_matches` is the one constant-time comparison.
`open_setup_warnings(config)` lists what a peer on the network could use: an HTTP bind beyond loopback without
authentication, no calling-AE allow-list, no TLS (listeners, destinations, the audit trail's syslog copy), an open
``/metrics``, a private key that other users may read.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.config import DestinationKind, NodeConfig, SyslogProtocol, is_loopback
from node.logs import get_logger
from node.states import AuthFailure

if TYPE_CHECKING:
    from node.audit import AuditTrail
    from node.metrics import Metrics

SURFACES = frozenset({"dicomweb", "admin", "metrics"})  # where a token is asked for (metric label, audit text)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pacsnode"'}
TOKEN_USER = "dicomweb-token"  # the audit trail's user for a request that showed the node's token
ANONYMOUS_USER = "anonymous"  # ... and for one on a node without a token


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None for no header or another scheme)."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else None


def token_matches(presented: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the configured one (any text; never raises)."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def client_host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


RECORD_BURST = 10  # failures from one address on one surface recorded one by one per window (log and audit)
RECORD_WINDOW_SECONDS = 60.0
MAX_TRACKED = 4096  # (address, surface) windows remembered; the least recently seen forgotten first


class Bursts:
    """Which failures are recorded one by one: 401s here, STOW-RS requests that stored nothing
    (`node.auditrecords`). Each 401 was logged and audited (~1.2 KB a record): an unauthenticated client refused a
    thousand times a second grew the trail ~100 GB a day on the data disk, kept for good by default (``[audit]
    keep_days = 0``), until the disk admission paused every modality's intake. Now the first `RECORD_BURST` of an
    address's failures of one kind (a surface) in `RECORD_WINDOW_SECONDS` are recorded; the rest are counted (the
    metric counts every one), and the address's next failure after the window first records how many were not
    (`take` returns that count)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # [started, recorded, unrecorded]

    def take(self, host: str, surface: str) -> tuple[bool, int]:
        """Whether to record this failure one by one, and how many earlier ones went unrecorded (to say first)."""
        now, key = self._clock(), (host, surface)
        with self._lock:
            window = self._windows.pop(key, None)
            unrecorded = 0
            if window is None or now - window[0] >= RECORD_WINDOW_SECONDS:
                unrecorded = int(window[2]) if window is not None else 0
                window = [now, 0, 0]
            self._windows[key] = window
            while len(self._windows) > MAX_TRACKED:
                self._windows.popitem(last=False)
            record = window[1] < RECORD_BURST
            window[1 if record else 2] += 1
        return record, unrecorded


def user_for(token_required: bool) -> str:
    """The audit trail's user for an HTTP request the node admitted: the token's holder, or anonymous on a node
    without a token (also for a STOW-RS request found open at restart, whose row does not name it)."""
    return TOKEN_USER if token_required else ANONYMOUS_USER


class Authenticator:
    """The node's HTTP authentication. ``token`` None means open: every request passes (HTTP is then bound to
    loopback, `NodeConfig.http_authenticates`). Raises ValueError for an empty token."""

    def __init__(self, token: str | None, *, metrics: Metrics | None = None, audit: AuditTrail | None = None) -> None:
        if token is not None and not token.strip():
            raise ValueError("token must be a non-empty string or None (no authentication)")
        self.token = token.strip() if token is not None else None
        self.metrics = metrics
        self.audit = audit
        # The 401's audit record is written here, not on uvicorn's one event loop: an audit file that stalls (a hung
        # network volume) held the loop in write(2), and one unauthenticated request then hung /healthz, /readyz and
        # every other request. Not in the shared thread pool either, which the data path and probes need.
        self._audit_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="AuthAudit@pacsnode") \
            if audit is not None else None
        self._bursts = Bursts()
        self._log = get_logger(component="auth")

    @property
    def user(self) -> str:
        """Who an admitted request is, for the audit trail (one shared token: its holder)."""
        return user_for(self.token is not None)

    async def check(self, request: Request, surface: str) -> Response | None:
        """None when ``request`` may proceed; else the 401 answer, after counting, logging and auditing."""
        if self.token is None:
            return None
        presented = bearer(request)
        if presented is not None and token_matches(presented, self.token):
            return None
        if presented is None:
            reason = AuthFailure.WRONG_SCHEME if request.headers.get("authorization") else AuthFailure.MISSING
        else:
            reason = AuthFailure.MISMATCH
        await self.failed(request, surface, reason)
        return JSONResponse({"error": "a valid bearer token is required"}, status_code=401, headers=CHALLENGE)

    async def failed(self, request: Request, surface: str, reason: AuthFailure) -> None:
        """Record one authentication failure on ``surface``; never raises, never sees the presented value. Returns
        once its audit record is written (in the authenticator's own thread: only this request waits for it)."""
        if surface not in SURFACES:
            raise ValueError(f"surface must be one of {sorted(SURFACES)}, not {surface!r}")
        host = client_host(request)
        if self.metrics is not None:
            self.metrics.auth_failure(surface, str(reason))
        record, unrecorded = self._bursts.take(host, surface)
        if unrecorded:
            self._log.warning("auth_failures_unrecorded", surface=surface, client=host, count=unrecorded,
                              window_seconds=RECORD_WINDOW_SECONDS)
        if record:
            self._log.warning("auth_failed", surface=surface, reason=str(reason), path=request.url.path[:200],
                              client=host)
        if self.audit is None or self._audit_thread is None or not (record or unrecorded):
            return
        audit, path = self.audit, request.url.path

        def write() -> None:
            if unrecorded:
                audit.failures_unrecorded(what=f"{surface} requests refused 401", peer=host, count=unrecorded)
            if record:
                audit.auth_failed(surface=surface, reason=str(reason), peer=host, path=path)

        await asyncio.wrap_future(self._audit_thread.submit(write))


def open_setup_warnings(config: NodeConfig) -> list[str]:
    """What `pacsnode config check` warns about: ways in that need no credential, and plaintext transport."""
    node = config.node
    warnings = []
    if not is_loopback(node.http_host) and not config.http_authenticates():  # refused by the config; kept for safety
        warnings.append(f"node.http_host = {node.http_host!r} without node.dicomweb_token: DICOMweb is open to the network")
    if not is_loopback(node.host) and not node.allowed_calling_aes:
        warnings.append(
            f"node.host = {node.host!r} with an empty node.allowed_calling_aes: any DICOM peer that knows the AE "
            f"title {node.ae_title!r} may store here"
        )
    if not is_loopback(node.host) and config.tls.plaintext_dimse:
        warnings.append(
            f"DIMSE on {node.host!r} is plaintext (tls.plaintext_dimse = true): patient data crosses the network "
            "unencrypted; offer DICOM TLS (tls.dimse_port) and close the plaintext port when the senders can"
        )
    if not is_loopback(node.http_host) and not config.tls.https:
        warnings.append(
            f"HTTP on {node.http_host!r} is plaintext: patient data and the token cross the network unencrypted "
            "(set tls.https = true)"
        )
    if not is_loopback(node.http_host) and not node.metrics_require_token:
        warnings.append(
            f"/metrics is open on {node.http_host!r} (set node.metrics_require_token = true to require the token)"
        )
    for dest in config.destinations:  # results carry the patient's name, ID and birth date
        host = dest.host if dest.kind is DestinationKind.DIMSE else urlsplit(dest.url or "").hostname
        if dest.uses_tls or host is None or is_loopback(host):
            continue
        secret = " and its token" if dest.token is not None or "@" in urlsplit(dest.url or "").netloc else ""
        warnings.append(f"destination {dest.name!r} ({dest.kind.value}) is plaintext: results{secret} cross the "
                        "network unencrypted (DIMSE: tls = true; DICOMweb: an https:// url)")
    audit = config.audit
    if not audit.enabled:
        warnings.append("audit.enabled = false: no audit trail of who sent, queried or exported what")
    elif audit.syslog_host and not is_loopback(audit.syslog_host) and audit.syslog_protocol is not SyslogProtocol.TLS:
        warnings.append(
            f"audit.syslog_host = {audit.syslog_host!r} with syslog_protocol = {audit.syslog_protocol.value!r}: "
            "patient identifiers in audit records cross the network in cleartext (set syslog_protocol = 'tls', "
            "RFC 5425, as IHE ATNA requires)"
        )
    warnings.extend(_exposed_key_warnings(config))
    return warnings


def _exposed_key_warnings(config: NodeConfig) -> list[str]:
    """A private key the node uses that its group or other users may read (``chmod 600`` it)."""
    keys: list[tuple[str, Path | None]] = [("tls.private_key", config.tls.private_key)]
    keys += [(f"destination {d.name!r} client_private_key", d.client_private_key) for d in config.destinations]
    keys.append(("audit.syslog_client_private_key", config.audit.syslog_client_private_key))
    warnings = []
    for key, path in keys:
        if path is None:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a key that cannot be read is refused by load_config / node.tls, not warned about
        if mode & 0o077:
            warnings.append(f"{key} {str(path)!r} may be read by its group or other users (mode "
                            f"{mode & 0o777:04o}): chmod 600 it")
    return warnings


__all__ = ["Authenticator", "Bursts", "bearer", "open_setup_warnings", "token_matches"]
