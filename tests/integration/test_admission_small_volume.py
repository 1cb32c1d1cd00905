"""A small ``data_dir`` volume beside a spool volume (docker-compose.scale.yml mounts the spool on its own volume;
here ``data_dir`` is a 192 MiB tmpfs and ``data_dir/spool`` a bind mount of the big disk): the temporary files of
STOW-RS bodies (``data_dir/incoming``) and the worker's results (``data_dir/results``) are judged against the hard
reserve admission applies to that file system — its bytes capped at 5 % of a volume without the spool — not the
full 512 MiB such a volume can never have free, which refused every STOW-RS body past its first free-space check
(64 MiB in) with 503 and paused the worker while admission said "accepting". Default ``[admission]`` settings.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import structlog

from node.admission import OTHER_RESERVE_SHARE, ReserveWatch
from node.config import AdmissionSection
from tests.conftest import NodeProcess, launch_node, missing_peer
from tests.ctgen import write_ct_series
from tests.integration.test_admission_tmpfs import MiB, fill, free_bytes, status, stow, wait_paused

pytestmark = pytest.mark.integration
TMPFS_BYTES = 192 * MiB


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        missing_peer(f"cannot mount here ({' '.join(args)}): {done.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_data_dir(tmp_path) -> Iterator[Path]:
    """``tmp_path/node/data``: a 192 MiB tmpfs whose ``spool`` folder is a bind mount of the big disk."""
    data = tmp_path / "node" / "data"
    data.mkdir(parents=True)
    big = tmp_path / "big-spool"
    big.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(data))
    try:
        (data / "spool").mkdir()
        _mount("--bind", str(big), str(data / "spool"))
        try:
            yield data
        finally:
            _umount(data / "spool")
    finally:
        _umount(data)


@pytest.fixture
def node(small_data_dir, node_database) -> Iterator[NodeProcess]:
    node = launch_node(small_data_dir.parent, database_url=node_database.for_node(),
                       extra_toml="\n[worker]\nenabled = false\n[admission]\ncheck_interval_seconds = 0.25\n")
    try:
        assert node.data_dir == small_data_dir
        yield node
    finally:
        node.stop()


def test_stow_rs_on_a_small_data_dir_volume_is_judged_on_its_capped_reserve(node, tmp_path):
    # 130 MiB free: with the 72 MiB body in (its temporary file is on this volume) still above the 38 MiB floor and
    # the 9.6 MiB reserve of a 192 MiB volume; the body is checked once, 64 MiB in
    fill(node.data_dir / "filler", free_bytes(node.data_dir) - 130 * MiB)
    series = write_ct_series(tmp_path / "in", slices=9, size=2048, seed=8200)
    answer = stow(node, series)
    assert answer.status_code == 200, answer.text[:500] + node.log_tail(3000)
    for path in series.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (node.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").is_file()
    assert status(node)["admission"]["paused"] == []

    # down to the capped reserve: refused, as admission refuses
    (node.data_dir / "filler").unlink()
    fill(node.data_dir / "filler", free_bytes(node.data_dir) - 2 * MiB)
    wait_paused(node, ["disk_floor", "disk_reserve"])
    refused = stow(node, write_ct_series(tmp_path / "late", slices=1, size=64, seed=8201))
    assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text[:500]


def test_the_workers_results_pause_on_a_small_volume_follows_the_capped_reserve(small_data_dir):
    results = small_data_dir / "results"
    results.mkdir()
    watch = ReserveWatch(results, small_data_dir / "spool", structlog.get_logger(), "paused", "resumed")
    settings = AdmissionSection()
    fill(small_data_dir / "filler", free_bytes(small_data_dir) - 24 * MiB)
    assert not watch.full(settings)  # 24 MiB free on a 192 MiB volume without the spool: not down to its reserve
    (small_data_dir / "filler").unlink()
    fill(small_data_dir / "filler", free_bytes(small_data_dir) - int(TMPFS_BYTES * OTHER_RESERVE_SHARE) + MiB)
    assert watch.full(settings)
    # the spool's own file system keeps the reserve's bytes in full: the big disk is judged on 512 MiB
    spool_watch = ReserveWatch(small_data_dir / "spool", small_data_dir / "spool", structlog.get_logger(), "p", "r")
    assert spool_watch.full(AdmissionSection(reserve_free_bytes=free_bytes(small_data_dir / "spool") + MiB,
                                             min_free_bytes=free_bytes(small_data_dir / "spool") + 2 * MiB))
    assert not spool_watch.full(settings)




def test_a_spilling_c_store_on_a_small_data_dir_volume_follows_the_capped_reserve(small_data_dir, monkeypatch):
    """The DIMSE side of the same: a C-STORE data set spilled to ``data_dir/incoming`` re-checks free space as it
    grows (node.guard.BoundedDataset; its sizes shrunk here, in process) against the reserve admission applies to
    that volume, not 512 MiB: with 24 MiB free of 192 it is kept; at 2 MiB free it is dropped (0xA700 to the
    peer)."""
    from node import guard

    monkeypatch.setattr(guard, "SPILL_BYTES", 64 << 10)
    monkeypatch.setattr(guard, "SPILL_CHECK_BYTES", 64 << 10)
    incoming = small_data_dir / "incoming"
    incoming.mkdir()
    chunk = b"\0" * (256 << 10)

    def receive() -> guard.BoundedDataset:
        data = guard.BoundedDataset(1 << 30, incoming, AdmissionSection(), small_data_dir / "spool")
        for _ in range(8):  # 2 MiB, checked every 64 KiB once spilled
            data.write(chunk)
        return data

    fill(small_data_dir / "filler", free_bytes(small_data_dir) - 24 * MiB)
    kept = receive()
    assert kept.failure is None and kept.spilled is not None and kept.received == 2 * MiB
    kept.discard()
    (small_data_dir / "filler").unlink()
    fill(small_data_dir / "filler", free_bytes(small_data_dir) - 2 * MiB)
    dropped = receive()
    assert dropped.failure is not None and "reserve" in str(dropped.failure)
