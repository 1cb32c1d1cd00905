"""TLS contexts for every listener and sender: built here only, TLS 1.2 or newer with BCP 195 ciphers.

`server_context(tls)` is the node's own context (DICOM TLS listener and HTTPS), asking for client certificates as
``[tls] client_certificates`` says; `destination_tls_args(destination)` gives pynetdicom's ``tls_args`` for a DIMSE
destination with ``tls = true`` (hostname checked against ``host``); `requests_tls(destination)` gives the
``verify``/``cert`` for an https:// STOW-RS destination. `check_config` builds them all once, so a certificate
that does not load, or a key that does not match its certificate, is a `ConfigError` naming the key at start-up
(files that are missing or unreadable are refused earlier, by `node.config.load_config`).

With ``[tls] crl_file`` the server context checks each client certificate against its CA's CRL and follows the
file (`node.crl.ServerContext`, re-exported here); `calling_ae_refusal` says when a calling AE title may not
associate with the certificate presented (``[tls] calling_ae_certificates``, applied by `node.dimse` at
A-ASSOCIATE-RQ time).

A failed client handshake is remembered on its `ClientContext` (`handshake_error`): pynetdicom swallows it and
only reports that the association failed, which would leave a wrong CA indistinguishable from a peer that is down.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509

from node.config import Destination, DestinationKind, NodeConfig, SyslogProtocol, TlsSection
from node.crl import CRL_KEY, MAX_CRL_BYTES, ServerContext, crl_next_updates, crl_state, read_crls
from node.errors import ConfigError
from node.states import ClientCertificates

# BCP 195 (RFC 9325 4.2): TLS 1.2 with forward secrecy and AEAD only; TLS 1.3's suites are all acceptable and are
# configured apart from this list by OpenSSL.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_VERIFY_MODE = {
    ClientCertificates.REQUIRED: ssl.CERT_REQUIRED,
    ClientCertificates.OPTIONAL: ssl.CERT_OPTIONAL,
    ClientCertificates.NONE: ssl.CERT_NONE,
}


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _no_password(*_: Any) -> bytes:
    raise ConfigError("encrypted private keys are not supported (the node cannot be asked for a password)")


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, cert_key: str, key_key: str) -> None:
    try:
        ctx.load_cert_chain(certificate, private_key, password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"{key_key}: {exc}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{cert_key} / {key_key}: {certificate} and {private_key} do not load as a PEM certificate and its "
            f"private key ({_reason(exc)})"
        ) from exc


def _load_cas(ctx: ssl.SSLContext, ca_file: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{key}: {ca_file} is not a PEM CA bundle ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or type(exc).__name__


def server_context(tls: TlsSection) -> ServerContext:
    """The node's server-side context from ``[tls]`` (with ``crl_file``, revocation checked and the file followed,
    see `ServerContext`); raises `ConfigError` naming the key that does not load."""
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError("tls.certificate and tls.private_key are needed for a TLS listener")
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, tls.certificate, tls.private_key, "tls.certificate", "tls.private_key")
    if tls.ca_file is not None:
        _load_cas(ctx, tls.ca_file, "tls.ca_file")
    ctx.verify_mode = _VERIFY_MODE[tls.client_certificates]
    if tls.crl_file is not None and tls.ca_file is not None:
        ctx.follow_crl(tls.crl_file, tls.ca_file, _copies(tls))
    return ctx


def _copies(tls: TlsSection) -> Callable[[], ssl.SSLContext]:
    """What makes a fresh context like `server_context`'s, without CRLs, from the files as read now: `[tls]` is
    restart-only, so a certificate renewed on disk since does not slip in with the next CRL."""
    assert tls.certificate is not None and tls.private_key is not None and tls.ca_file is not None
    try:
        chain, key, cas = (path.read_bytes() for path in (tls.certificate, tls.private_key, tls.ca_file))
    except OSError as exc:
        raise ConfigError(f"tls: {exc.filename} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    verify_mode = _VERIFY_MODE[tls.client_certificates]

    def copy() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(ctx)
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        with _in_memory(chain) as chain_path, _in_memory(key) as key_path:  # the key never touches a disk
            ctx.load_cert_chain(chain_path, key_path, password=_no_password)
        with _in_memory(cas) as ca_path:  # as a file, as at start: cadata would skip CRLs a CA bundle holds
            ctx.load_verify_locations(cafile=ca_path)
        ctx.verify_mode = verify_mode
        return ctx

    return copy


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that reads ``data``, kept in memory only (a memfd), for as long as the block runs."""
    fd = os.memfd_create("pacsnode-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as out:
            out.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def certificate_names(peer_certificate: dict[str, Any]) -> frozenset[str]:
    """The names a verified peer certificate (``SSLSocket.getpeercert()``) carries, lower-cased: its
    subjectAltName DNS names or, when it has none, its subject's common names. RFC 6125 6.4.4: a CA that checks
    the SAN names may copy the CN from the request unchecked, so beside SAN DNS names a CN proves nothing."""
    names = {value for kind, value in peer_certificate.get("subjectAltName", ()) if kind == "DNS"}
    if not names:
        names = {value for rdn in peer_certificate.get("subject", ()) for key, value in rdn if key == "commonName"}
    return frozenset(name.lower() for name in names)


def calling_ae_refusal(tls: TlsSection, calling_ae: str, peer: ssl.SSLSocket | None) -> str | None:
    """Why ``calling_ae`` may not associate on this connection (``peer``: its TLS socket, None on the plaintext
    port) under ``[tls] calling_ae_certificates``; None when it may (always, with no table). Over TLS the AE title
    must be in the table and the verified client certificate must carry one of its names (`certificate_names`: SAN
    DNS, or the subject CN of one without); over plaintext an AE title in the table is refused. The reason names no
    peer data."""
    bound = tls.calling_ae_certificates
    if not bound:
        return None
    names = bound.get(calling_ae.strip())
    if peer is None:
        return None if names is None else "calling AE title is bound to a certificate: DICOM TLS only"
    if names is None:
        return "calling AE title is bound to no certificate"
    certificate = peer.getpeercert()
    if not certificate:
        return "no verified client certificate"
    if not {name.lower() for name in names} & certificate_names(certificate):
        return "client certificate does not name the calling AE title's peer"
    return None


class _RecordingSocket(ssl.SSLSocket):
    """An `ssl.SSLSocket` that leaves the reason of a failed handshake on its `ClientContext`."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            if isinstance(self.context, ClientContext):
                self.context.handshake_error = describe_tls_error(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context that remembers why its last handshake failed (``handshake_error``, else None)."""

    handshake_error: str | None = None
    sslsocket_class = _RecordingSocket


def presented_itself(exc: BaseException, reason: str) -> bool:
    """Whether a failed server-side handshake was a peer's attempt to authenticate (a certificate refused, no
    certificate, a protocol it offered), as opposed to a connection that closed, reset or stayed silent before TLS
    began — a load balancer's TCP probe, a port scan: counted and logged, but not audited as a login failure (a
    probe every few seconds added thousands of records a day). ``reason``: `describe_tls_error`'s."""
    return isinstance(exc, ssl.SSLError) and "eof" not in reason.lower()


def describe_tls_error(exc: BaseException) -> str:
    """A short reason for a TLS failure, e.g. ``certificate verify failed: unable to get local issuer
    certificate`` (no peer data in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or type(exc).__name__).replace("_", " ").lower()
    return f"{type(exc).__name__}: {exc}"


def client_context(
    ca_file: Path | None, certificate: Path | None = None, private_key: Path | None = None, *, key: str = "tls"
) -> ClientContext:
    """A context that verifies the peer against ``ca_file`` (None: the system's CAs) and its hostname, and offers
    ``certificate`` when given; `ConfigError` names ``key``'s file that does not load."""
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are its defaults
    _harden(ctx)
    if ca_file is not None:
        _load_cas(ctx, ca_file, f"{key}.ca_file")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None and private_key is not None:
        _load_chain(ctx, certificate, private_key, f"{key}.client_certificate", f"{key}.client_private_key")
    return ctx


def _destination_key(destination: Destination) -> str:
    return f"destinations ({destination.name})"


def destination_tls_args(destination: Destination) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` — (context, server hostname) — for a DIMSE destination, None without TLS."""
    if destination.kind is not DestinationKind.DIMSE or not destination.tls:
        return None
    assert destination.host is not None  # config validates dimse destinations
    ctx = client_context(destination.ca_file, destination.client_certificate, destination.client_private_key,
                         key=_destination_key(destination))
    return ctx, destination.host


def requests_tls(destination: Destination) -> tuple[str | bool, tuple[str, str] | None]:
    """``(verify, cert)`` for requests: the CA bundle path (True: the system's) and the client certificate."""
    verify: str | bool = str(destination.ca_file) if destination.ca_file is not None else True
    cert = None
    if destination.client_certificate is not None and destination.client_private_key is not None:
        cert = (str(destination.client_certificate), str(destination.client_private_key))
    return verify, cert


def certificates(config: NodeConfig) -> dict[str, Path]:
    """The certificates the node presents, by name: ``node`` (``[tls] certificate``, with a TLS listener) and
    ``destination <name>`` (a destination's client certificate), ``audit syslog`` (the syslog client's)."""
    out = {}
    if config.tls.certificate is not None and (config.tls.dimse_port is not None or config.tls.https):
        out["node"] = config.tls.certificate
    for destination in config.destinations:
        if destination.uses_tls and destination.client_certificate is not None:
            out[f"destination {destination.name}"] = destination.client_certificate
    audit = config.audit
    if audit.syslog_host and audit.syslog_protocol is SyslogProtocol.TLS and audit.syslog_client_certificate:
        out["audit syslog"] = audit.syslog_client_certificate
    return out


Validity = tuple[dt.datetime, dt.datetime]  # (not before, not after), UTC


def validity(certificate: Path) -> Validity:
    """The validity period of the first certificate in a PEM file; `ConfigError` for a file without one."""
    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{certificate.name}: no PEM certificate ({type(exc).__name__})") from exc
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def seconds_left(certificate: Path | Validity, now: dt.datetime | None = None) -> float:
    """Seconds until a certificate (a PEM file, or its `validity`) expires: negative once it has, minus infinity
    while it is not yet valid."""
    not_before, not_after = validity(certificate) if isinstance(certificate, Path) else certificate
    now = now or dt.datetime.now(dt.UTC)
    return float("-inf") if now < not_before else (not_after - now).total_seconds()


def loaded_at_start(config: NodeConfig) -> dict[str, Validity]:
    """The validity of the certificates read once, when the contexts are built at start (the listener's, the syslog
    client's): renewing the file in place changes nothing the node presents until it restarts."""
    return {name: validity(path) for name, path in certificates(config).items() if not name.startswith("destination ")}


def expiry(config: NodeConfig, loaded: dict[str, Validity] | None = None) -> dict[str, float]:
    """`seconds_left` of each of `certificates` (``pacsnode_tls_certificate_expiry_seconds``): those in ``loaded``
    (`loaded_at_start`) as loaded — the file may have been renewed since, which needs a restart to take effect —,
    destinations' client certificates as their files are now (read at each delivery)."""
    loaded = loaded or {}
    return {name: seconds_left(loaded.get(name) or path) for name, path in certificates(config).items()}


def check_config(config: NodeConfig) -> None:
    """Build every context the config asks for, and refuse a certificate the node presents that has expired or is
    not yet valid (every TLS peer would be refused, with only a handshake warning to say why); `ConfigError`
    naming the key of the first that fails."""
    tls = config.tls
    if tls.dimse_port is not None or tls.https:
        server_context(tls)
        if tls.crl_file is not None and tls.ca_file is not None:
            for crl in read_crls(tls.crl_file, tls.ca_file)[1]:
                if (state := crl_state(crl)) is not None:  # every certificate of that CA would be refused
                    raise ConfigError(f"{CRL_KEY}: the CRL of {crl.issuer.rfc4514_string()} {state} (next update "
                                      f"{crl.next_update_utc}, last update {crl.last_update_utc}); install a current "
                                      f"one")
    for destination in config.destinations:
        if destination.uses_tls:
            client_context(destination.ca_file, destination.client_certificate, destination.client_private_key,
                           key=_destination_key(destination))
    audit = config.audit
    if audit.syslog_host and audit.syslog_protocol is SyslogProtocol.TLS:
        client_context(audit.syslog_ca_file, audit.syslog_client_certificate, audit.syslog_client_private_key,
                       key="audit.syslog")
    for name, path in certificates(config).items():
        left = seconds_left(path)
        if left <= 0:
            state = "is not valid yet" if left == float("-inf") else "has expired"
            key = {"node": "tls.certificate", "audit syslog": "audit.syslog_client_certificate"}.get(name) or \
                f"destinations ({name.removeprefix('destination ')}).client_certificate"
            raise ConfigError(f"{key}: the certificate {state} ({path.name})")


__all__ = [
    "CIPHERS",
    "CRL_KEY",
    "ClientContext",
    "MAX_CRL_BYTES",
    "MINIMUM_VERSION",
    "ServerContext",
    "calling_ae_refusal",
    "certificate_names",
    "certificates",
    "check_config",
    "crl_next_updates",
    "crl_state",
    "client_context",
    "describe_tls_error",
    "expiry",
    "loaded_at_start",
    "destination_tls_args",
    "read_crls",
    "requests_tls",
    "seconds_left",
    "validity",
    "server_context",
]
