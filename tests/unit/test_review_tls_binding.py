"""Review of [tls] calling_ae_certificates (node/tls.py certificate_names, calling_ae_refusal) against certificates an
attacker could get issued: a real pynetdicom AE over DICOM TLS as the peer, certificates from tests/tlsrevocation.py.

RFC 6125 6.4.4: once a certificate carries subjectAltName DNS names its subject CN is not an identity — a CA that
validates the SAN names often copies the CN from the request unchecked, so a certificate issued for
``kiosk.example.org`` with CN ``ct-a.hospital.org`` must not pass as scanner A's. Look-alikes (a trailing dot, an
embedded NUL, a wildcard, an IDN) never match a bound name; case does not matter. A resumed TLS session is
checked with the certificate it was made with.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.tlscerts import Pki, make_pki
from tests.tlsrevocation import AuditedTlsNode, ResumingContext, echo, issue, resuming_context

BOUND = {"CT_A": ["ct-a.hospital.org"], "CT_B": "ct-b.hospital.org"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[AuditedTlsNode]:
    made = AuditedTlsNode(tmp_path_factory.mktemp("node"), pki, calling_ae_certificates=BOUND)
    yield made
    made.stop()


def _associates(pki: Pki, node: AuditedTlsNode, cert: tuple[Path, Path] | ResumingContext, calling: str = "CT_A",
                resumed: bool = False) -> bool:
    """Whether ``calling`` associates over TLS with ``cert`` (or a `ResumingContext`, which then resumes its session
    next time, and has resumed this one if ``resumed``)."""
    if isinstance(cert, ResumingContext):
        ctx: ssl.SSLContext = cert
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        ctx.load_cert_chain(*cert)
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="PACSNODE", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        assert assoc.is_rejected  # refused by the binding, not by TLS
        return False
    if isinstance(ctx, ResumingContext):
        assert ctx.last is not None and ctx.last.session_reused is resumed
        ctx.session = ctx.last.session
    assoc.release()
    return True


def test_subject_cn_is_no_identity_when_the_certificate_has_san_dns_names(
    node: AuditedTlsNode, pki: Pki, tmp_path: Path
) -> None:
    """RFC 6125 6.4.4. Before the fix certificate_names took SAN DNS names and CNs together: accepted."""
    kiosk = issue(pki, tmp_path, "kiosk", cn="ct-a.hospital.org", dns=("kiosk.example.org",))
    assert not _associates(pki, node, kiosk)
    claimed = echo(pki, node.tls_port, "CT_A", kiosk)  # DCMTK too
    assert claimed.returncode != 0 and "Calling AE Title Not Recognized" in claimed.stderr, claimed.stderr
    assert _associates(pki, node, issue(pki, tmp_path, "cn-only", cn="CT-A.Hospital.org"))  # no SAN: the CN counts


@pytest.mark.parametrize(("cn", "dns", "admitted"), [
    ("x", ("CT-A.HOSPITAL.ORG",), True),
    ("x", ("kiosk.example.org", "ct-a.hospital.org"), True),
    ("x", ("ct-a.hospital.org.",), False),
    ("x", ("ct-a.hospital.org\x00.evil.org",), False),
    ("x", ("*.hospital.org",), False),
    ("x", ("xn--ct-a-hospital-org",), False),
    ("ct-a.hospital.org.", (), False),
    ("*.hospital.org", (), False),
])
def test_look_alike_names_do_not_match(
    node: AuditedTlsNode, pki: Pki, tmp_path: Path, cn: str, dns: tuple[str, ...], admitted: bool
) -> None:
    assert _associates(pki, node, issue(pki, tmp_path, "peer", cn=cn, dns=dns)) is admitted


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_resumed_tls_session_is_checked_with_the_certificate_it_was_made_with(
    node: AuditedTlsNode, pki: Pki, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Resumption skips the certificate exchange; the session still holds the peer's certificate, so the binding
    holds: scanner A's session, resumed, associates as CT_A and not as CT_B."""
    ctx = resuming_context(pki, issue(pki, tmp_path, "a", dns=("ct-a.hospital.org",)), version)
    assert _associates(pki, node, ctx)
    assert not _associates(pki, node, ctx, "CT_B")
    assert _associates(pki, node, ctx, resumed=True)
