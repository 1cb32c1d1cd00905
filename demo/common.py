"""What the demo's pieces share: paths, ports and AE titles, `DemoError`, and process helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo"
OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_PATH = "/dicom-web"
WADO_PATH = "/wado"
NODE_AET, ORTHANC_AET, MODALITY_AET = "PACSNODE", "ORTHANC", "DEMO-CT"
PHANTOM_SEED = 20240917
# Response headers that belong to one hop, never forwarded by the proxy (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-connection"}
)
# Cross-origin isolation lets the viewer use SharedArrayBuffer (its decoders and volume loader).
ISOLATION_HEADERS = ((b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp"))


class DemoError(Exception):
    """A demo piece could not start (missing tool, port, download) or results did not arrive in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    while True:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"{what} does not listen on port {port}") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM by PID, wait up to ``timeout``, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peer_env() -> dict[str, str]:
    # TCP_NODELAY=1: DCMTK-based peers (storescu, Orthanc) stall every small C-STORE otherwise (see docs/peers.md).
    return {**os.environ, "TCP_NODELAY": "1"}

