"""Security review of the DICOM TLS front door (node.tls's server context, the handshake in node.acceptor) as a
pen-tester on the hospital network would attack it, with real software: ``openssl s_client`` (old protocol versions,
NULL/anonymous/export/CBC ciphers, client-initiated renegotiation), DCMTK ``echoscu`` (retired IHE profiles, client
certificates out of their validity or made for another use), pynetdicom speaking plaintext DICOM to the TLS port and
raw sockets stalling the handshake. Each refusal is checked against a control: the same client completes against a
permissive TLS server (Python's ``ssl``) or, with a good certificate, against the node.

tests/unit/test_tls.py already covers: DCMTK with no client certificate, another CA's, an untrusted server, plain
TCP; TLS 1.1 and TLS 1.2 without forward secrecy from Python; a silent connection; handshakes against the total cap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from tests.conftest import require_tool, wait_until
from tests.tlscerts import Pki, make_pki
from tests.unit.test_tls import AE_TITLE, TlsNode, dcmtk

OPENSSL_WEAK = "ALL:eNULL:aNULL:@SECLEVEL=0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def make_node(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., TlsNode]]:
    """In-process DIMSE servers with a DICOM TLS listener (client certificates required unless told)."""
    nodes: list[TlsNode] = []

    def _make(node: dict[str, Any] | None = None, **tls: Any) -> TlsNode:
        nodes.append(TlsNode(tmp_path / f"n{len(nodes)}", pki, node=node or {}, tls=tls))
        return nodes[-1]

    yield _make
    for n in nodes:
        n.stop()


# -- helpers ------------------------------------------------------------------------------------------------------
def s_client(port: int, *args: str, stdin: str = "", pki: Pki | None = None) -> tuple[bool, str]:
    """Run ``openssl s_client`` against 127.0.0.1:``port`` (with the client certificate when ``pki``); returns
    whether a cipher was agreed and the output."""
    cmd = [require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args]
    if pki is not None:
        cmd += ["-CAfile", str(pki.ca), "-cert", str(pki.client_cert), "-key", str(pki.client_key)]
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    out = done.stdout + done.stderr
    return re.search(r"Cipher is (?!\(NONE\))\S+", out) is not None, out


@contextlib.contextmanager
def permissive_server(pki: Pki) -> Iterator[int]:
    """A TLS server that accepts anything OpenSSL can speak (the control: the attack client works)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers(OPENSSL_WEAK)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    with contextlib.suppress(OSError):
                        tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):  # wakes the accept() (close alone does not): 5 s per test before
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def client_certificate(pki: Pki, folder: Path, name: str, *, days: tuple[int, int] = (-1, 1),
                       usage: list[x509.ObjectIdentifier] | None = None) -> tuple[Path, Path]:
    """A client certificate signed by the node's CA (``pki.ca``), valid from ``days[0]`` to ``days[1]`` days from
    now, with extended key usage ``usage`` (default clientAuth)."""
    ca_key = serialization.load_pem_private_key((pki.ca.parent / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- protocol versions and ciphers ---------------------------------------------------------------------------------
WEAK_OFFERS = {
    "TLS 1.0": ("-tls1", "-cipher", OPENSSL_WEAK),
    "TLS 1.1": ("-tls1_1", "-cipher", OPENSSL_WEAK),
    "NULL cipher": ("-tls1_2", "-cipher", "eNULL:@SECLEVEL=0"),
    "anonymous DH": ("-tls1_2", "-cipher", "aNULL:@SECLEVEL=0"),
    "RSA key exchange, CBC": ("-tls1_2", "-cipher", "AES128-SHA:AES256-SHA256:@SECLEVEL=0"),
    "ECDHE with CBC": ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384"),
}


@pytest.mark.parametrize("offer", WEAK_OFFERS)
def test_old_protocols_and_weak_ciphers_are_refused(make_node: Callable[..., TlsNode], pki: Pki, offer: str) -> None:
    args = WEAK_OFFERS[offer]
    with permissive_server(pki) as control:  # the control: the attack client speaks it (else this proves nothing)
        agreed, out = s_client(control, *args)
        assert agreed, f"this OpenSSL build cannot speak {offer} at all, so the refusal below would prove nothing: " \
                       f"{out[-300:]}"
    node = make_node(client_certificates="none")
    agreed, out = s_client(node.tls_port, *args)
    assert not agreed, out
    assert s_client(node.tls_port, "-tls1_3", pki=pki)[0]  # the listener still serves a good client


def test_dcmtk_retired_profiles_are_refused(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    """DCMTK's IHE ATNA 'null' profile (authenticated, unencrypted) and the retired AES profile (RSA, CBC)."""
    node = make_node()
    client = ("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca))
    for profile in ("+pn", "+pa"):
        echo = dcmtk("echoscu", pki, node.tls_port, tls=(*client, profile))
        assert echo.returncode != 0, (profile, echo.stdout, echo.stderr)
    for profile in ("+py", "+px"):  # BCP 195 profiles work
        echo = dcmtk("echoscu", pki, node.tls_port, tls=(*client, profile))
        assert echo.returncode == 0, (profile, echo.stderr)


def test_client_initiated_renegotiation_is_refused(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    node = make_node()
    agreed, out = s_client(node.tls_port, "-tls1_2", "-msg", stdin="R\n", pki=pki)
    assert agreed, out
    assert "RENEGOTIATING" in out, out
    # the server answers the second ClientHello with a no_renegotiation alert, not a ServerHello
    assert "Alert [length 0002], warning no_renegotiation" in out, out
    assert len(re.findall(r"<<< TLS 1\.2, Handshake \[length [0-9a-f]+\], ServerHello\n", out)) == 1, out
    assert dcmtk("echoscu", pki, node.tls_port).returncode == 0


# -- client certificates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "days", "usage", "node_says"), [
    ("expired", (-10, -1), None, "certificate has expired"),
    ("not yet valid", (1, 10), None, "certificate is not yet valid"),
    ("made for servers only", (-1, 1), [ExtendedKeyUsageOID.SERVER_AUTH], "unsuitable certificate purpose"),
    ("made for e-mail", (-1, 1), [ExtendedKeyUsageOID.EMAIL_PROTECTION], "unsuitable certificate purpose"),
])
def test_client_certificate_out_of_validity_or_for_another_use_is_refused(
    make_node: Callable[..., TlsNode], pki: Pki, tmp_path: Path, case: str, days: tuple[int, int],
    usage: list[x509.ObjectIdentifier] | None, node_says: str,
) -> None:
    node = make_node()
    good = client_certificate(pki, tmp_path, "good")
    echo = dcmtk("echoscu", pki, node.tls_port, tls=("+tls", str(good[1]), str(good[0]), "-pw", "+cf", str(pki.ca)))
    assert echo.returncode == 0, echo.stderr  # the control: a certificate made the same way, in date, for clients
    cert, key = client_certificate(pki, tmp_path, case.replace(" ", "-"), days=days, usage=usage)
    with capture_logs() as logs:
        echo = dcmtk("echoscu", pki, node.tls_port, tls=("+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca)))
        assert echo.returncode != 0 and "Association Request Failed" in echo.stderr, echo.stderr
        failed = wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, "the refusal")
    assert node_says in failed[0]["why"], failed


# -- plaintext and stalled handshakes ------------------------------------------------------------------------------
def test_plaintext_associate_rq_on_the_tls_port_is_refused_at_once_and_frees_its_slot(
    make_node: Callable[..., TlsNode], pki: Pki,
) -> None:
    node = make_node({"association_timeout_seconds": 10.0})
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 20
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title=AE_TITLE)
    took = time.monotonic() - t0
    assert not assoc.is_established
    assert took < 3, f"a plaintext A-ASSOCIATE-RQ waited {took:.1f} s for its refusal"
    wait_until(lambda: node.tls_server.open_connections() == 0 and node.tls_server.handshaking == 0, 3,
               "the slot to be released")
    assert node.spooled() == []


def test_dribbled_client_hello_is_cut_at_the_association_timeout(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    timeout = 1.5
    node = make_node({"association_timeout_seconds": timeout})
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    record = outgoing.read()
    sock = socket.create_connection(("127.0.0.1", node.tls_port), timeout=timeout + 5)
    t0 = time.monotonic()
    closed = False
    with contextlib.closing(sock):
        for byte in record[:-1]:  # one byte every 0.1 s: each read is quick, the handshake never ends
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if time.monotonic() - t0 > timeout + 3:
                break
            time.sleep(0.1)  # the attacker's pace, not a synchronisation
        if not closed:
            sock.settimeout(1)
            with contextlib.suppress(OSError):
                closed = sock.recv(1) == b""
    assert closed and time.monotonic() - t0 < timeout + 3, "a dribbled ClientHello outlived the association timeout"
    wait_until(lambda: node.tls_server.handshaking == 0, 3, "the handshake to be dropped")


def test_silent_handshakes_count_against_the_per_address_cap(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    """One address holding handshakes open gets its own cap's worth, not the node's: others still associate."""
    node = make_node({"max_associations": 8, "max_associations_per_peer": 2, "association_timeout_seconds": 20.0})
    silent = [socket.create_connection(("127.0.0.1", node.tls_port), source_address=("127.0.0.2", 0))
              for _ in range(6)]
    try:
        wait_until(lambda: node.tls_server.handshaking == 2, 5, "two handshakes from the attacker")
        closed = 0
        for sock in silent[2:]:
            sock.settimeout(3)
            with contextlib.suppress(OSError):
                closed += sock.recv(1) == b""
        assert closed == 4
        assert dcmtk("echoscu", pki, node.tls_port).returncode == 0  # from 127.0.0.1, at once
    finally:
        for sock in silent:
            sock.close()


def test_unauthenticated_handshakes_from_a_few_hosts_do_not_lock_out_every_modality(
    make_node: Callable[..., TlsNode], pki: Pki,
) -> None:
    """4 hosts x 16 silent TLS connections filled 2 x max_associations, and every modality was refused until they
    timed out. Now, at the cap, the connection that has waited longest without negotiating gives its slot to the
    newcomer (node.slots): the attackers' own connections displace each other past the cap, and the modality
    displaces one of theirs."""
    node = make_node({"association_timeout_seconds": 10.0})  # defaults: 32 associations, 16 per address
    silent = [socket.create_connection(("127.0.0.1", node.tls_port), source_address=(f"127.0.0.{host}", 0))
              for host in range(2, 6) for _ in range(16)]
    try:
        wait_until(lambda: node.tls_server.handshaking >= 32, 5, "the attackers' handshakes to fill the slots")
        assert dcmtk("echoscu", pki, node.tls_port, timeout=20).returncode == 0  # a modality with its certificate
    finally:
        for sock in silent:
            sock.close()
