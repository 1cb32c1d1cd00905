"""DCMTK as the modality and as a plain receiver: `storescu`, `echoscu` (one association each) and `StoreScp`.

Every call runs with ``TCP_NODELAY=1`` (docs/peers.md) and raises `PeerMissingError` when the tool is not installed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from peers.process import PeerError, PeerProcess, find_tool, free_port, peer_env, wait_for_port


def storescu(
    port: int, *paths: Path | str, called_ae: str = "PACSNODE", calling_ae: str = "STORESCU",
    host: str = "127.0.0.1", options: Sequence[str] = (), check: bool = False, timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``paths`` (files, or folders scanned recursively) over one association; ``options`` go before the
    address (e.g. ``-R``, ``-xs``, ``+tls KEY CERT``). Returns the finished process (storescu exits with a
    refusal's status high byte); with ``check``, raises `PeerError` naming its stderr unless it exited 0."""
    cmd = [find_tool("storescu"), "-aet", calling_ae, "-aec", called_ae, *options, "+sd", "+r", host, str(port),
           *map(str, paths)]
    return _run(cmd, check, timeout)


def store_responses(port: int, folder: Path, *, calling_ae: str, called_ae: str, timeout: float = 180.0) -> dict[str, str]:
    """``storescu -v`` of every file under ``folder`` over one association → {file: store response} for the files it
    got an answer for (a node killed mid-transfer leaves the rest unanswered; storescu's exit status is not
    checked)."""
    return store_responses_of(port, [folder], calling_ae=calling_ae, called_ae=called_ae, timeout=timeout)


def store_responses_of(port: int, paths: Sequence[Path | str], *, calling_ae: str, called_ae: str,
                       timeout: float = 180.0) -> dict[str, str]:
    """`store_responses` for files and folders: ``storescu -v`` of ``paths`` over one association."""
    done = subprocess.run(
        [find_tool("storescu"), "-v", "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, env=peer_env(), timeout=timeout, check=False,
    )
    answers: dict[str, str] = {}
    current = None
    for line in (done.stdout + done.stderr).splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif (m := re.search(r"Received Store Response \((.*)\)", line)) and current is not None:
            answers[current] = m.group(1)
            current = None
    return answers


def echoscu(
    port: int, *, called_ae: str = "PACSNODE", calling_ae: str = "ECHOSCU", host: str = "127.0.0.1",
    options: Sequence[str] = (), check: bool = False, timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO; like `storescu` otherwise."""
    return _run([find_tool("echoscu"), "-aet", calling_ae, "-aec", called_ae, *options, host, str(port)], check,
                timeout)


def _run(cmd: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise PeerError(f"{Path(cmd[0]).name} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


class StoreScp(PeerProcess):
    """DCMTK ``storescp`` as ``aet`` on ``port`` (0: a free one), storing every instance into ``out_dir`` and
    knowing nothing else (no Storage Commitment, no fsync). ``options`` e.g. ``+xa`` (accept all transfer
    syntaxes). `start()` returns once it listens; `stop()` is by PID."""

    def __init__(self, out_dir: Path, *, aet: str = "STORESCP", port: int = 0, options: Sequence[str] = (),
                 log_path: Path | None = None) -> None:
        self.executable = find_tool("storescp")
        self.out_dir = Path(out_dir)
        self.aet = aet
        self.port = port or free_port()
        self.options = tuple(options)
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float = 60.0) -> StoreScp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn([self.executable, "-aet", self.aet, "-od", str(self.out_dir), *self.options,
                            str(self.port)], cwd=None, env=peer_env())
        self._ready_or_stop(lambda: wait_for_port(self.port, timeout, proc, "storescp", self.log_tail))
        return self
