"""Client certificate revocation for the node's TLS listeners (``[tls] crl_file``): `read_crls` reads and checks
the file, `ServerContext` follows it (a fresh context per change, holding the newest CRL of each CA),
`crl_next_updates` feeds ``pacsnode_tls_crl_next_update_seconds``. `node.tls.server_context` builds the context and
re-exports these.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import ssl
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from node.config import NodeConfig
from node.errors import ConfigError
from node.logs import get_logger

_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
CRL_KEY = "tls.crl_file"
# Far above any CA a hospital runs (~3.5 MB holds 100,000 revocations); past it, reading and parsing would hold off
# the listener's new connections for seconds (it is read in the accepting thread, the HTTPS event loop).
MAX_CRL_BYTES = 64 * 2**20


def _read_crl_file(crl_file: Path) -> bytes:
    """The bytes of ``crl_file``: a regular file (a FIFO would block, a device never end) of at most
    `MAX_CRL_BYTES`; `ConfigError` naming ``tls.crl_file`` otherwise."""
    try:
        fd = os.open(crl_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{CRL_KEY}: {crl_file} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    with open(fd, "rb") as src:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{CRL_KEY}: {crl_file} is not a regular file")
        if st.st_size > MAX_CRL_BYTES:
            raise ConfigError(f"{CRL_KEY}: {crl_file} is larger than {MAX_CRL_BYTES >> 20} MiB")
        try:
            data = src.read(MAX_CRL_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{CRL_KEY}: {crl_file} cannot be read ({exc.strerror or type(exc).__name__})") \
                from exc
    if len(data) > MAX_CRL_BYTES:  # it grew while read
        raise ConfigError(f"{CRL_KEY}: {crl_file} is larger than {MAX_CRL_BYTES >> 20} MiB")
    return data


# The critical CRL extensions OpenSSL handles (crypto/x509/x_crl.c): with any other it refuses every certificate of
# the CA ("unhandled critical CRL extension").
_HANDLED = frozenset({ExtensionOID.ISSUING_DISTRIBUTION_POINT, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                      ExtensionOID.DELTA_CRL_INDICATOR})


def read_crls(crl_file: Path, ca_file: Path) -> tuple[bytes, list[x509.CertificateRevocationList]]:
    """The PEM CRLs in ``crl_file`` (its bytes as read, and each parsed), each checked to be signed by a CA in
    ``ca_file``; `ConfigError` naming ``tls.crl_file`` for a file that cannot be read (`_read_crl_file`: a regular
    file of at most `MAX_CRL_BYTES`), holds no PEM CRL, holds one that does not parse or one no CA in ``ca_file``
    signed (OpenSSL would then refuse every certificate of the CA it names: "CRL signature failure") or a delta
    CRL (RFC 5280 5.2.4; without extended CRL support OpenSSL 3.0 scores it like a full CRL and, being newer than
    its base, uses it: every revocation in the base was ignored)."""
    data = _read_crl_file(crl_file)
    blocks = _CRL_PEM.findall(data)
    if not blocks:
        raise ConfigError(f"{CRL_KEY}: {crl_file} holds no PEM CRL ('-----BEGIN X509 CRL-----')")
    try:
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
        cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{CRL_KEY}: {crl_file} does not load as PEM CRLs ({type(exc).__name__})") from exc
    for crl in crls:
        if not any(ca.subject == crl.issuer and _signed_by(crl, ca) for ca in cas):
            raise ConfigError(f"{CRL_KEY}: the CRL of {crl.issuer.rfc4514_string()} in {crl_file} is not signed by "
                              f"a CA in tls.ca_file")
        if _is_delta(crl):  # OpenSSL would take it, the newest, for the whole CRL: the base's revocations void
            raise ConfigError(f"{CRL_KEY}: {crl_file} holds a delta CRL of {crl.issuer.rfc4514_string()}, which "
                              f"is not supported: the full CRL only")
        if unhandled := [e.oid.dotted_string for e in crl.extensions if e.critical and e.oid not in _HANDLED]:
            raise ConfigError(f"{CRL_KEY}: the CRL of {crl.issuer.rfc4514_string()} in {crl_file} has a critical "
                              f"extension {', '.join(unhandled)} that OpenSSL does not handle: it would refuse every "
                              f"certificate of that CA")
    return b"\n".join(blocks) + b"\n", crls


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a key type CRLs cannot be signed with
        return False


def crl_state(crl: x509.CertificateRevocationList, now: dt.datetime | None = None) -> str | None:
    """"has expired" (past its next update), "is not valid yet" (its last update ahead), None while current."""
    now = now or dt.datetime.now(dt.UTC)
    if crl.last_update_utc > now:
        return "is not valid yet"
    next_update = crl.next_update_utc
    return "has expired" if next_update is not None and next_update < now else None


class ServerContext(ssl.SSLContext):
    """The node's server context. With a CRL file (`follow_crl`) it checks each client certificate against its
    CA's CRL (``VERIFY_CRL_CHECK_LEAF``) and, before each new connection (DICOM TLS: `wrap_socket`; HTTPS,
    asyncio's handshake: `wrap_bio`), looks whether the file changed (one ``stat``) and loads the new CRLs: a
    revocation takes effect at the next connection in every listener process, without a restart or SIGHUP.

    The connections are then made by a fresh copy of this context holding the CRLs in force (`_copies`), one per
    change: OpenSSL's store can only grow, and the copy's empty session cache and new ticket key make a client
    that resumes a TLS session from before the change (resumption skips certificate verification) go through a
    full handshake — a revoked certificate cannot ride on its old session. The CRLs in force: per CA and scope
    (`_Scope`: one of a distribution point stands beside the full CRL), the newest (last update,
    then CRL number) of the new file's and the one in force before, a tie going to the new file; so
    a CRL reissued within the same second supersedes the old one, while a replayed older CRL, or a file without
    that CA's CRL, un-revokes nothing (``tls_crl_not_newer``). A CRL in force passing its next update also
    brings a fresh copy: a session made before cannot be resumed past it. A new file that does not read, parse or
    verify (`read_crls`; also one caught half written) is logged (``tls_crl_reload_failed``) and the CRLs loaded
    before stay in force; a CRL past its next update is logged (``tls_crl_expired``) and, as OpenSSL does, refuses every
    certificate of its CA ("CRL has expired") until a current one is installed: an expired CRL can no longer say
    whether a certificate was revoked since, and failing open would let a stolen certificate in exactly when
    publishing fails. Why the leaf only: README, "TLS"."""

    crl_file: Path | None = None
    _ca_file: Path | None = None
    _crl_seen: tuple[int, int, int] | None = None
    _current: ssl.SSLContext | None = None  # makes the connections while a CRL file is followed
    _lapses_at: dt.datetime | None = None  # when the next CRL in force passes its next update

    def follow_crl(self, crl_file: Path, ca_file: Path, copy: Callable[[], ssl.SSLContext]) -> None:
        """Check client certificates against the CRLs in ``crl_file`` from now on, on connections made by
        ``copy()`` contexts (like this one); `ConfigError` (`read_crls`) for a file that does not load, so a bad
        CRL stops the node before anything listens."""
        self.crl_file, self._ca_file, self._copy = crl_file, ca_file, copy
        self._crl_lock = threading.Lock()
        self._in_force: dict[_Scope, x509.CertificateRevocationList] = {}
        self._crl_seen = _file_signature(crl_file)
        self.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF  # this context itself holds no CRL: it refuses all
        self._load_crls()

    def _load_crls(self) -> list[x509.CertificateRevocationList]:
        assert self.crl_file is not None and self._ca_file is not None
        crls = read_crls(self.crl_file, self._ca_file)[1]
        log = get_logger(component="tls")
        in_force = dict(self._in_force)
        for scope, crl in _newest_by_scope(crls).items():
            if scope in in_force and not _supersedes(crl, in_force[scope]):
                log.warning("tls_crl_not_newer", issuer=crl.issuer.rfc4514_string(), file=str(self.crl_file),
                            kept="the CRL in force")
                continue
            in_force[scope] = crl
        self._install(in_force)
        return list(in_force.values())

    def _install(self, in_force: dict[_Scope, x509.CertificateRevocationList]) -> None:
        """Make the connections from now on with a fresh copy holding ``in_force`` (no session of the one before)."""
        try:
            ctx = self._copy()
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            # OpenSSL loads CRLs from a file only (cadata takes certificates): exactly the CRLs chosen
            with tempfile.NamedTemporaryFile(prefix="pacsnode-crl-", suffix=".pem") as pem:
                pem.write(b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in in_force.values()))
                pem.flush()
                ctx.load_verify_locations(cafile=pem.name)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{CRL_KEY}: {self.crl_file} does not load ({_reason(exc)})") from exc
        now = dt.datetime.now(dt.UTC)
        self._current, self._in_force = ctx, in_force
        self._lapses_at = min((crl.next_update_utc for crl in in_force.values()
                               if crl.next_update_utc is not None and crl.next_update_utc > now), default=None)
        for crl in in_force.values():
            if (state := crl_state(crl, now)) is not None:
                get_logger(component="tls").warning(
                    "tls_crl_expired", issuer=crl.issuer.rfc4514_string(), state=state,
                    next_update=str(crl.next_update_utc), file=str(self.crl_file))

    def refresh_crl(self) -> None:
        """Load ``crl_file`` again if it changed since it was last read (logged; a failure keeps the CRLs loaded);
        once a CRL in force passes its next update, a fresh copy all the same: a session made before cannot be
        resumed past it."""
        if self.crl_file is None:
            return
        seen = _file_signature(self.crl_file)
        if seen == self._crl_seen and not self._lapsed():
            return
        with self._crl_lock:
            if seen == self._crl_seen:
                if self._lapsed():  # no other connection's thread saw it meanwhile
                    try:
                        self._install(self._in_force)
                    except ConfigError as exc:  # not tried again until the file changes
                        self._lapses_at = None
                        get_logger(component="tls").error("tls_crl_reload_failed", reason=str(exc),
                                                          kept="the context before")
                return
            self._crl_seen = seen
            log = get_logger(component="tls")
            try:
                crls = self._load_crls()
            except ConfigError as exc:
                log.error("tls_crl_reload_failed", reason=str(exc), kept="the CRLs loaded before")
                return
            log.info("tls_crl_loaded", file=str(self.crl_file), crls=len(crls),
                     revoked=sum(len(crl) for crl in crls))

    def _lapsed(self) -> bool:
        return self._lapses_at is not None and dt.datetime.now(dt.UTC) >= self._lapses_at

    def cert_store_stats(self) -> dict[str, int]:
        """Those of the context making the connections (with a CRL file: the CRLs in force)."""
        return self._current.cert_store_stats() if self._current is not None else super().cert_store_stats()

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        self.refresh_crl()
        if self._current is not None:
            return self._current.wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                             server_hostname, session)
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                   server_hostname, session)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        self.refresh_crl()
        if self._current is not None:
            return self._current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


# Which CRLs replace one another: one CA's, of one scope (RFC 5280 5.2.5 issuing distribution point: a CA may
# partition its CRLs, e.g. its CA certificates' apart).
_Scope = tuple[x509.Name, bytes | None]


def _scope(crl: x509.CertificateRevocationList) -> _Scope:
    try:
        return crl.issuer, crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.public_bytes()
    except x509.ExtensionNotFound:
        return crl.issuer, None


def _is_delta(crl: x509.CertificateRevocationList) -> bool:
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        return False
    return True


def _newest_by_scope(crls: list[x509.CertificateRevocationList]) -> dict[_Scope, x509.CertificateRevocationList]:
    newest: dict[_Scope, x509.CertificateRevocationList] = {}
    for crl in crls:
        scope = _scope(crl)
        if scope not in newest or _supersedes(crl, newest[scope]):
            newest[scope] = crl
    return newest


def _supersedes(new: x509.CertificateRevocationList, old: x509.CertificateRevocationList) -> bool:
    """Whether ``new`` replaces ``old`` (of one `_Scope`): a later last update, or the same with a CRL number not lower
    (RFC 5280 5.2.3: it only grows) — a CA may reissue its CRL within one second, which X.509 times cannot tell."""
    if new.last_update_utc != old.last_update_utc:
        return new.last_update_utc > old.last_update_utc
    numbers = [_crl_number(crl) for crl in (new, old)]
    return None in numbers or numbers[0] >= numbers[1]  # type: ignore[operator]


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


_next_updates: dict[Path, tuple[tuple[int, int, int] | None, dict[str, dt.datetime]]] = {}


def crl_next_updates(config: NodeConfig, now: dt.datetime | None = None) -> dict[str, float]:
    """Seconds until each CRL in ``[tls] crl_file`` passes its next update, by issuer
    (``pacsnode_tls_crl_next_update_seconds``; negative once past: every client certificate of that CA is then
    refused, `ServerContext`). Read from the file as it is now, which the listeners follow; parsed again only when
    the file changed. A file that does not load keeps the last values read (the listeners keep those CRLs too)."""
    tls = config.tls
    if tls.crl_file is None or tls.ca_file is None:
        return {}
    seen = _file_signature(tls.crl_file)
    cached = _next_updates.get(tls.crl_file)
    if cached is None or cached[0] != seen:
        try:
            crls = read_crls(tls.crl_file, tls.ca_file)[1]
        except ConfigError:
            crls = None
        if crls is not None:
            cached = (seen, {crl.issuer.rfc4514_string(): crl.next_update_utc for crl in crls
                             if crl.next_update_utc is not None})
            _next_updates[tls.crl_file] = cached
    now = now or dt.datetime.now(dt.UTC)
    return {issuer: (when - now).total_seconds() for issuer, when in (cached[1] if cached else {}).items()}


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (inode, size, modification time); None: unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or type(exc).__name__


__all__ = ["CRL_KEY", "MAX_CRL_BYTES", "ServerContext", "crl_next_updates", "crl_state", "read_crls"]
