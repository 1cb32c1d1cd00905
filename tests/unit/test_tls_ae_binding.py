"""Calling AE titles bound to client certificates ([tls] calling_ae_certificates; node/tls.py calling_ae_refusal,
node/dimse.py's EVT_REQUESTED handler): on the DICOM TLS port a peer with scanner A's certificate cannot associate
as scanner B (A-ASSOCIATE-RJ permanent, calling AE title not recognised — DCMTK echoscu and a pynetdicom AE as the
peers), nor as an AE title bound to nothing; on the plaintext port a bound AE title is refused. Each rejection is
logged with why and audited like any other.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from node.config import TlsSection
from tests.conftest import wait_until
from tests.tlscerts import Pki, make_pki
from tests.tlsrevocation import AuditedTlsNode, echo, issue

BOUND = {"CT_A": ["ct-a.radiology.example.org"], "CT_B": "CT-B Scanner"}  # A by SAN DNS name, B by subject CN


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def scanner(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("scanners")
    return {"A": issue(pki, folder, "a", cn="CT-A", dns=("CT-A.radiology.example.org", "ct-a.local")),
            "B": issue(pki, folder, "b", cn="ct-b scanner")}


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[AuditedTlsNode]:
    made = AuditedTlsNode(tmp_path, pki, calling_ae_certificates=BOUND)
    yield made
    made.stop()


def test_the_table_needs_the_dicom_tls_port_and_required_certificates(pki: Pki) -> None:
    base = {"certificate": pki.server_cert, "private_key": pki.server_key, "ca_file": pki.ca}
    with pytest.raises(ValueError, match="calling_ae_certificates needs dimse_port"):
        TlsSection(**base, https=True, client_certificates="required", calling_ae_certificates=BOUND)
    with pytest.raises(ValueError, match="calling_ae_certificates needs dimse_port"):
        TlsSection(**base, dimse_port=2762, client_certificates="optional", calling_ae_certificates=BOUND)
    with pytest.raises(ValueError, match="at least 1 item"):
        TlsSection(**base, dimse_port=2762, client_certificates="required", calling_ae_certificates={"CT_A": []})
    with pytest.raises(ValueError, match="String should match pattern"):
        TlsSection(**base, dimse_port=2762, client_certificates="required",
                   calling_ae_certificates={"CT_A": "*.example.org"})
    tls = TlsSection(**base, dimse_port=2762, client_certificates="required", calling_ae_certificates=BOUND)
    assert tls.calling_ae_certificates["CT_B"] == ("CT-B Scanner",)


def test_each_certificate_associates_only_as_its_own_ae_title(
    node: AuditedTlsNode, pki: Pki, scanner: dict[str, tuple[Path, Path]]
) -> None:
    assert echo(pki, node.tls_port, "CT_A", scanner["A"]).returncode == 0  # SAN DNS name, any case
    assert echo(pki, node.tls_port, "CT_B", scanner["B"]).returncode == 0  # subject CN, any case
    with capture_logs() as logs:
        for calling, cert in (("CT_B", "A"), ("CT_A", "B"), ("WORKSTATION", "A")):
            claimed = echo(pki, node.tls_port, calling, scanner[cert])
            assert claimed.returncode != 0
            assert "Association Rejected" in claimed.stderr and "Calling AE Title Not Recognized" in claimed.stderr, \
                claimed.stderr
        rejected = wait_until(lambda: len(r := [e for e in logs if e["event"] == "association_rejected"]) >= 3 and r,
                              5, "three rejections logged")
    assert [(e["calling_ae"], e["why"]) for e in rejected] == [
        ("CT_B", "client certificate does not name the calling AE title's peer"),
        ("CT_A", "client certificate does not name the calling AE title's peer"),
        ("WORKSTATION", "calling AE title is bound to no certificate"),
    ]
    audited = wait_until(lambda: len(a := node.audited("association_rejected")) >= 3 and a, 5, "three audited")
    assert len(audited) == 3
    assert node.config.node.spool_dir.exists() is False or not any(node.config.node.spool_dir.rglob("*.dcm"))


def test_a_bound_ae_title_is_refused_on_the_plaintext_port(
    node: AuditedTlsNode, pki: Pki, scanner: dict[str, tuple[Path, Path]]
) -> None:
    with capture_logs() as logs:
        plain = echo(pki, node.port, "CT_A", None)
        assert plain.returncode != 0 and "Calling AE Title Not Recognized" in plain.stderr, plain.stderr
    assert [e["why"] for e in logs if e["event"] == "association_rejected"] == [
        "calling AE title is bound to a certificate: DICOM TLS only"]
    assert echo(pki, node.port, "WORKSTATION", None).returncode == 0  # unbound titles: as the allow-list says


def test_pynetdicom_peer_gets_a_permanent_calling_ae_rejection(
    node: AuditedTlsNode, pki: Pki, scanner: dict[str, tuple[Path, Path]]
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(*scanner["A"])
    ae = AE(ae_title="CT_B")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="PACSNODE", tls_args=(ctx, "localhost"))
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    ae.ae_title = "CT_A"
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="PACSNODE", tls_args=(ctx, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
