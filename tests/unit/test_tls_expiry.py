"""Certificates the node presents: `pacsnode config check` refuses one that has expired or is not valid yet (the node
used to start with it, refuse every TLS peer and say so only in a rate-limited handshake warning — found by review),
and ``pacsnode_tls_certificate_expiry_seconds`` counts down to expiry for the alert rules."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.config import NodeConfig
from node.errors import ConfigError
from node.metrics import Metrics
from node.tls import check_config, expiry, loaded_at_start, seconds_left
from tests.tlscerts import make_pki


def _self_signed(folder: Path, not_before: dt.datetime, not_after: dt.datetime) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def _config(cert: Path, key: Path) -> NodeConfig:
    return NodeConfig.model_validate({"tls": {"certificate": str(cert), "private_key": str(key), "dimse_port": 2762}})


@pytest.mark.parametrize(("start", "end", "said"), [(-30, -1, "has expired"), (2, 30, "is not valid yet")])
def test_config_check_refuses_a_certificate_out_of_its_validity(tmp_path: Path, start: int, end: int,
                                                               said: str) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = _self_signed(tmp_path, now + dt.timedelta(days=start), now + dt.timedelta(days=end))
    with pytest.raises(ConfigError, match=f"tls.certificate: the certificate {said}"):
        check_config(_config(cert, key))


def test_the_expiry_metric_counts_down_to_the_node_certificate_s_end(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")  # valid for 2 days
    config = _config(pki.server_cert, pki.server_key)
    check_config(config)
    assert 1.9 * 86400 < seconds_left(pki.server_cert) <= 2 * 86400
    metrics = Metrics()
    metrics.bind(certificate_expiry=lambda: expiry(config))
    line = next(ln for ln in metrics.render()[0].decode().splitlines()
                if ln.startswith('pacsnode_tls_certificate_expiry_seconds{certificate="node"}'))
    assert 1.9 * 86400 < float(line.split()[-1]) <= 2 * 86400
    assert expiry(NodeConfig()) == {}  # no TLS listener: nothing presented, nothing exported


def test_the_metric_shows_the_certificate_loaded_not_one_renewed_on_disk(tmp_path: Path) -> None:
    """Renewing the file in place (certbot, a mounted secret) changes nothing the listener presents until a
    restart: the countdown must stay on the loaded certificate, or the alert never fires before it expires (found
    by review)."""
    now = dt.datetime.now(dt.UTC)
    cert, key = _self_signed(tmp_path / "a", now - dt.timedelta(days=1), now + dt.timedelta(days=3))
    config = _config(cert, key)
    loaded = loaded_at_start(config)
    renewed, _ = _self_signed(tmp_path / "b", now - dt.timedelta(days=1), now + dt.timedelta(days=90))
    cert.write_bytes(renewed.read_bytes())
    assert expiry(config, loaded)["node"] < 3 * 86400  # still the one presented
    assert expiry(config)["node"] > 80 * 86400  # the file's
