"""Completion as real senders drive it: DCMTK storescu (one association for a series, or one per file, as CT
scanners and PACS forward) and pynetdicom's AE as SCU against the node's DIMSE server in process (real spool,
index and completion sweeper; sweeps run by hand between sends, so each interleaving is certain).

The subject: a series that completed on its announced count (ImagesInAcquisition) and is then sent again with
changed bytes — a PACS forwarding it in another transfer syntax, or re-sending it after a patient reconciliation.
Each changed instance re-opens the series with its count still at the announced one, which the count rule took for
"whole": every sweep during the re-send made a new result version (and a rejection note withdrawing the last one).
The re-send must give one new version, once it is whole; a correction of a few instances waits for the quiet timer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
from pynetdicom import AE

from node.completion import CompletionReason, CompletionSweeper
from node.config import NodeConfig, NodeSection
from node.db import create_engine_for, init_schema
from node.dimse import DimseServer
from node.index import Index
from node.ingest import Ingestor
from node.queue import JobQueue, jobs
from node.spool import Spool
from node.states import SeriesState
from peers import dcmtk
from tests.conftest import free_port, require_tool
from tests.ctgen import CtSeries, write_ct_series

AE_TITLE = "PACSNODE"
SLICES = 8
STABLE_SECONDS = 30.0


class Node:
    """The DIMSE server over a real spool and index, and a sweeper whose clock can be moved ahead (``skip``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = NodeConfig(node=NodeSection(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data",
                                                  ae_title=AE_TITLE),
                                 completion={"stable_seconds": STABLE_SECONDS})
        self.engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
        init_schema(self.engine)
        index = Index(self.engine)
        self.index = index
        self.server = DimseServer(self.config, Ingestor(Spool(self.config.node.spool_dir), index), index)
        self.server.start()
        self.port = self.server.address[1]
        self.ahead = 0.0
        self.sweeper = CompletionSweeper(self.config, self.engine, JobQueue(self.engine, self.config.queue),
                                         clock=lambda: time.time() + self.ahead)

    def versions(self, series_uid: str) -> list[int]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(jobs.c.version).where(jobs.c.series_uid == series_uid)).scalars())

    def stop(self) -> None:
        self.server.stop()
        self.engine.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.stop()


def as_implicit(written: CtSeries, out: Path, paths: list[Path] | None = None) -> list[Path]:
    """The same instances (same UIDs, same pixels) re-encoded as Implicit VR Little Endian, as a PACS forwards them
    in its own transfer syntax: other bytes, so each one replaces the stored one."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths or written.paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        copy = out / Path(path).name
        ds.save_as(copy, enforce_file_format=True, implicit_vr=True, little_endian=True)
        copies.append(copy)
    return copies


def first_version(node: Node, tmp_path: Path) -> CtSeries:
    """A series announcing its count, sent by storescu in one association: complete at once on the count."""
    written = write_ct_series(tmp_path / "scan", slices=SLICES, size=16, images_in_acquisition=True)
    dcmtk.storescu(node.port, *written.paths, calling_ae="CT1", check=True)
    assert [(v, r) for _, v, r in node.sweeper.sweep()] == [(1, CompletionReason.EXPECTED_COUNT)]
    return written


def test_a_resend_one_association_per_file_gives_one_new_version(node, tmp_path):
    require_tool("storescu")
    written = first_version(node, tmp_path)
    for copy in as_implicit(written, tmp_path / "forwarded"):
        dcmtk.storescu(node.port, copy, calling_ae="PACS1", check=True)  # storescu per file, as a PACS forwards
        node.sweeper.sweep()
    assert node.versions(written.series_uid) == [1, 2]  # was [1, 2, ..., 9]: a version per sweep
    assert node.index.get_series(written.series_uid).state == SeriesState.COMPLETE


def test_a_resend_in_one_association_completes_once_it_is_whole(node, tmp_path):
    written = first_version(node, tmp_path)
    copies = as_implicit(written, tmp_path / "forwarded")
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        for n, copy in enumerate(copies, 1):
            assert assoc.send_c_store(pydicom.dcmread(copy)).Status == 0
            done = node.sweeper.sweep()
            assert done == ([] if n < len(copies) else [(written.series_uid, 2, CompletionReason.EXPECTED_COUNT)])
    finally:
        assoc.release()
    assert node.versions(written.series_uid) == [1, 2]


def test_a_few_corrected_instances_wait_for_the_quiet_timer(node, tmp_path):
    require_tool("storescu")
    written = first_version(node, tmp_path)
    dcmtk.storescu(node.port, *as_implicit(written, tmp_path / "fixed", written.paths[2:4]), calling_ae="CT1",
                   check=True)
    assert node.index.get_series(written.series_uid).state == SeriesState.REOPENED
    assert node.sweeper.sweep() == []  # its count was reached long ago: that says nothing about this change
    node.ahead = STABLE_SECONDS
    assert node.sweeper.sweep() == [(written.series_uid, 2, CompletionReason.QUIET_TIMER)]
    assert node.versions(written.series_uid) == [1, 2]


def test_a_missing_slice_sent_later_gives_one_new_version(node, tmp_path):
    """A series completed short of its count (the timeout), whose sender then retries the whole series: the stored
    slices come again unchanged (nothing re-opens), then the missing one re-opens it. One new version: at once where
    the re-send is all counted since the re-opening, else by the quiet timer — never one per sweep."""
    require_tool("storescu")
    written = write_ct_series(tmp_path / "scan", slices=SLICES, size=16, images_in_acquisition=True)
    dcmtk.storescu(node.port, *written.paths[:-1], calling_ae="CT1", check=True)
    node.ahead = node.config.completion.expected_count_timeout_seconds
    assert [r for _, _, r in node.sweeper.sweep()] == [CompletionReason.EXPECTED_COUNT_TIMEOUT]
    node.ahead = 0.0
    dcmtk.storescu(node.port, *written.paths, calling_ae="CT1", check=True)
    assert node.index.get_series(written.series_uid).state == SeriesState.REOPENED
    assert node.sweeper.sweep() == []
    node.ahead = STABLE_SECONDS
    assert node.sweeper.sweep() == [(written.series_uid, 2, CompletionReason.QUIET_TIMER)]
    assert node.versions(written.series_uid) == [1, 2]
