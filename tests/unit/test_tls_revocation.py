"""Certificate revocation ([tls] crl_file, node/tls.py ServerContext): a revoked client certificate is refused on the
DICOM TLS port (DCMTK echoscu as the peer) and over HTTPS (curl), audited as a failed login; a replaced CRL file
takes effect at the next connection without a restart; an expired CRL refuses its CA's certificates (OpenSSL's
default, kept) and is refused by `pacsnode config check`, as are CRL files that do not read, parse or verify.

Certificates: tests/tlscerts.py's throwaway CA, with named client certificates and CRLs from tests/tlsrevocation.py.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from node.audit import AuditTrail, read_records
from node.cli import main as cli_main
from node.config import NodeConfig, TlsSection, load_config
from node.errors import ConfigError
from node.http import HttpServer
from node.tls import check_config, server_context
from tests.conftest import free_port, require_tool, wait_until
from tests.tlscerts import Pki, make_pki
from tests.tlsrevocation import AuditedTlsNode, crl_pem, echo, issue, write_crl

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def scanners(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("scanners")
    return {name: issue(pki, folder, name) for name in ("stolen", "kept")}


@pytest.fixture
def make_node(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., AuditedTlsNode]]:
    nodes: list[AuditedTlsNode] = []

    def _make(**tls: Any) -> AuditedTlsNode:
        nodes.append(AuditedTlsNode(tmp_path / f"n{len(nodes)}", pki, **tls))
        return nodes[-1]

    yield _make
    for node in nodes:
        node.stop()


def _tls(pki: Pki, crl: Path, **more: Any) -> TlsSection:
    return TlsSection(certificate=pki.server_cert, private_key=pki.server_key, ca_file=pki.ca,
                      client_certificates="required", dimse_port=free_port(), crl_file=crl, **more)


# -- config ----------------------------------------------------------------------------------------------------------
def test_crl_file_needs_the_cas_and_client_certificates(pki: Pki, tmp_path: Path) -> None:
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki))
    with pytest.raises(ValueError, match="crl_file needs ca_file"):
        TlsSection(certificate=pki.server_cert, private_key=pki.server_key, https=True, crl_file=crl)
    with pytest.raises(ValueError, match="crl_file needs ca_file"):
        TlsSection(certificate=pki.server_cert, private_key=pki.server_key, https=True, ca_file=pki.ca, crl_file=crl)


@pytest.mark.parametrize(("case", "says"), [
    ("missing", "cannot be read (No such file or directory)"),
    ("not a CRL", "holds no PEM CRL"),
    ("garbled", "does not load as PEM CRLs"),
    ("another CA's", "CN=pacsnode test other-ca in "),
    ("expired", "has expired"),
    ("not valid yet", "is not valid yet"),
])
def test_config_check_refuses_a_crl_file_in_one_line(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, says: str
) -> None:
    crl = tmp_path / "crl.pem"
    good = crl_pem(pki)
    body = {
        "missing": None,
        "not a CRL": pki.ca.read_bytes(),
        "garbled": good.replace(good.splitlines()[3], b"A" * 64),
        "another CA's": good + crl_pem(pki, ca=pki.other_ca),
        "expired": crl_pem(pki, last_update=NOW - dt.timedelta(days=3), next_update=NOW - dt.timedelta(days=1)),
        "not valid yet": crl_pem(pki, last_update=NOW + dt.timedelta(days=1)),
    }[case]
    if body is not None:
        write_crl(crl, body)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[tls]\ncertificate = "{pki.server_cert}"\n'
                      f'private_key = "{pki.server_key}"\nca_file = "{pki.ca}"\nclient_certificates = "required"\n'
                      f'https = true\ncrl_file = "{crl}"\n')
    assert cli_main(["config", "check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tls.crl_file: " in err and says in err, err
    assert len(err.strip().splitlines()) == 1, err
    if case not in ("expired", "not valid yet"):  # these load (and refuse): only config check stops them
        with pytest.raises(ConfigError, match="tls.crl_file"):
            server_context(_tls(pki, crl))
    write_crl(crl, good)
    assert cli_main(["config", "check", "--config", str(config)]) == 0
    check_config(NodeConfig(tls=_tls(pki, crl)))


def test_a_relative_crl_file_is_read_beside_the_config_file(pki: Pki, tmp_path: Path) -> None:
    """Like the other TLS files: relative to the config file's folder, not to wherever the node was started."""
    folder = tmp_path / "etc"
    folder.mkdir()
    write_crl(folder / "ca-crl.pem", crl_pem(pki))
    config = folder / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[tls]\ncertificate = "{pki.server_cert}"\n'
                      f'private_key = "{pki.server_key}"\nca_file = "{pki.ca}"\nclient_certificates = "required"\n'
                      'https = true\ncrl_file = "ca-crl.pem"\n')
    assert load_config(config, environ={}).tls.crl_file == folder / "ca-crl.pem"
    assert cli_main(["config", "check", "--config", str(config)]) == 0


