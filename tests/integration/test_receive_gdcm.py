"""The receive path against GDCM's ``gdcmscu`` as the modality (a second DICOM stack next to DCMTK's, with its own
presentation-context proposals): C-ECHO, and one association carrying a CT series together with real compressed
files from pydicom-data, each of which must land in the spool element for element, decode to the same pixels and be
indexed.

gdcmscu's exit status cannot be used (Debian's build aborts at the end of every run, see `peers.gdcm`), so every
check is on the node's side: its index, its spool and its association counter (released, not aborted).
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file

from peers.gdcm import gdcmscu
from peers.pacsnode import NodeProcess, launch_node
from peers.process import wait_until
from tests.conftest import missing_peer, wait_for_port
from tests.ctgen import write_ct_series
from tests.dicomfiles import content, pixels

pytestmark = pytest.mark.integration
RECEIVE_ONLY = "\n[worker]\nenabled = false\n"
REAL_FILES = (
    "693_J2KR.dcm",  # real CT, JPEG 2000 lossless (pydicom-data)
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "SC_rgb_jpeg_lossy_gdcm.dcm",  # JPEG baseline, written by GDCM
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_rle.dcm",  # RLE lossless (the third Secondary Capture, each in its own transfer syntax)
    "CT_small.dcm",  # explicit VR little endian
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, node_database) -> Iterator[NodeProcess]:
    node = launch_node(tmp_path_factory.mktemp("gdcm-node"), database_url=node_database.for_node(),
                       extra_toml=RECEIVE_ONLY)
    try:
        yield node
    finally:
        node.stop()


def associations(node: NodeProcess) -> dict[str, float]:
    wait_for_port(node.http_port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
    prefix = 'pacsnode_associations_total{event="'
    return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def associations_after(node: NodeProcess, before: dict[str, float]) -> dict[str, float]:
    """The counts once the node has counted the association that just ended: the peer has its A-RELEASE-RP before
    the node's EVT_RELEASED handler runs (pynetdicom sends the RP first) and writes the index, so a scrape right
    after the peer's exit can come before it."""
    return wait_until(lambda: (now := associations(node)).get("released", 0) > before.get("released", 0) and now,
                      10, "the released association counted", lambda: node.log_tail(4000))


def indexed_paths(node: NodeProcess) -> dict[str, Path]:
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            return {r.sop_uid: Path(r.path) for r in conn.execute(sa.text("select sop_uid, path from instances"))}
    finally:
        engine.dispose()


def test_echo(node):
    before = associations(node)
    run = gdcmscu(node.port, "echo", called_ae=node.ae_title, calling_ae="GDCM-MOD")
    assert run.connected and not run.crashed_otherwise, run.output[-2000:]
    after = associations_after(node, before)
    assert after.get("released", 0) == before.get("released", 0) + 1, node.log_tail(4000)
    assert after.get("aborted", 0) == before.get("aborted", 0)


def test_series_and_real_compressed_files_in_one_association(node, tmp_path):
    folder = tmp_path / "send"
    series = write_ct_series(folder / "series", slices=8, size=48, seed=8100)
    for name in REAL_FILES:
        source = get_testdata_file(name)
        if source is None:
            missing_peer(f"{name} needs pydicom-data (installed by make test)")
        shutil.copy(source, folder / name)
    sent = [*series.paths, *(folder / name for name in REAL_FILES)]
    before = associations(node)
    run = gdcmscu(node.port, "store", called_ae=node.ae_title, calling_ae="GDCM-MOD", inputs=[folder],
                  recursive=True)
    assert run.connected and not run.crashed_otherwise, run.output[-2000:]
    after = associations_after(node, before)
    assert after.get("released", 0) == before.get("released", 0) + 1, node.log_tail(4000)
    assert after.get("aborted", 0) == before.get("aborted", 0)
    stored = indexed_paths(node)
    for path in sent:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID in stored, f"{path.name} was not indexed\n{run.output[-2000:]}"
        spooled = stored[ds.SOPInstanceUID]
        assert pydicom.dcmread(spooled, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ds.file_meta.TransferSyntaxUID, path.name
        assert content(spooled) == content(path), path.name
        np.testing.assert_array_equal(pixels(spooled), pixels(path))
    assert "TEST^CTGEN" not in node.log_text()
