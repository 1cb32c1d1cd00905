"""node.syslog's stream transports against a real collector on loopback: TLS (RFC 5425) with octet-counting framing
and the collector's certificate verified (a wrong CA or host name: nothing is sent and the failure is counted), and
a collector that closes the connection between records (a restart, a load balancer's idle timeout) losing none, over
TCP and TLS. The `[audit]` keys for TLS are checked here too; the record format itself is tests/unit/test_audit.py's.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from node import syslog  # the module, so that each test fails on its own on a node.syslog without TLS
from node.audit import AuditTrail, StudySummary
from node.config import AuditSection, SyslogProtocol
from node.errors import ConfigError
from tests.conftest import wait_until
from tests.tlscerts import Pki, make_pki
from tests.unit.test_audit import RFC5424

PATIENT = "PAT-0042-DOE"
FRAME = re.compile(rb"([1-9][0-9]{0,8}) ")  # RFC 5425 4.3: MSG-LEN = NONZERO-DIGIT *DIGIT, then SP


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Collector:
    """A syslog collector on ``host``: plain TCP, or TLS (``context``) through memory BIOs so that every byte that
    crossed the wire is kept in ``raw``. Each connection's plaintext is split strictly by octet counting into
    ``messages`` (anything else lands in ``errors``); after ``close_after`` messages on one connection the
    collector closes it (TLS: close_notify first)."""

    def __init__(self, context: ssl.SSLContext | None = None, *, host: str = "127.0.0.1",
                 close_after: int | None = None) -> None:
        self.context, self.close_after = context, close_after
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self.errors: list[str] = []
        self.peer_certs: list[dict[str, Any]] = []
        self.raw = b""
        self.connections = self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):  # a client that resets mid-handshake
                self._serve(conn)
            self.closed += 1

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True) if self.context else None
        stream, count = b"", 0
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            self.raw += data
            if tls is not None:
                incoming.write(data)
                plain = self._decrypt(tls)
                conn.sendall(outgoing.read())
                if plain is None:
                    return
                data = plain
            stream, got = self._split(stream + data)
            self.messages += got
            count += len(got)
            if self.close_after is not None and count >= self.close_after:
                if tls is not None:
                    with contextlib.suppress(ssl.SSLError):
                        tls.unwrap()
                    conn.sendall(outgoing.read())
                return

    def _decrypt(self, tls: ssl.SSLObject) -> bytes | None:
        """The plaintext the bytes fed in so far complete (handshake first); None when the session ended."""
        plain = b""
        try:
            if tls.version() is None:  # still handshaking
                tls.do_handshake()
                self.peer_certs.append(tls.getpeercert())
            while True:
                plain += tls.read(65536)
        except ssl.SSLWantReadError:
            return plain
        except ssl.SSLZeroReturnError:  # the client's close_notify
            return None
        except ssl.SSLError as exc:
            self.errors.append(f"tls: {exc.reason}")
            return None

    def _split(self, stream: bytes) -> tuple[bytes, list[bytes]]:
        messages = []
        while stream:
            frame = FRAME.match(stream)
            if frame is None:
                if not re.fullmatch(rb"[1-9][0-9]{0,8}", stream):
                    self.errors.append(f"not octet-counted: {stream[:40]!r}")
                    stream = b""
                break
            end = frame.end() + int(frame[1])
            if len(stream) < end:
                break
            messages.append(stream[frame.end():end])
            stream = stream[end:]
        return stream, messages


@contextlib.contextmanager
def collector(*args: Any, **kwargs: Any) -> Iterator[Collector]:
    c = Collector(*args, **kwargs)
    try:
        yield c
    finally:
        c.stop()


def body(message: bytes) -> dict[str, Any]:
    m = RFC5424.match(message)
    assert m is not None, message
    return json.loads(m["msg"][len(syslog.BOM):])


def tls_settings(pki: Pki, port: int, **overrides: Any) -> AuditSection:
    settings: dict[str, Any] = dict(syslog_host="localhost", syslog_port=port, syslog_protocol="tls",
                                    syslog_ca_file=pki.ca)
    return AuditSection(**{**settings, **overrides})


def test_tls_records_arrive_octet_counted_from_a_verified_collector(tmp_path, pki):
    ctx = server_context(pki.server_cert, pki.server_key, client_ca=pki.ca)  # the collector asks for our certificate
    with collector(ctx) as c:
        settings = tls_settings(pki, c.port, syslog_client_certificate=pki.client_cert,
                                syslog_client_private_key=pki.client_key)
        failures: list[str] = []
        audit = AuditTrail(settings, tmp_path, ae_title="PACSNODE", on_failure=failures.append)
        audit.instances_received(studies=[StudySummary("1.2.3", {"1.2.840.10008.5.1.4.1.1.2": 3}, {PATIENT})],
                                 source_user="CT1", peer="10.0.0.5", context={"association_id": "a1"})
        audit.application(started=False)
        wait_until(lambda: len(c.messages) >= 2, 10, "two records at the TLS collector")
        audit.close()
    assert c.errors == [] and failures == []
    lines = audit.path.read_text().splitlines()
    assert [body(m) for m in c.messages] == [json.loads(line) for line in lines]
    assert PATIENT in json.dumps(body(c.messages[0])) and PATIENT.encode() not in c.raw  # in the record, not in clear
    assert c.connections == 1
    assert ("commonName", "client") in (rdn[0] for rdn in c.peer_certs[0]["subject"])


@pytest.mark.parametrize("case", ["wrong CA", "wrong host name"])
def test_an_unverified_collector_gets_nothing_and_the_failure_is_counted(pki, case):
    if case == "wrong CA":  # the collector's certificate chains to a CA we do not trust
        ctx, host = server_context(pki.other_server_cert, pki.other_server_key), "127.0.0.1"
    else:  # a good certificate, but it names localhost and 127.0.0.1, not 127.0.0.2
        ctx, host = server_context(pki.server_cert, pki.server_key), "127.0.0.2"
    c = Collector(ctx, host=host)  # (Linux routes all of 127/8 to loopback)
    try:
        errors: list[str] = []
        settings = tls_settings(pki, c.port, syslog_host=host)
        sender = syslog.SyslogSender.from_settings(settings, on_error=errors.append)
        sender.send(f"record for {PATIENT}".encode())
        wait_until(lambda: errors, 20, "the failure reported")
        sender.close()
    finally:
        c.stop()
    assert len(errors) == 1 and "certificate verify failed" in errors[0], errors
    assert c.connections >= 1 and c.raw  # it did try (handshakes) ...
    assert c.messages == [] and PATIENT.encode() not in c.raw  # ... and sent nothing, least of all in clear


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_a_collector_closing_between_records_loses_none(tmp_path, pki, protocol):
    ctx = server_context(pki.server_cert, pki.server_key) if protocol == "tls" else None
    with collector(ctx, close_after=1) as c:  # every connection is closed after one record
        extra = {"syslog_ca_file": pki.ca} if protocol == "tls" else {}
        settings = AuditSection(syslog_host="127.0.0.1", syslog_port=c.port, syslog_protocol=protocol, **extra)
        failures: list[str] = []
        audit = AuditTrail(settings, tmp_path, ae_title="PACSNODE", on_failure=failures.append)
        for n in range(3):
            audit.config_changed(source=None, applied=True, reason=f"RECORD-{n}")
            wait_until(lambda n=n: c.closed > n, 10, f"the collector to close connection {n + 1}",
                       diagnostics=lambda: f"received {len(c.messages)}, failures {failures}")
        audit.close()
    assert c.errors == [] and failures == []
    assert [body(m)["event"] for m in c.messages] == ["config_reloaded"] * 3
    assert [re.findall(rb"RECORD-\d", m) for m in c.messages] == [[b"RECORD-0"], [b"RECORD-1"], [b"RECORD-2"]]
    assert c.connections == 3


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_a_record_after_the_collector_went_away_is_a_counted_failure(pki, protocol):
    ctx = server_context(pki.server_cert, pki.server_key) if protocol == "tls" else None
    c = Collector(ctx, close_after=1)
    errors: list[str] = []
    tls = {"ssl_context": syslog.tls_context(AuditSection(syslog_protocol="tls", syslog_ca_file=pki.ca))} if ctx else {}
    sender = syslog.SyslogSender("127.0.0.1", c.port, SyslogProtocol(protocol), errors.append, **tls)
    try:
        sender.send(b"first")
        wait_until(lambda: c.closed, 10, "the collector to close the connection")
    finally:
        c.stop()  # and stop listening: the reconnect is refused
    sender.send(b"second")
    sender.close()
    assert c.messages == [b"first"]
    assert len(errors) == 1 and "refused" in errors[0].lower(), errors


def test_tls_settings():
    assert AuditSection(syslog_host="siem", syslog_protocol="tls").syslog_port == 6514  # RFC 5425 4.1
    assert AuditSection(syslog_host="siem", syslog_protocol="tls", syslog_port=10514).syslog_port == 10514
    assert AuditSection(syslog_host="siem", syslog_protocol="tcp").syslog_port == 514
    with pytest.raises(ValidationError, match="apply only with syslog_protocol = 'tls'"):
        AuditSection(syslog_host="siem", syslog_protocol="tcp", syslog_ca_file=Path("/ca.pem"))
    with pytest.raises(ValidationError, match="go together"):
        AuditSection(syslog_host="siem", syslog_protocol="tls", syslog_client_certificate=Path("/c.pem"))


def test_a_syslog_tls_file_that_does_not_load_names_its_key(tmp_path, pki):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"audit\.syslog_ca_file"):
        AuditTrail(AuditSection(syslog_host="siem", syslog_protocol="tls", syslog_ca_file=bogus), tmp_path,
                   ae_title="PACSNODE")
    with pytest.raises(ConfigError, match=r"audit\.syslog_client_certificate"):
        syslog.tls_context(AuditSection(syslog_protocol="tls", syslog_client_certificate=pki.client_cert,
                                 syslog_client_private_key=pki.other_server_key))


def test_config_loading_and_config_check_cover_the_syslog_tls_files(tmp_path, pki):
    """A missing syslog TLS file stops load_config naming its key, a relative one is taken like data_dir; `config
    check` (node.tls.check_config) builds the syslog context, so a file that does not load is refused there, not
    only when the audit trail starts."""
    from node.config import load_config
    from node.tls import check_config

    (tmp_path / "ca.pem").write_bytes(pki.ca.read_bytes())
    toml = tmp_path / "node.toml"
    toml.write_text('[audit]\nsyslog_host = "siem"\nsyslog_protocol = "tls"\nsyslog_ca_file = "ca.pem"\n')
    config = load_config(toml, environ={})
    assert config.audit.syslog_ca_file == (tmp_path / "ca.pem").resolve()
    check_config(config)
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"audit\.syslog"):
        check_config(load_config(toml, environ={}))
    toml.write_text('[audit]\nsyslog_host = "siem"\nsyslog_protocol = "tls"\nsyslog_ca_file = "gone.pem"\n')
    with pytest.raises(ConfigError, match=r"audit\.syslog_ca_file"):
        load_config(toml, environ={})
