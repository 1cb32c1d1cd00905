"""TLS end to end: a `pacsnode serve` process with DICOM TLS and HTTPS (client certificates required), DCMTK and
curl as its peers; the node's senders delivering over TLS to Orthanc (DICOM TLS) and to an HTTPS STOW-RS server.

Orthanc 1.10.1 as packaged by Debian crashes (SIGSEGV, civetweb with OpenSSL 3) on the first HTTPS request, so the
HTTPS STOW-RS destination here is the node's own HTTPS front door (uvicorn), checked independently with curl.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.config import Destination
from node.senders import DimseSender, StowSender, TransientSendError
from peers.orthanc import OrthancServer, OrthancTls
from tests.conftest import NodeProcess, free_port, peer_env, require_tool, wait_until
from tests.ctgen import write_ct_series
from tests.tlscerts import Pki, make_pki

pytestmark = pytest.mark.integration

TOKEN = "tls-test-token"
BOUNDARY = "pacsnode-tls-boundary"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _node_toml(pki: Pki, tls_port: int) -> str:
    return (
        f'dicomweb_token = "{TOKEN}"\n'
        "[worker]\nenabled = false\n"
        f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\nca_file = "{pki.ca}"\n'
        f'client_certificates = "required"\ndimse_port = {tls_port}\nhttps = true\n'
    )


def _dcmtk(tool: str, pki: Pki, node: NodeProcess, port: int, *files: str) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool(tool), "-aet", "MODALITY", "-aec", node.ae_title, "+tls", str(pki.client_key),
           str(pki.client_cert), "-pw", "+cf", str(pki.ca), "127.0.0.1", str(port), *files]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=60)


def _stow_body(path: Path, folder: Path) -> Path:
    body = folder / "stow.body"
    body.write_bytes(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
                     + f"\r\n--{BOUNDARY}--\r\n".encode())
    return body


def _curl(url: str, *args: str) -> tuple[int, str]:
    """(curl's exit status, the HTTP status code it got or '000')."""
    cmd = [require_tool("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.strip()


def _spooled(node: NodeProcess) -> set[str]:
    return {p.stem for p in node.spool.rglob("*.dcm")}


def test_node_over_dicom_tls_and_https(start_node, pki: Pki, tmp_path: Path) -> None:
    tls_port = free_port()
    node = start_node(extra_toml=_node_toml(pki, tls_port))
    series = write_ct_series(tmp_path / "ct", slices=4)

    # DICOM TLS: DCMTK with a client certificate and the right CA
    echo = _dcmtk("echoscu", pki, node, tls_port)
    assert echo.returncode == 0, echo.stderr
    store = _dcmtk("storescu", pki, node, tls_port, *map(str, series.paths[:2]))
    assert store.returncode == 0, store.stderr
    assert set(series.sop_uids[:2]) <= _spooled(node)

    # HTTPS STOW-RS with curl: the token and a client certificate
    url = f"https://127.0.0.1:{node.http_port}/dicomweb/studies"
    trust = ("--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key))
    stow = ("-X", "POST", "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "--data-binary", f"@{_stow_body(series.paths[2], tmp_path)}")
    assert _curl(url, *trust, *stow, "-H", f"Authorization: Bearer {TOKEN}") == (0, "200")
    assert series.sop_uids[2] in _spooled(node)
    assert _curl(url, *trust, *stow) == (0, "401")  # no token
    assert _curl(url, "--cacert", str(pki.ca), *stow, "-H", f"Authorization: Bearer {TOKEN}")[1] == "000"  # no cert
    assert _curl(url, "--cacert", str(pki.other_ca), *trust[2:], *stow)[1] == "000"  # wrong CA
    plain = _curl(f"http://127.0.0.1:{node.http_port}/healthz")
    assert plain[0] != 0 and plain[1] == "000", plain  # plain HTTP on the HTTPS port gets no HTTP answer

    # The node's StowSender to an HTTPS STOW-RS destination (the node itself), verified against the CA
    dest = Destination(name="web", kind="dicomweb", url=f"https://127.0.0.1:{node.http_port}/dicomweb",
                       token=TOKEN, ca_file=pki.ca, client_certificate=pki.client_cert,
                       client_private_key=pki.client_key)
    StowSender(20).send(dest, [series.paths[3]])
    assert series.sop_uids[3] in _spooled(node)
    with pytest.raises(TransientSendError, match="TLS handshake failed: certificate verify failed"):
        StowSender(20).send(dest.model_copy(update={"ca_file": pki.other_ca}), [series.paths[3]])
    # TLS settings are restart-only: a reload that drops the client-certificate requirement is noted, not applied
    node.config_path.write_text(node.config_path.read_text().replace('client_certificates = "required"',
                                                                     'client_certificates = "none"'))
    node.proc.send_signal(signal.SIGHUP)
    reloaded = wait_until(lambda: [e for e in _events(node) if e.get("event") == "config_reloaded"], 20,
                          "the node to reload its config")
    assert "tls" in reloaded[0]["needs_restart"]
    no_cert = subprocess.run([require_tool("echoscu"), "-aec", node.ae_title, "+tla", "+cf", str(pki.ca),
                              "127.0.0.1", str(tls_port)], capture_output=True, text=True, env=peer_env(), timeout=60)
    assert no_cert.returncode != 0, no_cert.stderr
    assert "Traceback" not in node.log_text()


def _events(node: NodeProcess) -> list[dict[str, Any]]:
    events = []
    for line in node.log_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def test_dimse_destination_over_tls_at_orthanc(orthanc_factory, pki: Pki) -> None:
    orthanc: OrthancServer = orthanc_factory(tls=OrthancTls(pki.server_cert, pki.server_key, pki.ca))
    source = Path(str(pydicom.data.get_testdata_file("CT_small.dcm")))
    sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    dest = Destination(name="orthanc", kind="dimse", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port,
                       tls=True, ca_file=pki.ca, client_certificate=pki.client_cert, client_private_key=pki.client_key)
    DimseSender("PACSNODE", 20).send(dest, [source])
    wait_until(lambda: sop_uid in orthanc.sop_instance_uids(), 10, "the instance at Orthanc")
    orthanc.clear()
    with pytest.raises(TransientSendError, match="TLS handshake failed: certificate verify failed"):
        DimseSender("PACSNODE", 20).send(dest.model_copy(update={"ca_file": pki.other_ca}), [source])
    no_client_cert = dest.model_copy(update={"client_certificate": None, "client_private_key": None})
    with pytest.raises(TransientSendError, match="failed"):  # Orthanc requires a client certificate
        DimseSender("PACSNODE", 20).send(no_client_cert, [source])
    assert orthanc.sop_instance_uids() == []
    assert "tlsv1 alert unknown ca" in orthanc.log_text()  # Orthanc saw the node refuse its certificate
