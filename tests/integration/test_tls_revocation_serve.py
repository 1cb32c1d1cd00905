"""Revocation and AE titles bound to certificates end to end: a `pacsnode serve` process (supervisor and listener
child, the config passed to it as a snapshot) with DICOM TLS and HTTPS, DCMTK echoscu and curl as its peers. A CRL
file replaced while it runs refuses the revoked certificate at the next connection on both ports, and still does
after a SIGHUP reload; the calling AE title bound to the certificate is the only one it may use.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
from pathlib import Path

import pytest

from peers.pacsnode import NodeProcess
from tests.conftest import free_port, peer_env, require_tool, wait_until
from tests.tlscerts import Pki, make_pki
from tests.tlsrevocation import crl_pem, write_crl

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _echo(pki: Pki, node: NodeProcess, port: int, calling_ae: str) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("echoscu"), "-aet", calling_ae, "-aec", node.ae_title, "+tls", str(pki.client_key),
           str(pki.client_cert), "-pw", "+cf", str(pki.ca), "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=60)


def _https(pki: Pki, node: NodeProcess) -> str:
    cmd = [require_tool("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "--cacert",
           str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key),
           f"https://localhost:{node.http_port}/healthz"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()


def _crl_next_update(pki: Pki, node: NodeProcess) -> float:
    """``pacsnode_tls_crl_next_update_seconds`` of the test CA's CRL, from the node's /metrics (with a certificate
    the CRL in force does not revoke)."""
    cmd = [require_tool("curl"), "-sS", "--max-time", "20", "--cacert", str(pki.ca), "--cert", str(pki.client_cert),
           "--key", str(pki.client_key), "-H", "Authorization: Bearer revocation-test-token",
           f"https://localhost:{node.http_port}/metrics"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    return float(next(line for line in text.splitlines()
                      if line.startswith("pacsnode_tls_crl_next_update_seconds{")).rsplit(" ", 1)[1])


def test_serve_follows_the_crl_and_binds_the_calling_ae(start_node, pki: Pki, tmp_path: Path) -> None:
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=NOW - dt.timedelta(hours=2)))
    tls_port = free_port()
    node = start_node(extra_toml=(
        'dicomweb_token = "revocation-test-token"\n[worker]\nenabled = false\n'
        f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\nca_file = "{pki.ca}"\n'
        f'client_certificates = "required"\ndimse_port = {tls_port}\nhttps = true\ncrl_file = "{crl}"\n'
        '[tls.calling_ae_certificates]\nMODALITY = "localhost"\n'  # the test client's SAN DNS name
    ))
    assert _echo(pki, node, tls_port, "MODALITY").returncode == 0
    other = _echo(pki, node, tls_port, "OTHER")  # the same certificate, another AE title
    assert other.returncode != 0 and "Calling AE Title Not Recognized" in other.stderr, other.stderr
    assert _https(pki, node) == "200"
    # the countdown an alert watches: this CRL's next update is a day after its last update, NOW - 2 h (NOW is when
    # the module was imported, minutes ago under a loaded CI run)
    due = (NOW + dt.timedelta(hours=22) - dt.datetime.now(dt.UTC)).total_seconds()
    assert due - 60 < _crl_next_update(pki, node) <= due + 1

    write_crl(crl, crl_pem(pki, (pki.client_cert,), last_update=NOW - dt.timedelta(hours=1)))
    assert _echo(pki, node, tls_port, "MODALITY").returncode != 0
    assert _https(pki, node) == "000"
    wait_until(lambda: "certificate revoked" in node.log_text(), 10, "the refusal logged",
               lambda: node.log_text()[-2000:])

    node.proc.send_signal(signal.SIGHUP)  # a reload changes nothing about it
    wait_until(lambda: "config_reloaded" in node.log_text(), 30, "the reload", lambda: node.log_text()[-2000:])
    assert _echo(pki, node, tls_port, "MODALITY").returncode != 0
    assert _https(pki, node) == "000"