# -- DICOM TLS -------------------------------------------------------------------------------------------------------
def test_a_revoked_certificate_is_refused_on_the_dicom_tls_port_and_audited(
    make_node: Callable[..., AuditedTlsNode], pki: Pki, scanners: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, (scanners["stolen"][0],)))
    node = make_node(crl_file=str(crl))
    assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode == 0
    with capture_logs() as logs:
        refused = echo(pki, node.tls_port, "STOLEN", scanners["stolen"])
        assert refused.returncode != 0, refused.stderr
        failed = wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, "the refusal logged")
    assert failed[0]["why"] == "certificate verify failed: certificate revoked"
    audited = wait_until(lambda: node.audited("tls_handshake_failed"), 5, "the refusal audited")
    assert audited == ["DICOM TLS handshake failed: certificate verify failed: certificate revoked"]
    assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode == 0


def test_a_replaced_crl_takes_effect_at_the_next_connection_without_a_restart(
    make_node: Callable[..., AuditedTlsNode], pki: Pki, scanners: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    stolen = scanners["stolen"]
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=NOW - dt.timedelta(hours=3)))
    node = make_node(crl_file=str(crl))
    assert echo(pki, node.tls_port, "STOLEN", stolen).returncode == 0
    with capture_logs() as logs:  # the security officer revokes it: a new CRL in place, no restart, no SIGHUP
        write_crl(crl, crl_pem(pki, (stolen[0],), last_update=NOW - dt.timedelta(hours=2)))
        assert echo(pki, node.tls_port, "STOLEN", stolen).returncode != 0
        assert [e["revoked"] for e in logs if e["event"] == "tls_crl_loaded"] == [1]
        write_crl(crl, b"-----BEGIN X509 CRL-----\nhalf written")  # a bad file keeps the CRLs in force
        assert echo(pki, node.tls_port, "STOLEN", stolen).returncode != 0
        assert "holds no PEM CRL" in next(e["reason"] for e in logs if e["event"] == "tls_crl_reload_failed")
    assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode == 0
    # a newer CRL without it (revoked in error) supersedes the older one: OpenSSL uses the newest of a CA's CRLs
    write_crl(crl, crl_pem(pki, last_update=NOW - dt.timedelta(hours=1)))
    assert echo(pki, node.tls_port, "STOLEN", stolen).returncode == 0


def test_an_expired_crl_refuses_every_certificate_of_its_ca(
    make_node: Callable[..., AuditedTlsNode], pki: Pki, scanners: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """The CRL in force lapsed (its publisher stalled): fail closed, loudly, until a current one is installed."""
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, last_update=NOW - dt.timedelta(days=3),
                                                  next_update=NOW - dt.timedelta(days=1)))
    with capture_logs() as logs:
        node = make_node(crl_file=str(crl))
        assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode != 0
        assert [e["state"] for e in logs if e["event"] == "tls_crl_expired"] == ["has expired"]
        failed = wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, "the refusal logged")
    assert failed[0]["why"] == "certificate verify failed: CRL has expired"
    write_crl(crl, crl_pem(pki))  # a current one: accepted again
    assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode == 0


def test_a_certificate_of_a_ca_without_a_crl_is_refused(
    make_node: Callable[..., AuditedTlsNode], pki: Pki, scanners: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """Fail closed: with crl_file, each CA that issues client certificates needs its CRL there."""
    both = tmp_path / "cas.pem"
    both.write_bytes(pki.ca.read_bytes() + pki.other_ca.read_bytes())
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, ca=pki.other_ca))
    node = make_node(ca_file=str(both), crl_file=str(crl))
    with capture_logs() as logs:
        assert echo(pki, node.tls_port, "KEPT", scanners["kept"]).returncode != 0
        failed = wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, "the refusal logged")
    assert failed[0]["why"] == "certificate verify failed: unable to get certificate CRL"


# -- HTTPS -----------------------------------------------------------------------------------------------------------
def test_a_revoked_certificate_is_refused_over_https_and_a_new_crl_is_followed(
    pki: Pki, scanners: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    crl = write_crl(tmp_path / "crl.pem", crl_pem(pki, (scanners["stolen"][0],), last_update=NOW - dt.timedelta(hours=2)))
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "http_port": free_port(), "dicomweb_token": "t" * 24},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "ca_file": str(pki.ca),
                "client_certificates": "required", "https": True, "crl_file": str(crl)}})
    audit = AuditTrail(config.audit, config.node.data_dir, ae_title="PACSNODE")
    app = Starlette(routes=[Route("/healthz", lambda _: PlainTextResponse("ok"))])
    server = HttpServer(config, app, audit=audit)
    server.start()
    try:
        def curl(name: str) -> str:
            cert, key = scanners[name]
            return subprocess.run([require_tool("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                                   "10", "--cacert", str(pki.ca), "--cert", str(cert), "--key", str(key),
                                   f"https://localhost:{server.port}/healthz"],
                                  capture_output=True, text=True, timeout=30).stdout

        assert curl("kept") == "200"
        assert curl("stolen") == "000"
        reasons = wait_until(lambda: [r["EventIdentification"]["EventOutcomeDescription"]
                                      for r in read_records(audit.path) if r["event"] == "tls_handshake_failed"]
                             if audit.path.exists() else [], 10, "the refusal audited")
        assert reasons == ["HTTPS handshake failed: certificate verify failed: certificate revoked"]
        write_crl(crl, crl_pem(pki, (scanners["kept"][0],), last_update=NOW - dt.timedelta(hours=1)))
        assert curl("kept") == "000"
        assert curl("stolen") == "200"  # the newer CRL no longer lists it
    finally:
        server.stop(2.0)
        audit.close()
