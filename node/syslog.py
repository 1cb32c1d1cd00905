"""Audit records to a syslog collector as RFC 5424 messages, over UDP (RFC 5426), TCP (RFC 6587 octet counting)
or TLS (RFC 5425: octet counting, the collector's certificate verified against the host name).

`format_message(...)` builds one message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] BOM MSG``
(Python's ``SysLogHandler`` writes the older BSD format, so the header is written here). `SyslogSender` sends
messages from its own thread through a bounded queue, so a slow or absent collector never delays the caller;
a message that cannot be queued or sent is reported to ``on_error`` (the audit trail counts and logs it).
`SyslogSender.from_settings(audit_section, on_error)` builds one from ``[audit]``, its TLS context by `node.tls`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Mapping

from node.config import AuditSection, SyslogProtocol
from node.errors import ConfigError
from node.logs import get_logger
from node.tls import client_context, describe_tls_error

APP_NAME = "pacsnode"
SD_ID = "pacsnode@32473"  # 32473: the private enterprise number RFC 5612 reserves for examples/documentation
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark
QUEUE_SIZE = 10_000
SEND_TIMEOUT_SECONDS = 5.0
DRAIN_LIMIT = 16  # reads of up to 4 KiB before a send; a collector sends nothing, so this is only ever EOF or noise
NILVALUE = "-"


class Severity:
    WARNING = 4
    NOTICE = 5
    INFORMATIONAL = 6


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, NILVALUE when empty."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or NILVALUE


def _param_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_message(
    msg: str,
    *,
    facility: int,
    severity: int,
    timestamp: dt.datetime,
    hostname: str,
    msgid: str,
    params: Mapping[str, str] | None = None,
    app_name: str = APP_NAME,
    procid: str | None = None,
) -> bytes:
    """One RFC 5424 message (without transport framing). ``timestamp`` must be timezone-aware; ``params`` become
    the structured-data element ``[pacsnode@32473 k="v" ...]``. Raises ValueError for a bad facility/severity."""
    if not (0 <= facility <= 23 and 0 <= severity <= 7):
        raise ValueError(f"facility 0-23 and severity 0-7 expected, not {facility}/{severity}")
    if timestamp.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    stamp = timestamp.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd = NILVALUE
    if params:
        names = " ".join(f'{_header_field(k, 32)}="{_param_value(v)}"' for k, v in params.items())
        sd = f"[{SD_ID} {names}]"
    header = (
        f"<{facility * 8 + severity}>1 {stamp} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
        f"{_header_field(procid or str(os.getpid()), 128)} {_header_field(msgid, 32)} {sd} "
    )
    return header.encode("utf-8") + BOM + msg.encode("utf-8")


def tls_context(settings: AuditSection) -> ssl.SSLContext | None:
    """The client context for ``syslog_protocol = "tls"`` (None for udp/tcp); `ConfigError` naming the
    ``audit.syslog_*`` key whose file does not load."""
    if settings.syslog_protocol is not SyslogProtocol.TLS:
        return None
    try:
        return client_context(settings.syslog_ca_file, settings.syslog_client_certificate,
                              settings.syslog_client_private_key, key="audit.syslog")
    except ConfigError as exc:  # node.tls names "<key>.ca_file"; the config's keys are "audit.syslog_ca_file"
        raise ConfigError(str(exc).replace("audit.syslog.", "audit.syslog_")) from exc


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the collector closed or reset a stream connection. A syslog receiver sends no application data
    (RFC 6587, RFC 5425), so a readable socket means EOF, a reset, or noise that is read and dropped; reading
    through an `ssl.SSLSocket` also consumes TLS 1.3 session tickets and sees a close_notify as EOF. Without
    this, the first send after the peer's FIN succeeds into the kernel buffer and that record is lost unnoticed."""
    sock.setblocking(False)
    try:
        for _ in range(DRAIN_LIMIT):
            if not sock.recv(4096):
                return True
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False  # nothing (more) to read: the connection is open
    except OSError:
        return True  # ECONNRESET, a TLS alert
    finally:
        sock.settimeout(SEND_TIMEOUT_SECONDS)
    return False


class SyslogSender:
    """Sends RFC 5424 messages to ``host:port`` from a daemon thread. `send` never blocks or raises; failures go
    to ``on_error(reason)``. `close` stops the thread after the queue drained (up to ``timeout``). ``protocol``
    TLS needs ``ssl_context`` (see `tls_context`), whose certificate check is made against ``host``."""

    def __init__(self, host: str, port: int, protocol: SyslogProtocol, on_error: Callable[[str], None],
                 *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.protocol = host, port, SyslogProtocol(protocol)
        if (self.protocol is SyslogProtocol.TLS) != (ssl_context is not None):
            raise ValueError("ssl_context is needed with protocol 'tls' and only then")
        self._ssl_context = ssl_context
        self._on_error = on_error
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_SIZE)
        self._sock: socket.socket | None = None
        self._log = get_logger(component="audit")
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: AuditSection, on_error: Callable[[str], None]) -> SyslogSender:
        """A sender for ``[audit]`` (``syslog_host`` must be set); `ConfigError` for a TLS file that does not load."""
        if not settings.syslog_host:
            raise ValueError("settings.syslog_host is needed for a syslog sender")
        return cls(settings.syslog_host, settings.syslog_port, settings.syslog_protocol, on_error,
                   ssl_context=tls_context(settings))

    def send(self, message: bytes) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._on_error("syslog queue full")

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._disconnect()

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self._deliver(message)
            except OSError as exc:
                self._disconnect()
                reason = describe_tls_error(exc) if isinstance(exc, ssl.SSLError) else exc.strerror
                self._on_error(f"syslog {self.protocol.value} {self.host}:{self.port}: {reason or type(exc).__name__}")

    def _deliver(self, message: bytes) -> None:
        if self.protocol is SyslogProtocol.UDP:
            if self._sock is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(message, (self.host, self.port))
            return
        framed = f"{len(message)} ".encode("ascii") + message  # RFC 6587 3.4.1 / RFC 5425 4.3: MSG-LEN SP SYSLOG-MSG
        if self._sock is not None and _peer_closed(self._sock):
            self._disconnect()
        for attempt in (1, 2):  # a send that fails on an open-looking connection: reconnect once
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(framed)
                return
            except OSError:
                self._disconnect()
                if attempt == 2:
                    raise

    def _connect(self) -> socket.socket:
        """A new stream connection; for TLS the handshake is done (collector verified) before anything is sent."""
        sock = socket.create_connection((self.host, self.port), timeout=SEND_TIMEOUT_SECONDS)
        if self._ssl_context is None:
            return sock
        try:
            return self._ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


__all__ = ["Severity", "SyslogSender", "format_message", "tls_context"]
