"""Audit records to a syslog collector as RFC 5424 messages, over UDP (RFC 5426) or TCP (RFC 6587 octet counting).

`format_message(...)` builds one message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] BOM MSG``
(Python's ``SysLogHandler`` writes the older BSD format, so the header is written here). `SyslogSender` sends
messages from its own thread through a bounded queue, so a slow or absent collector never delays the caller;
a message that cannot be queued or sent is reported to ``on_error`` (the audit trail counts and logs it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import socket
import threading
from collections.abc import Callable, Mapping

from node.config import SyslogProtocol
from node.logs import get_logger

APP_NAME = "pacsnode"
SD_ID = "pacsnode@32473"  # 32473: the private enterprise number RFC 5612 reserves for examples/documentation
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark
QUEUE_SIZE = 10_000
SEND_TIMEOUT_SECONDS = 5.0
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


class SyslogSender:
    """Sends RFC 5424 messages to ``host:port`` from a daemon thread. `send` never blocks or raises; failures go
    to ``on_error(reason)``. `close` stops the thread after the queue drained (up to ``timeout``)."""

    def __init__(self, host: str, port: int, protocol: SyslogProtocol, on_error: Callable[[str], None]) -> None:
        self.host, self.port, self.protocol = host, port, SyslogProtocol(protocol)
        self._on_error = on_error
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_SIZE)
        self._sock: socket.socket | None = None
        self._log = get_logger(component="audit")
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

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
                self._on_error(f"syslog {self.protocol.value} {self.host}:{self.port}: {exc.strerror or type(exc).__name__}")

    def _deliver(self, message: bytes) -> None:
        if self.protocol is SyslogProtocol.UDP:
            if self._sock is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(message, (self.host, self.port))
            return
        framed = f"{len(message)} ".encode("ascii") + message
        for attempt in (1, 2):  # a collector that restarted closed our connection: reconnect once
            try:
                if self._sock is None:
                    self._sock = socket.create_connection((self.host, self.port), timeout=SEND_TIMEOUT_SECONDS)
                self._sock.sendall(framed)
                return
            except OSError:
                self._disconnect()
                if attempt == 2:
                    raise

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


__all__ = ["Severity", "SyslogSender", "format_message"]
