"""Throwaway certificates for TLS tests, made with the ``openssl`` command: a CA, a server and a client certificate
it signed (both for ``localhost`` and ``127.0.0.1``), and a second, unrelated CA with its own server certificate
(the "wrong CA"). `make_pki(folder)` returns their paths as a `Pki`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool

_SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1"
_LEAF = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed server and client
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # unrelated CA ("wrong CA")
    other_server_cert: Path  # signed by other_ca
    other_server_key: Path

    def combined(self, cert: Path, key: Path, out: Path) -> Path:
        """One PEM file holding ``key`` then ``cert`` (Orthanc's ``SslCertificate``)."""
        out.write_bytes(key.read_bytes() + cert.read_bytes())
        return out


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN=pacsnode test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    ext.write_text(f"{_LEAF}extendedKeyUsage={usage}\n{_SAN}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=folder)
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    server = _leaf(folder, "localhost", ca, "serverAuth,clientAuth")  # Orthanc also uses it as a client
    client = _leaf(folder, "client", ca, "clientAuth,serverAuth")
    other_server = _leaf(folder, "other-localhost", other, "serverAuth,clientAuth")
    return Pki(ca[0], *server, *client, other[0], *other_server)
