"""systemd's end of sd_notify(3), as a peer: `NotifyListener` binds the Unix datagram socket a ``Type=notify``
service's ``NOTIFY_SOCKET`` names and records every message with the sender's pid (``SO_PASSCRED``, as systemd
reads it to apply ``NotifyAccess=main``)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peers.process import wait_until


@dataclass(frozen=True)
class Notification:
    """One datagram: when it arrived (monotonic seconds), the sending pid, its ``KEY=VALUE`` lines in order."""

    at: float
    pid: int
    lines: tuple[str, ...]

    def get(self, key: str) -> str | None:
        return next((line.split("=", 1)[1] for line in self.lines if line.startswith(f"{key}=")), None)


class NotifyListener:
    """Listens on ``address`` (a file path, or ``@name`` in the abstract namespace) until `close`; `env` is what a
    service started by it gets (``NOTIFY_SOCKET``, and ``WATCHDOG_USEC`` with ``watchdog_seconds``)."""

    def __init__(self, address: str, *, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address}
        if self.watchdog_seconds is not None:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_seconds * 1e6))
        return env

    def _receive(self) -> None:
        creds = socket.CMSG_SPACE(struct.calcsize("iII"))
        while not self._closed.is_set():
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(65536, creds)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((struct.unpack("iII", cdata[:12])[0] for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            note = Notification(time.monotonic(), pid, tuple(data.decode().split("\n")))
            with self._lock:
                self._received.append(note)

    @property
    def received(self) -> list[Notification]:
        with self._lock:
            return list(self._received)

    def with_line(self, line: str, *, after: float = 0.0) -> list[Notification]:
        """The messages since ``after`` (monotonic) holding ``line`` (e.g. ``READY=1``)."""
        return [n for n in self.received if n.at >= after and line in n.lines]

    def wait_for(self, line: str, timeout: float, *, after: float = 0.0, count: int = 1) -> Notification:
        """The ``count``-th message since ``after`` holding ``line``; `PeerTimeoutError` after ``timeout`` s."""
        def enough() -> list[Notification]:
            hits = self.with_line(line, after=after)
            return hits if len(hits) >= count else []

        found = wait_until(enough, timeout, f"{count} sd_notify message(s) with {line}",
                           lambda: "received: " + repr([n.lines for n in self.received][-20:]))
        return found[count - 1]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)
