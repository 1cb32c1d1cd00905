"""GDCM's ``gdcmscu`` as a second modality next to DCMTK: C-ECHO and C-STORE over one association each.

Debian's gdcm 3.0.21 ``gdcmscu`` aborts (SIGABRT, "ProtocolStream as nullptr is invalid") at the end of every run:
after a released association, against DCMTK's storescp as much as against the node, and equally after a connection
it could not open. Its exit status therefore says nothing; judge a run by what the receiver stored and logged.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peers.process import find_tool, peer_env

TEARDOWN_ABORT = "ProtocolStream as nullptr is invalid"


@dataclass(frozen=True)
class GdcmRun:
    returncode: int
    output: str

    @property
    def connected(self) -> bool:
        """False when gdcmscu says it could not open the connection."""
        return "Unable to open connection" not in self.output

    @property
    def crashed_otherwise(self) -> bool:
        """A non-zero exit other than the known abort (see the module docstring)."""
        known = self.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) and TEARDOWN_ABORT in self.output
        return self.returncode != 0 and not known


def gdcmscu(
    port: int, operation: str, *, called_ae: str = "PACSNODE", calling_ae: str = "GDCMSCU", host: str = "127.0.0.1",
    inputs: Sequence[Path | str] = (), recursive: bool = False, timeout: float = 300.0,
) -> GdcmRun:
    """``gdcmscu --echo`` or ``--store`` of ``inputs`` (files or, with ``recursive``, folders) in one association,
    with warnings on (``-W``: a refused C-STORE is printed). Raises `PeerMissingError` when not installed."""
    if operation not in ("echo", "store"):
        raise ValueError(f"operation must be 'echo' or 'store', not {operation!r}")
    cmd = [find_tool("gdcmscu"), "-W", f"--{operation}", "--aetitle", calling_ae, "--call", called_ae]
    if recursive:
        cmd.append("-r")
    for path in inputs:
        cmd += ["-i", str(path)]
    cmd += [host, str(port)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=timeout, check=False)
    return GdcmRun(done.returncode, done.stdout + done.stderr)
