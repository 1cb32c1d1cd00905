"""Review of certificate revocation ([tls] crl_file, node/tls.py ServerContext) against what a thief holding a
revoked certificate, or a CRL publisher gone wrong, could do: real peers (a pynetdicom AE over DICOM TLS whose
client resumes its TLS session, DCMTK echoscu), certificates and CRLs from tests/tlsrevocation.py.

- A TLS session resumed after its certificate was revoked (TLS 1.2 session ID, TLS 1.3 ticket) is a full handshake
  again: resumption skips certificate verification, so a ticket taken before the revocation would outlive it.
- A delta CRL is refused: OpenSSL took it for the whole CRL, voiding the base's revocations.
- A new CRL whose last update is the same second as the one in force (a CA that reissues its CRL at each
  revocation) supersedes it; an older one (a replayed CRL) does not, nor does leaving a CA's CRL out.
- However often the file is replaced, the listener holds one CRL per CA and scope (OpenSSL's store only ever
  grew); a CRL of another scope (issuing distribution point) stands beside the CA's other one.
- A CRL path that is not a regular file (a FIFO) or is huge is refused without reading it: reading stalled every
  new connection on the listener (the DICOM TLS acceptor thread, the HTTPS event loop).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from node.config import NodeConfig, TlsSection
from node.errors import ConfigError
from node.http import HttpServer
from node.tls import MAX_CRL_BYTES, read_crls, server_context
from tests.conftest import free_port, require_tool, wait_until
from tests.tlscerts import Pki, make_pki
from tests.tlsrevocation import (
    AuditedTlsNode,
    ResumingContext,
    crl_pem,
    echo,
    issue,
    resuming_context,
    write_crl,
)

HOUR = dt.timedelta(hours=1)
THEN = dt.datetime.now(dt.UTC).replace(microsecond=0) - 2 * HOUR


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stolen(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return issue(pki, tmp_path_factory.mktemp("scanners"), "stolen")


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., AuditedTlsNode]]:
    made: list[AuditedTlsNode] = []

    def _make(crl: Path, **tls: Any) -> AuditedTlsNode:
        made.append(AuditedTlsNode(tmp_path / "node", pki, crl_file=str(crl), **tls))
        return made[-1]

    yield _make
    for each in made:
        each.stop()


def _echo_resuming(ctx: ResumingContext, port: int) -> tuple[bool, bool]:
    """A C-ECHO association from a pynetdicom AE over ``ctx``: (established, TLS session resumed)."""
    ae = AE(ae_title="STOLEN")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", tls_args=(ctx, "localhost"))
    established, resumed = assoc.is_established, False
    if established:
        assert assoc.send_c_echo().Status == 0x0000
        assert ctx.last is not None
        resumed, ctx.session = bool(ctx.last.session_reused), ctx.last.session  # the newest, for the next connection
        assoc.release()
    return established, resumed


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_session_resumed_after_the_revocation_is_refused(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path,
    version: ssl.TLSVersion
) -> None:
    """Before the fix the resumed association was accepted, revoked certificate and all (checked)."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=THEN))
    listener = node(crl)
    ctx = resuming_context(pki, stolen, version)
    assert _echo_resuming(ctx, listener.tls_port) == (True, False)
    assert _echo_resuming(ctx, listener.tls_port) == (True, True)  # the listener resumes sessions
    write_crl(crl, crl_pem(pki, (stolen[0],), last_update=THEN + HOUR))
    assert _echo_resuming(ctx, listener.tls_port) == (False, False)


def test_a_session_is_not_resumed_past_the_crl_next_update(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """An expired CRL refuses every certificate of its CA (README); a session made while it was current, resumed
    once it has lapsed, was accepted before the fix (checked). The CRL's next update is the one clock here."""
    lapses = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=6)
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=THEN, next_update=lapses))
    listener = node(crl)
    ctx = resuming_context(pki, stolen)
    assert _echo_resuming(ctx, listener.tls_port)[0]
    wait_until(lambda: dt.datetime.now(dt.UTC) > lapses, 30, "the CRL's next update passed")
    assert _echo_resuming(ctx, listener.tls_port) == (False, False)


