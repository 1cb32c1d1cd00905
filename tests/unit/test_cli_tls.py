"""`pacsnode echo` and `pacsnode send` over DICOM TLS (`--tls`, `--ca-file`, `--certificate`, `--private-key`):
a manual export went in plaintext only (found by the security review). Against the node's own TLS listener with
client certificates required."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli import main
from tests.ctgen import write_ct_series
from tests.tlscerts import Pki, make_pki
from tests.unit.test_audit_events import TlsNode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[TlsNode]:
    node = TlsNode(tmp_path, pki)
    yield node
    node.stop()


def test_echo_and_send_over_dicom_tls(tls_node: TlsNode, pki: Pki, tmp_path: Path, capsys) -> None:
    peer = ["--aec", "PACSNODE", "--aet", "MODALITY"]
    client = ["--tls", "--ca-file", str(pki.ca), "--certificate", str(pki.client_cert),
              "--private-key", str(pki.client_key)]
    assert main(["echo", "127.0.0.1", str(tls_node.port), *peer, *client]) == 0
    assert main(["echo", "localhost", str(tls_node.port), *peer, "--tls", "--ca-file", str(pki.other_ca),
                 "--certificate", str(pki.client_cert), "--private-key", str(pki.client_key)]) != 0  # not trusted
    files = write_ct_series(tmp_path / "ct", slices=2, size=16).paths
    assert main(["send", *map(str, files), "--to", f"127.0.0.1:{tls_node.port}", *peer, *client]) == 0
    assert "sent 2/2 instances" in capsys.readouterr().out
    assert len(list(tls_node.config.node.spool_dir.rglob("*.dcm"))) == 2
    assert main(["echo", "127.0.0.1", str(tls_node.port), *peer, "--ca-file", str(pki.ca)]) == 2  # needs --tls
