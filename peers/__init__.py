"""Real peers for the tests, the demo and the benchmarks: one harness, used by all three.

- `peers.process`: `free_port`, `wait_until` (a condition with a deadline, no fixed sleeps), `wait_for_port`,
  `peer_env` (``TCP_NODELAY=1``), `find_tool`, start/stop by PID (`PeerProcess`, `stop_process`), and the errors
  `PeerError` > `PeerMissingError` (a tool is not installed), `PeerTimeoutError`.
- `peers.orthanc`: `OrthancServer` (TLS, DICOMweb plugin, REST helpers), `OrthancTls`, `DICOMWEB_PLUGIN`.
- `peers.pacsnode`: `NodeProcess` (`pacsnode serve` as a child process) and `launch_node`.
- `peers.dcmtk`: `storescu`, `echoscu`, `StoreScp`.
- `peers.gdcm`: `gdcmscu` (GDCM's sender; its exit status says nothing, see there).
- `peers.postgres`: `PostgresServer`, a throwaway PostgreSQL cluster.
- `peers.ctgen`: `write_ct_series`, a small valid CT series (pydicom).

`node/` never imports this package, and this package never imports ``tests/`` (tests/unit/test_packaging.py);
pytest's skip-or-fail policy for a missing peer stays in tests/conftest.py, which turns `PeerMissingError` into it.
"""

from peers.dcmtk import StoreScp, echoscu, storescu
from peers.orthanc import DICOMWEB_PLUGIN, DICOMWEB_ROOT, OrthancServer, OrthancTls
from peers.pacsnode import REPO, NodeProcess, launch_node, node_env
from peers.process import (
    PeerError,
    PeerMissingError,
    PeerProcess,
    PeerTimeoutError,
    find_tool,
    free_port,
    peer_env,
    port_open,
    stop_process,
    wait_for_port,
    wait_until,
)

__all__ = [
    "DICOMWEB_PLUGIN", "DICOMWEB_ROOT", "REPO", "NodeProcess", "OrthancServer", "OrthancTls", "PeerError",
    "PeerMissingError", "PeerProcess", "PeerTimeoutError", "StoreScp", "echoscu", "find_tool", "free_port", "launch_node",
    "node_env", "peer_env", "port_open", "stop_process", "storescu", "wait_for_port", "wait_until",
]
