"""What the demo's pieces share: paths, AE titles, proxy headers and `DemoError` (peers/ runs the processes)."""

from __future__ import annotations

from pathlib import Path

from peers.orthanc import DICOMWEB_ROOT

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo"
OHIF_VERSION = "3.13.2"
DICOMWEB_PATH = DICOMWEB_ROOT  # the viewer proxies what Orthanc serves there
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

