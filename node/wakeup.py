"""Wake-ups between the processes of one node on one host, so work made in one process starts at once in another.

In one process the stages wake each other with events (completion → worker, worker → dispatcher). Across
processes (``process_model = "processes"``, or roles started by hand on the same host and data directory) the
consumers poll the database every ``[node] wake_poll_seconds``; this module removes that wait where it can:

- a consumer (the worker role, the dispatcher role) binds a Unix datagram socket
  ``<data_dir>/run/<kind>-<host>-<pid>.sock`` and calls its wake function (the same one the in-process events use)
  for every datagram;
- a producer (a listener's completion, the worker after committing results, the admin page's resend) sends one
  byte to every socket of that kind and host in the folder after its transaction committed. A socket nobody
  listens on any more (its process died) refuses the datagram and is removed; a full socket buffer means a wake-up
  is already pending, so the datagram is dropped. The host name in the name keeps a data directory that several
  hosts mount (a Unix socket reaches only its own kernel) from having one host remove another's sockets.

It is only a hint: the database stays the truth and the consumers keep polling, so a lost wake-up costs at most
one poll interval, and processes on other hosts (their own data directories) are reached by the poll alone. The
sockets are bound through ``/proc/self/fd/<folder fd>/…`` so a long data directory path cannot exceed the
108-byte limit of a Unix socket address (Linux only, as the node is; elsewhere `listen` returns False and the
poll remains). The folder is the data directory's, so only who may write there can wake a process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from node.logs import get_logger

WORKER = "worker"
DISPATCHER = "dispatcher"
_SUFFIX = ".sock"


def _host() -> str:
    """This host's name as it goes into socket names (no path separators, bounded length)."""
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in socket.gethostname())[:32] or "host"


class Wakeups:
    """The wake-up sockets of one process under ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log = get_logger(component="wakeup")
        self._fd: int | None = None
        self._out: socket.socket | None = None
        self._listening: list[tuple[socket.socket, str]] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def _folder(self) -> int:
        with self._lock:
            if self._fd is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
                self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._out.setblocking(False)
            return self._fd

    def _address(self, name: str) -> str:
        return f"/proc/self/fd/{self._folder()}/{name}"

    def listen(self, kind: str, on_wake: Callable[[], None]) -> bool:
        """Call ``on_wake`` for every wake-up of ``kind`` sent to this process, from a daemon thread. Returns
        False (and the process keeps polling only) when the socket cannot be made."""
        name = f"{kind}-{_host()}-{os.getpid()}{_SUFFIX}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.run_dir / name)  # a socket an earlier process with this pid left
            sock.bind(self._address(name))
        except OSError as exc:
            sock.close()
            self.log.warning("wakeup_unavailable", kind=kind, error=str(exc))
            return False
        sock.settimeout(1.0)  # so close() ends the thread within a second
        self._listening.append((sock, name))
        threading.Thread(target=self._receive, args=(sock, on_wake), name=f"wakeup-{kind}", daemon=True).start()
        return True

    def _receive(self, sock: socket.socket, on_wake: Callable[[], None]) -> None:
        while not self._closed.is_set():
            try:
                sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                on_wake()
            except Exception as exc:  # noqa: BLE001 - a wake-up is a hint: the poll still finds the work
                self.log.error("wakeup_failed", error=f"{type(exc).__name__}: {exc}")

    def notify(self, kind: str) -> int:
        """Wake every process listening for ``kind`` in this folder; returns how many were reached. Never raises."""
        reached = 0
        try:
            prefix = f"{kind}-{_host()}-"
            names = [e.name for e in os.scandir(self.run_dir) if e.name.startswith(prefix) and e.name.endswith(_SUFFIX)]
        except OSError:
            return 0
        for name in names:
            try:
                address = self._address(name)
                assert self._out is not None
                self._out.sendto(b"!", address)
                reached += 1
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    os.unlink(self.run_dir / name)  # its process is gone
            except OSError:
                pass  # buffer full (a wake-up is pending already) or the folder gone: the poll covers it
        return reached

    def close(self) -> None:
        """Stop listening and remove this process's sockets."""
        self._closed.set()
        for sock, name in self._listening:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / name)
        self._listening.clear()
        with self._lock:
            if self._out is not None:
                self._out.close()
                self._out = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
