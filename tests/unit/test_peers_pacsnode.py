"""peers.pacsnode's config for the nodes the tests launch: loaded by the node's own config loader and judged by its
own admission thresholds, so a test node's intake does not depend on how full the build host's disk is."""

from __future__ import annotations

from pathlib import Path

from node.admission import thresholds
from node.config import load_config
from peers.pacsnode import REPO, node_toml

GB = 10**9


def _load(tmp_path: Path, extra_toml: str = "", database_url: str | None = None):
    path = tmp_path / "node.toml"
    path.write_text(node_toml("PACSNODE", 11112, 18080, tmp_path / "data", ["CT1"], extra_toml, database_url))
    return load_config(path, environ={})


def test_a_launched_node_judges_a_shared_hosts_disk_by_bytes_not_percent(tmp_path):
    """The CI run of 2026-12-06: 13.2 GB free of a 270 GB disk is below the default floor (5 % = 13.5 GB), so every
    test node refused new series (0xA700) and 22 tests failed. A launched node's floor is the default 2 GiB."""
    config = _load(tmp_path, "[worker]\nenabled = false\n", database_url="postgresql://u@127.0.0.1:5/db")
    floor, reserve = thresholds(config.admission, 270 * GB, spool=True)
    assert floor == 2 << 30 and reserve == 512 << 20 < 13 * GB
    assert config.node.port == 11112 and config.node.allowed_calling_aes == ("CT1",) and not config.worker.enabled
    assert config.database.url == "postgresql://u@127.0.0.1:5/db"
    # the shipped config's 5 % would have refused
    assert thresholds(load_config(REPO / "config" / "node.toml", environ={}).admission, 270 * GB, spool=True)[0] > 13 * GB


def test_a_tests_own_admission_table_is_left_as_written(tmp_path):
    config = _load(tmp_path, "[admission]\ncheck_interval_seconds = 0.25\n")
    assert config.admission.check_interval_seconds == 0.25 and config.admission.min_free_percent == 5.0
