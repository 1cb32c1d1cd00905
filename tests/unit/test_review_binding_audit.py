"""Review: a DICOM TLS peer whose certificate claims another scanner's AE title (``[tls] calling_ae_certificates``)
was audited as any rejection, "calling or called AE title not accepted": the reason an auditor needs - the
certificate does not match the calling AE title - was only in the log's ``why``. The 110114 record carries it now.
Fixtures: tests/unit/test_tls_ae_binding.py (a real DICOM TLS listener, DCMTK echoscu with each scanner's
certificate)."""

from __future__ import annotations

from pathlib import Path

from node.audit import read_records
from tests.conftest import wait_until
from tests.tlscerts import Pki
from tests.tlsrevocation import AuditedTlsNode, echo
from tests.unit.test_tls_ae_binding import node, pki, scanner  # noqa: F401 - the fixtures


def test_a_certificate_claiming_another_ae_title_is_audited_with_that_reason(
    node: AuditedTlsNode, pki: Pki, scanner: dict[str, tuple[Path, Path]]  # noqa: F811 - the fixtures
) -> None:
    assert echo(pki, node.tls_port, "CT_B", scanner["A"]).returncode != 0  # A's certificate, B's title
    assert echo(pki, node.port, "CT_A", None).returncode != 0  # a bound title on the plaintext port
    audited = wait_until(lambda: len(a := node.audited("association_rejected")) >= 2 and a, 5, "two audited")
    assert len(audited) == 2
    described = [(r["ActiveParticipant"][0]["UserID"], r["EventIdentification"]["EventOutcomeDescription"])
                 for r in read_records(node.audit.path) if r["event"] == "association_rejected"]
    assert described == [
        ("CT_B", "association rejected (client certificate does not name the calling AE title's peer)"),
        ("CT_A", "association rejected (calling AE title is bound to a certificate: DICOM TLS only)"),
    ]
