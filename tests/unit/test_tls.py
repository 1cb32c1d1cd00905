"""TLS (node/tls.py, the [tls] config, DICOM TLS in node/acceptor.py and node/dimse.py, DIMSE TLS in node/scu.py).

Certificates are made per module with the ``openssl`` command (tests/tlscerts.py). The node's DIMSE server runs
in-process (`DimseServer` over a real spool and index, like tests/unit/test_hostile_dimse.py) with DCMTK's
``echoscu``/``storescu`` as the TLS peers, Python's ``ssl`` as the hostile or outdated one, and the node's own
`DimseSender` as the client of a TLS destination.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from structlog.testing import capture_logs

from node.acceptor import GuardedServer
from node.cli import main as cli_main
from node.config import Destination, NodeConfig, NodeSection, TlsSection, load_config
from node.db import create_engine_for, init_schema
from node.dimse import DimseServer
from node.errors import ConfigError
from node.index import Index
from node.ingest import Ingestor
from node.senders import DimseSender, TransientSendError
from node.spool import Spool
from node.tls import check_config, client_context, server_context
from peers import PeerTimeoutError
from tests.conftest import free_port, peer_env, require_tool, wait_until
from tests.ctgen import write_ct_series
from tests.tlscerts import Pki, make_pki

AE_TITLE = "PACSNODE"
A_ABORT = 0x07


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- the node ------------------------------------------------------------------------------------------------------
class TlsNode:
    """An in-process DIMSE server with a DICOM TLS listener."""

    def __init__(self, tmp_path: Path, pki: Pki, *, node: dict[str, Any], tls: dict[str, Any]) -> None:
        settings: dict[str, Any] = dict(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data",
                                        ae_title=AE_TITLE, association_timeout_seconds=5.0,
                                        network_timeout_seconds=5.0)
        settings.update(node)
        tls_settings: dict[str, Any] = dict(certificate=pki.server_cert, private_key=pki.server_key, ca_file=pki.ca,
                                            client_certificates="required", dimse_port=free_port())
        tls_settings.update(tls)
        self.config = NodeConfig(node=NodeSection(**settings), tls=TlsSection(**tls_settings))
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        self.server = DimseServer(self.config, Ingestor(Spool(self.config.node.spool_dir), Index(self.engine)),
                                  Index(self.engine))
        self.server.start()
        address = self.server.tls_address
        assert address is not None
        self.tls_port = address[1]

    @property
    def tls_server(self) -> GuardedServer:
        return self.server.servers[-1]

    def spooled(self) -> list[Path]:
        return sorted(self.config.node.spool_dir.rglob("*.dcm"))

    def stop(self) -> None:
        self.server.stop()
        self.engine.dispose()


@pytest.fixture
def make_node(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., TlsNode]]:
    nodes: list[TlsNode] = []

    def _make(node: dict[str, Any] | None = None, **tls: Any) -> TlsNode:
        nodes.append(TlsNode(tmp_path / f"n{len(nodes)}", pki, node=node or {}, tls=tls))
        return nodes[-1]

    yield _make
    for n in nodes:
        n.stop()


def dcmtk(tool: str, pki: Pki, port: int, *args: str, tls: tuple[str, ...] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run echoscu/storescu against the node; ``tls`` defaults to a client certificate and the right CA."""
    if tls is None:
        tls = ("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca))
    cmd = [require_tool(tool), "-aet", "MODALITY", "-aec", AE_TITLE, *tls, *args, "127.0.0.1", str(port)]
    if tool == "storescu":  # files go last
        cmd = [*cmd[:-2 - len(args)], "127.0.0.1", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=timeout)


# -- config --------------------------------------------------------------------------------------------------------
def test_tls_section_needs(pki: Pki) -> None:
    with pytest.raises(ValueError, match="dimse_port and https need certificate"):
        TlsSection(dimse_port=2762)
    with pytest.raises(ValueError, match="needs ca_file"):
        TlsSection(certificate=pki.server_cert, private_key=pki.server_key, client_certificates="required")
    with pytest.raises(ValueError, match="TLS only"):
        TlsSection(certificate=pki.server_cert, private_key=pki.server_key, plaintext_dimse=False)
    with pytest.raises(ValueError, match="go together"):
        TlsSection(certificate=pki.server_cert)
    with pytest.raises(ValueError, match="already"):
        NodeConfig(node=NodeSection(port=2762),
                   tls=TlsSection(certificate=pki.server_cert, private_key=pki.server_key, dimse_port=2762))
    # TLS only: the TLS listener may take over the plaintext port number
    NodeConfig(node=NodeSection(port=2762), tls=TlsSection(certificate=pki.server_cert, private_key=pki.server_key,
                                                          dimse_port=2762, plaintext_dimse=False))


def test_destination_tls_needs(pki: Pki) -> None:
    dimse = dict(name="p", kind="dimse", ae_title="PACS", host="127.0.0.1", port=104)
    with pytest.raises(ValueError, match="ca_file apply only with tls = true"):
        Destination(**dimse, ca_file=pki.ca)
    with pytest.raises(ValueError, match="go together"):
        Destination(**dimse, tls=True, client_certificate=pki.client_cert)
    with pytest.raises(ValueError, match="needs an https:// url"):
        Destination(name="w", kind="dicomweb", url="http://127.0.0.1/dicom-web", tls=True)
    with pytest.raises(ValueError, match="only with an https:// url"):
        Destination(name="w", kind="dicomweb", url="http://127.0.0.1/dicom-web", ca_file=pki.ca)
    assert Destination(name="w", kind="dicomweb", url="https://pacs/dicom-web", ca_file=pki.ca).uses_tls
    assert Destination(**dimse, tls=True).uses_tls


def _write_config(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    path = folder / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{body}')
    return path


def test_load_config_resolves_relative_paths_and_fails_fast_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    local = tmp_path / "cfg"
    local.mkdir()
    (local / "ca.pem").write_bytes(pki.ca.read_bytes())
    path = _write_config(tmp_path, f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
                                   'ca_file = "ca.pem"\ndimse_port = 2762\n')
    config = load_config(path, environ={})
    assert config.tls.ca_file == local / "ca.pem"  # relative to the config file's folder

    path = _write_config(tmp_path, f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "missing.key"\n'
                                   'dimse_port = 2762\n')
    with pytest.raises(ConfigError, match=r"tls\.private_key: .*missing\.key cannot be read"):
        load_config(path, environ={})

    path = _write_config(tmp_path, '[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\n'
                                   f'host = "127.0.0.1"\nport = 104\ntls = true\nca_file = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\] \(pacs\)\.ca_file: .* cannot be read"):
        load_config(path, environ={})  # a folder, not a file (root reads any file, so no chmod test)


def test_certificates_that_do_not_load_name_the_key(tmp_path: Path, pki: Pki) -> None:
    mismatched = TlsSection(certificate=pki.server_cert, private_key=pki.client_key, dimse_port=2762)
    with pytest.raises(ConfigError, match=r"tls\.certificate / tls\.private_key: .*do not load"):
        server_context(mismatched)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.ca_file: .* is not a PEM CA bundle"):
        server_context(TlsSection(certificate=pki.server_cert, private_key=pki.server_key, ca_file=garbage,
                                  https=True))
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([require_tool("openssl"), "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True)
    with pytest.raises(ConfigError, match=r"tls\.private_key: encrypted private keys are not supported"):
        server_context(TlsSection(certificate=pki.server_cert, private_key=encrypted, https=True))
    dest = Destination(name="pacs", kind="dimse", ae_title="PACS", host="h", port=104, tls=True, ca_file=garbage)
    with pytest.raises(ConfigError, match=r"destinations \(pacs\)\.ca_file"):
        check_config(NodeConfig(destinations=(dest,)))


def test_config_check_loads_the_certificates(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_config(tmp_path, f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.client_key}"\n'
                                   'https = true\n')
    assert cli_main(["config", "check", "--config", str(path)]) == 2
    assert "tls.certificate / tls.private_key" in capsys.readouterr().err
    path.write_text(path.read_text().replace(str(pki.client_key), str(pki.server_key)))
    assert cli_main(["config", "check", "--config", str(path)]) == 0


# -- the DICOM TLS listener against DCMTK ---------------------------------------------------------------------------
def test_dcmtk_echo_and_store_over_tls(make_node: Callable[..., TlsNode], pki: Pki, tmp_path: Path) -> None:
    node = make_node()
    echo = dcmtk("echoscu", pki, node.tls_port)
    assert echo.returncode == 0, echo.stderr
    series = write_ct_series(tmp_path / "ct", slices=3)
    store = dcmtk("storescu", pki, node.tls_port, *map(str, series.paths))
    assert store.returncode == 0, store.stderr
    assert sorted(p.stem for p in node.spooled()) == sorted(series.sop_uids)


@pytest.mark.parametrize(("case", "node_says"), [
    ("no client certificate", "peer did not return a certificate"),
    ("client certificate of another CA", "certificate verify failed: unable to get local issuer certificate"),
    ("server not trusted (wrong CA)", "alert unknown ca"),
    ("plaintext client", "wrong version number"),
])
def test_dcmtk_refused_without_the_right_certificates(
    make_node: Callable[..., TlsNode], pki: Pki, tmp_path: Path, case: str, node_says: str
) -> None:
    node = make_node()
    tls = {
        "no client certificate": ("+tla", "+cf", str(pki.ca)),
        "client certificate of another CA": ("+tls", str(pki.other_server_key), str(pki.other_server_cert),
                                             "-pw", "+cf", str(pki.ca)),
        "server not trusted (wrong CA)": ("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf",
                                          str(pki.other_ca)),
        "plaintext client": (),
    }[case]
    series = write_ct_series(tmp_path / "ct", slices=1)
    with capture_logs() as logs:
        store = dcmtk("storescu", pki, node.tls_port, *map(str, series.paths), tls=tls)
        assert store.returncode != 0, store.stderr
        assert "Association Request Failed" in store.stderr, store.stderr  # refused by TLS, not a usage error
        failed = wait_until(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5,
                            "the node to log the failed handshake")
    assert node_says in failed[0]["why"]
    assert node.spooled() == []
    assert dcmtk("echoscu", pki, node.tls_port).returncode == 0  # the listener serves the next peer


def test_optional_client_certificates(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    node = make_node(client_certificates="optional")
    assert dcmtk("echoscu", pki, node.tls_port, tls=("+tla", "+cf", str(pki.ca))).returncode == 0
    assert dcmtk("echoscu", pki, node.tls_port).returncode == 0
    untrusted = ("+tls", str(pki.other_server_key), str(pki.other_server_cert), "-pw", "+cf", str(pki.ca))
    assert dcmtk("echoscu", pki, node.tls_port, tls=untrusted).returncode != 0  # one that is sent must verify


def test_tls_only_mode_has_no_plaintext_listener(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    node = make_node(plaintext_dimse=False)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.config.node.port), timeout=2).close()
    assert node.server.address == ("127.0.0.1", node.tls_port)
    assert dcmtk("echoscu", pki, node.tls_port).returncode == 0


# -- hostile and outdated peers -------------------------------------------------------------------------------------
def test_silent_connection_does_not_block_the_tls_listener(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    """pynetdicom would do the server handshake in its acceptor thread; a peer that never sends a ClientHello
    then blocks every later connection (the accepted socket has no timeout). The guard does it per connection."""
    timeout = 2.5
    node = make_node({"association_timeout_seconds": timeout})
    silent = socket.create_connection(("127.0.0.1", node.tls_port))
    try:
        # its accept (pynetdicom's acceptor would block inside it: then no count, and the echo below shows it)
        with contextlib.suppress(PeerTimeoutError):
            wait_until(lambda: node.tls_server.handshaking >= 1, 2, "the silent connection to be accepted")
        t0 = time.monotonic()
        echo = dcmtk("echoscu", pki, node.tls_port, timeout=20)
        took = time.monotonic() - t0
        assert echo.returncode == 0, echo.stderr
        assert took < timeout, f"echo waited {took:.1f} s: the silent connection held the acceptor"
        assert node.tls_server.handshaking == 1  # the silent connection was accepted before the echo
        silent.settimeout(timeout + 5)  # and the silent one is dropped at the association deadline
        t0 = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - t0 < timeout + 2
    finally:
        silent.close()
    wait_until(lambda: node.tls_server.handshaking == 0, 5, "the handshake count to drop")


def test_handshakes_count_against_the_connection_cap(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    # 2 connections at most; the caps alone (with reclaim on, the modality would displace the longest-silent one:
    # tests/unit/test_review_security_tls.py)
    node = make_node({"max_associations": 1, "association_timeout_seconds": 1.5, "reclaim_idle_seconds": None})
    silent = [socket.create_connection(("127.0.0.1", node.tls_port)) for _ in range(2)]
    try:
        wait_until(lambda: node.tls_server.handshaking == 2, 5, "both silent connections to be accepted")
        assert dcmtk("echoscu", pki, node.tls_port, timeout=20).returncode != 0  # closed at accept
        wait_until(lambda: node.tls_server.handshaking == 0, 10, "the silent connections to time out")
        assert dcmtk("echoscu", pki, node.tls_port).returncode == 0
    finally:
        for s in silent:
            s.close()


def _tls_client(pki: Pki, port: int) -> ssl.SSLSocket:
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def test_guard_limits_hold_over_tls(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    node = make_node({"association_timeout_seconds": 1.5, "max_pdu_bytes": 16384})
    # A declared 4 GiB A-ASSOCIATE-RQ is aborted before a byte of its body is read.
    with _tls_client(pki, node.tls_port) as sock:
        sock.sendall(bytes([0x01, 0x00]) + (0xFFFFFFF0).to_bytes(4, "big"))
        reply = sock.recv(10)
        assert reply and reply[0] == A_ABORT, reply
    # Half a PDU header, then silence: closed at the negotiation deadline.
    with _tls_client(pki, node.tls_port) as sock:
        sock.sendall(b"\x01\x00\x00")
        t0 = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - t0 < 1.5 + 2
    assert dcmtk("echoscu", pki, node.tls_port).returncode == 0


@pytest.mark.parametrize("case", ["TLS 1.1", "TLS 1.2 without forward secrecy"])
def test_outdated_tls_is_refused(make_node: Callable[..., TlsNode], pki: Pki, case: str) -> None:
    """BCP 195: TLS 1.2 or newer, ECDHE/DHE with AEAD. These clients do complete against a permissive server."""
    node = make_node(client_certificates="none")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 itself is deprecated
        if case == "TLS 1.1":
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        else:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("AES128-SHA256:AES256-GCM-SHA384")  # RSA key exchange
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw:
        ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()


def test_tls_1_2_with_forward_secrecy_is_accepted(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    """Peers without TLS 1.3 (older modalities) still connect with an ECDHE AEAD suite."""
    node = make_node()
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        assert (sock.version(), sock.cipher()[0]) == ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")


# -- the node as a DICOM TLS client (DimseSender) ------------------------------------------------------------------
def test_dimse_sender_over_tls(make_node: Callable[..., TlsNode], pki: Pki) -> None:
    node = make_node()
    source = Path(str(get_testdata_file("CT_small.dcm")))
    dest = Destination(name="node", kind="dimse", ae_title=AE_TITLE, host="127.0.0.1", port=node.tls_port, tls=True,
                       ca_file=pki.ca, client_certificate=pki.client_cert, client_private_key=pki.client_key)
    DimseSender("SENDER", 10).send(dest, [source])
    assert len(node.spooled()) == 1
    with pytest.raises(TransientSendError, match="TLS handshake failed: certificate verify failed"):
        DimseSender("SENDER", 10).send(dest.model_copy(update={"ca_file": pki.other_ca}), [source])
    other = make_node({"host": "127.0.0.2"})  # loopback too, but not among the certificate's names
    with pytest.raises(TransientSendError, match="TLS handshake failed: certificate verify failed: .*mismatch"):
        DimseSender("SENDER", 10).send(dest.model_copy(update={"host": "127.0.0.2", "port": other.tls_port}),
                                       [source])
    assert other.spooled() == []