def test_an_https_session_resumed_after_the_revocation_is_refused(
    pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same over HTTPS (asyncio's handshake, `wrap_bio`), with Python's http.client resuming its TLS 1.3
    session. Before the fix the resumed request was answered 200 (checked)."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=THEN))
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "http_port": free_port(), "dicomweb_token": "t" * 24},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "ca_file": str(pki.ca),
                "client_certificates": "required", "https": True, "crl_file": str(crl)}})
    server = HttpServer(config, Starlette(routes=[Route("/healthz", lambda _: PlainTextResponse("ok"))]))
    server.start()
    ctx = resuming_context(pki, stolen)

    def get() -> tuple[int | str, bool]:
        connection = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=10)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            assert ctx.last is not None
            resumed, ctx.session = bool(ctx.last.session_reused), ctx.last.session
            return response.status, resumed
        except (ssl.SSLError, OSError) as exc:  # the handshake refused
            return type(exc).__name__, False
        finally:
            connection.close()

    try:
        assert get() == (200, False)
        assert get() == (200, True)
        write_crl(crl, crl_pem(pki, (stolen[0],), last_update=THEN + HOUR))
        assert get()[0] != 200
    finally:
        server.stop(2.0)


def test_a_crl_of_the_same_second_supersedes_the_one_in_force_an_older_one_does_not(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """Before the fix OpenSSL kept the first CRL of equal last update: the revocation was ignored (checked)."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=THEN))
    listener = node(crl)
    assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode == 0
    write_crl(crl, crl_pem(pki, (stolen[0],), last_update=THEN))
    assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
    with capture_logs() as logs:  # a replayed older CRL, or one without the CA, un-revokes nothing
        for replayed in (crl_pem(pki, last_update=THEN - HOUR), crl_pem(pki, ca=pki.other_ca)):
            write_crl(crl, replayed)
            assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
    assert [e["issuer"] for e in logs if e["event"] == "tls_crl_not_newer"] == ["CN=pacsnode test ca"]


def _number(n: int) -> tuple[x509.ExtensionType, bool]:
    return x509.CRLNumber(n), False


USERS_ONLY = x509.IssuingDistributionPoint(None, None, True, False, None, False, False)
CAS_ONLY = x509.IssuingDistributionPoint(None, None, False, True, None, False, False)


def test_a_delta_crl_is_refused(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """A CA publishing delta CRLs (AD CS does by default) beside its base CRL: OpenSSL 3.0 without extended CRL
    support takes the newer delta for the whole CRL. Before the fix the stolen certificate the base CRL revokes
    was admitted once the delta was in the file (checked)."""
    base = crl_pem(pki, (stolen[0],), last_update=THEN, extensions=(_number(1),))
    delta = crl_pem(pki, last_update=THEN + HOUR, extensions=(_number(2), (x509.DeltaCRLIndicator(1), True)))
    crl = write_crl(tmp_path / "crl.pem", base)
    listener = node(crl)
    assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
    with capture_logs() as logs:
        write_crl(crl, base + delta)
        assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
    assert "holds a delta CRL" in next(e["reason"] for e in logs if e["event"] == "tls_crl_reload_failed")
    with pytest.raises(ConfigError, match="tls.crl_file: .* holds a delta CRL of CN=pacsnode test ca"):
        read_crls(crl, pki.ca)


def test_a_newer_crl_of_another_scope_leaves_the_base_crl_in_force(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """A CA may partition its CRLs (issuing distribution point): here its CA certificates' apart from the users'.
    A newer CRL of another scope must not displace the users' one (keeping one CRL per CA, every client certificate
    was refused: 'different CRL scope'), also when the next file leaves it out."""
    users = crl_pem(pki, (stolen[0],), last_update=THEN, extensions=(_number(1), (USERS_ONLY, True)))
    cas = crl_pem(pki, last_update=THEN + HOUR, extensions=(_number(2), (CAS_ONLY, True)))
    crl = write_crl(tmp_path / "crl.pem", users + cas)
    listener = node(crl)
    kept = issue(pki, tmp_path, "kept")
    for _ in range(2):
        assert echo(pki, listener.tls_port, "KEPT", kept).returncode == 0
        assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
        write_crl(crl, cas)  # the users' CRL in force stays


def test_the_listener_holds_one_crl_per_ca_however_often_the_file_is_replaced(pki: Pki, tmp_path: Path) -> None:
    """Before the fix each replacement added its CRLs to OpenSSL's store for good (3 here; checked): a CA that
    reissues a large CRL hourly grew every listener process by its size each time."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=THEN))
    ctx = server_context(TlsSection.model_validate({
        "certificate": pki.server_cert, "private_key": pki.server_key, "ca_file": pki.ca,
        "client_certificates": "required", "dimse_port": free_port(), "crl_file": crl}))
    for minutes in (1, 2):
        write_crl(crl, crl_pem(pki, last_update=THEN + dt.timedelta(minutes=minutes)))
        ctx.refresh_crl()
    assert ctx.cert_store_stats()["crl"] == 1


