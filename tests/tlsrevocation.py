"""Revocation and named client certificates for TLS tests, on top of `tests.tlscerts`' throwaway CA (its key lies
beside it, ``ca.key``): `issue` signs a client certificate with given subject CN and DNS names, `write_crl` a CRL of
that CA revoking given certificates, with its times chosen (an expired one, or two in a known order).
Made with the ``cryptography`` package, which `node.tls` itself reads certificates with. `AuditedTlsNode`: the
node's DIMSE server in-process with a DICOM TLS listener and its audit trail, `echo` DCMTK's echoscu against it;
`resuming_context` a client context that resumes its TLS sessions.
"""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.audit import AuditTrail, read_records
from node.config import NodeConfig
from node.db import create_engine_for, init_schema
from node.dimse import DimseServer
from node.index import Index
from node.ingest import Ingestor
from node.spool import Spool
from tests.conftest import free_port, peer_env, require_tool
from tests.tlscerts import Pki

DAY = dt.timedelta(days=1)


def _ca(ca: Path) -> tuple[x509.Certificate, serialization.SSHCertPrivateKeyTypes]:
    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    key = serialization.load_pem_private_key(ca.with_suffix(".key").read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def issue(pki: Pki, folder: Path, name: str, *, cn: str | None = None, dns: tuple[str, ...] = (),
          ca: Path | None = None) -> tuple[Path, Path]:
    """A client certificate (``name``.pem, ``name``.key in ``folder``) signed by ``ca`` (default: the Pki's CA),
    subject CN ``cn`` (default ``name``), subjectAltName DNS ``dns`` (none: no subjectAltName)."""
    ca_cert, ca_key = _ca(ca or pki.ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY).not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def crl_pem(pki: Pki, revoked: tuple[Path, ...] = (), *, last_update: dt.datetime | None = None,
            next_update: dt.datetime | None = None, ca: Path | None = None,
            extensions: tuple[tuple[x509.ExtensionType, bool], ...] = ()) -> bytes:
    """A PEM CRL of ``ca`` (default: the Pki's CA) revoking the certificates in the files ``revoked``; by default
    issued an hour ago, next update in a day; with ``extensions`` (each with whether it is critical)."""
    ca_cert, ca_key = _ca(ca or pki.ca)
    now = dt.datetime.now(dt.UTC)
    last = last_update or now - dt.timedelta(hours=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(last).next_update(next_update or last + DAY))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    for path in revoked:
        serial = x509.load_pem_x509_certificate(path.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def write_crl(path: Path, *pems: bytes) -> Path:
    """Replace ``path`` with the CRLs ``pems`` in one file, atomically (as a careful operator would)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(pems))
    tmp.replace(path)
    return path


class AuditedTlsNode:
    """The node's DIMSE server in-process (over a real spool, index and audit trail) with a DICOM TLS listener:
    ``[tls]`` as ``tls`` says over the Pki's server certificate, CA and required client certificates."""

    def __init__(self, folder: Path, pki: Pki, **tls: Any) -> None:
        data = folder / "data"
        self.config = NodeConfig.model_validate({
            "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(data), "ae_title": "PACSNODE",
                     "association_timeout_seconds": 5.0, "network_timeout_seconds": 5.0},
            "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "ca_file": str(pki.ca),
                    "client_certificates": "required", "dimse_port": free_port(), **tls}})
        self.engine = create_engine_for(f"sqlite:///{folder / 'node.db'}")
        init_schema(self.engine)
        self.audit = AuditTrail(self.config.audit, data, ae_title="PACSNODE")
        index = Index(self.engine)
        self.server = DimseServer(self.config, Ingestor(Spool(self.config.node.spool_dir), index), index,
                                  audit=self.audit)
        self.server.start()
        tls_address = self.server.tls_address
        assert tls_address is not None
        self.port, self.tls_port = self.config.node.port, tls_address[1]

    def audited(self, event: str) -> list[str]:
        """The outcome descriptions of the audit records of ``event`` so far."""
        if not self.audit.path.exists():
            return []
        return [str(r["EventIdentification"].get("EventOutcomeDescription", "")) for r in read_records(self.audit.path)
                if r["event"] == event]

    def stop(self) -> None:
        self.server.stop()
        self.audit.close()
        self.engine.dispose()


def echo(pki: Pki, port: int, calling_ae: str, cert: tuple[Path, Path] | None) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu as ``calling_ae`` to the node, over DICOM TLS offering ``cert`` (certificate, key), or in
    plaintext when None."""
    tls = () if cert is None else ("+tls", str(cert[1]), str(cert[0]), "-pw", "+cf", str(pki.ca))
    cmd = [require_tool("echoscu"), "-aet", calling_ae, "-aec", "PACSNODE", *tls, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=30)


class ResumingContext(ssl.SSLContext):
    """A client context that offers ``session`` (one of an earlier connection on this context: Python's ssl resumes
    only those) and keeps its last socket, to read that connection's session and whether it was resumed."""

    session: ssl.SSLSession | None = None
    last: ssl.SSLSocket | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["session"] = self.session
        self.last = super().wrap_socket(sock, *args, **kwargs)
        return self.last


def resuming_context(pki: Pki, cert: tuple[Path, Path], version: ssl.TLSVersion | None = None) -> ResumingContext:
    """A `ResumingContext` trusting the Pki's CA, offering ``cert`` (certificate, key), up to TLS ``version``."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    if version is not None:
        ctx.maximum_version = version
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(*cert)
    return ctx
