"""Child processes and waiting: free ports, a condition with a deadline, the peers' environment, start/stop by PID."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self, TypeVar

T = TypeVar("T")


class PeerError(RuntimeError):
    """A peer could not start, answer or stop as asked."""


class PeerMissingError(PeerError):
    """A peer tool or file is not installed (the tests skip locally and fail under CI on it)."""


class PeerTimeoutError(PeerError, TimeoutError):
    """A condition did not come true before its deadline."""


def find_tool(name: str) -> str:
    """The path of an executable on PATH or in /usr/sbin (Debian's Orthanc); raises `PeerMissingError`."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise PeerMissingError(f"{name} is not installed (make sysdeps installs it when run as root)")
    return path


_handed_out: set[int] = set()


def _port_share() -> tuple[int, int]:
    """(this test worker's index, the number of workers) under pytest-xdist; (0, 1) otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return (int(worker[2:]) % count if worker.startswith("gw") and worker[2:].isdigit() else 0), max(count, 1)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _listening_range() -> tuple[int, int]:
    """Where test peers listen: below the kernel's ephemeral range (never handed to an outgoing connection's
    local end, which would make a later bind fail with EADDRINUSE for as long as that connection lives — a pooled
    PostgreSQL connection, say), from 20000; the ephemeral range itself when that leaves too few ports."""
    low, high = _ephemeral_range()
    return (20000, low - 1) if low - 20000 >= 4096 else (low, high)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now that this process has not handed out before.

    Between this call and the peer's bind another process could be given the same port: the ports tried are
    random ones below the kernel's ephemeral range (`_listening_range`), so at least no outgoing connection can
    take it meanwhile, and under pytest-xdist each worker tries only ports of its own residue (``port % workers ==
    index``), so two test workers never race for one port."""
    share, workers = _port_share()
    low, high = _listening_range()
    for _ in range(10_000):
        candidate = random.randrange(low, high + 1 - workers)
        port = candidate - candidate % workers + share
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise PeerError("no free TCP port left for this test worker")


def peer_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc peers: ``TCP_NODELAY=1`` (docs/peers.md: Nagle stalls every small C-STORE)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] | None = None,
    *,
    interval: float = 0.05,
    process: subprocess.Popen[bytes] | None = None,
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and return that.

    Raises `PeerTimeoutError` naming ``what`` after ``timeout`` seconds, or `PeerError` as soon as ``process`` (when
    given) has exited; either message ends with ``diagnostics()`` (e.g. a log's tail) when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise PeerError(f"gave up waiting for {what}: the process exited with {process.returncode}"
                            + _tail(diagnostics))
        if time.monotonic() > deadline:
            raise PeerTimeoutError(f"timed out after {timeout:g} s waiting for {what}" + _tail(diagnostics))
        time.sleep(interval)


def _tail(diagnostics: Callable[[], str] | None) -> str:
    text = diagnostics() if diagnostics is not None else ""
    return "\n" + text.lstrip("\n") if text else ""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None,
                  what: str = "a listener", diagnostics: Callable[[], str] | None = None) -> None:
    """Return once something listens on 127.0.0.1:``port``; `wait_until`'s errors otherwise."""
    wait_until(lambda: port_open(port), timeout, f"{what} on port {port}", diagnostics, process=process)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """Stop by PID: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Nothing to do if it already ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class PeerProcess:
    """A peer run as a child process in its own session (a terminal's Ctrl-C reaches only its owner, who stops
    it in order), its output in ``log_path``; `start()` (subclasses) returns once it answers, `stop()` is by PID.
    Usable as a context manager."""

    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    append_log = True  # keep earlier runs' output when restarted

    def _spawn(self, args: Sequence[str], *, cwd: Path | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
        if self.running:
            raise PeerError(f"{args[0]} is already running")
        log = self.log_path.open("ab" if self.append_log else "wb") if self.log_path else None
        try:
            self.proc = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=log or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                log.close()
        return self.proc

    def _ready_or_stop(self, wait: Callable[[], object]) -> None:
        """Run ``wait`` (raising until the peer answers); if it raises, stop the peer and re-raise."""
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def start(self, timeout: float = 60.0) -> Self:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop by PID (SIGTERM, SIGKILL after ``timeout`` seconds); a later `start()` runs it again. ``proc`` stays
        set while it stops, so `kill()` (from a second Ctrl-C's handler) can still reach it."""
        stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL at once (a second Ctrl-C); `stop()` still cleans up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return f"--- {self.log_path} (tail) ---\n{self.log_text()[-chars:]}" if self.log_path else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