def test_a_crl_path_that_is_a_fifo_is_refused_without_stalling_the_listener(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """Before the fix the acceptor thread blocked reading the FIFO: the echo hung (checked)."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, (stolen[0],), last_update=THEN))
    kept = issue(pki, tmp_path, "kept")
    listener = node(crl)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.replace(crl)
    try:
        with capture_logs() as logs:
            cmd = [require_tool("echoscu"), "-aet", "KEPT", "-aec", "PACSNODE", "+tls", str(kept[1]), str(kept[0]),
                   "-pw", "+cf", str(pki.ca), "127.0.0.1", str(listener.tls_port)]
            assert subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
        assert "not a regular file" in next(e["reason"] for e in logs if e["event"] == "tls_crl_reload_failed")
        assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0  # the CRLs in force stay
    finally:  # a reader blocked on the FIFO (the code before) gets its end of file and lets the node stop
        with contextlib.suppress(OSError):
            os.close(os.open(crl, os.O_WRONLY | os.O_NONBLOCK))


def test_a_crl_file_larger_than_the_cap_is_refused_unread(pki: Pki, tmp_path: Path) -> None:
    big = tmp_path / "crl.pem"
    with big.open("wb") as sparse:  # no disk used: a hole
        sparse.truncate(MAX_CRL_BYTES + 1)
    with pytest.raises(ConfigError, match=r"tls.crl_file: .* is larger than 64 MiB"):
        read_crls(big, pki.ca)


def test_a_crl_with_a_critical_extension_openssl_does_not_handle_is_refused_and_the_one_in_force_stays(
    node: Callable[..., AuditedTlsNode], pki: Pki, stolen: tuple[Path, Path], tmp_path: Path
) -> None:
    """OpenSSL refuses every certificate of a CA whose CRL carries a critical extension it does not handle
    ("unhandled critical CRL extension"): such a file passed config check and a reload, then locked out every
    scanner of that CA. It is refused like a delta CRL now, and the CRLs in force stay."""
    odd = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)
    good = crl_pem(pki, (stolen[0],), last_update=THEN, extensions=(_number(1),))
    crl = write_crl(tmp_path / "crl.pem", good)
    listener = node(crl)
    assert echo(pki, listener.tls_port, "STORESCU", (pki.client_cert, pki.client_key)).returncode == 0
    with capture_logs() as logs:
        write_crl(crl, crl_pem(pki, (stolen[0],), last_update=THEN + HOUR, extensions=(_number(2), odd)))
        assert echo(pki, listener.tls_port, "STORESCU", (pki.client_cert, pki.client_key)).returncode == 0
        assert echo(pki, listener.tls_port, "STOLEN", stolen).returncode != 0
    assert "critical extension 1.3.6.1.4.1.99999.1" in next(
        e["reason"] for e in logs if e["event"] == "tls_crl_reload_failed")
    with pytest.raises(ConfigError, match=r"tls.crl_file: the CRL of CN=pacsnode test ca .* critical extension"):
        read_crls(crl, pki.ca)
