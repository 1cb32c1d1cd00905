"""The demo's PACS: `peers.orthanc.OrthancServer` set up for the demo (DICOMweb on, DICOM only from known peers)."""

from __future__ import annotations

from pathlib import Path

from demo.common import MODALITY_AET, NODE_AET, ORTHANC_AET
from peers.orthanc import OrthancServer


def demo_orthanc(workdir: Path, *, dicom_port: int, http_port: int, node_port: int) -> OrthancServer:
    """Orthanc over ``workdir`` on the given ports (0: free ones), not started: its DICOMweb plugin required,
    HTTP for local clients, and — since Orthanc 1.10 cannot bind to loopback — DICOM only from the node and the
    demo's scanner, from their own host. Raises `peers.PeerMissingError` when Orthanc or the plugin is missing."""
    return OrthancServer(
        workdir, aet=ORTHANC_AET, name="PACSNODE-DEMO", dicom_port=dicom_port, http_port=http_port, dicomweb=True,
        modalities={"node": (NODE_AET, "127.0.0.1", node_port), "scanner": (MODALITY_AET, "127.0.0.1", 104)},
        config={"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True},
    )
