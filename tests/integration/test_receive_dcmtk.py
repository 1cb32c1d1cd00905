"""The receive path against DCMTK as the modality: the node runs as a subprocess on a free port.

Checks C-ECHO, a 120-slice C-STORE series landing byte-for-byte in the spool and in the index, compressed
transfer syntaxes (real pydicom-data files and series compressed with DCMTK), the calling-AE allow-list, a UID
path-traversal attempt, a garbled dataset followed by a healthy association, and PHI-free logs.

The compressed-series and real-file cases check only their own instances, so they share one node per module
(`shared_node`: a node start is ~5 s of this suite's budget); the tests that assert on the whole index, the
metrics or the spool start their own. Every node here runs without its worker (`RECEIVE_ONLY`): the subject is
the receive path, which never waits on the worker's process, and a worker loading TensorFlow on each start is
seconds of both cores taken from the test running beside it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE

from peers import dcmtk
from peers.pacsnode import NodeProcess, launch_node
from peers.process import wait_until
from tests.conftest import missing_peer, require_tool, wait_for_port
from tests.ctgen import write_ct_series
from tests.dicomfiles import content, dataset_bytes, pixels

pytestmark = pytest.mark.integration
RECEIVE_ONLY = "\n[worker]\nenabled = false\n"


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory, node_database) -> Iterator[NodeProcess]:
    """One node for the tests that look only at their own instances (see the module docstring)."""
    node = launch_node(tmp_path_factory.mktemp("shared-node"), database_url=node_database.for_node(),
                       extra_toml=RECEIVE_ONLY)
    try:
        yield node
    finally:
        node.stop()


def storescu(node, paths: list[Path], *extra: str, aet: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    return dcmtk.storescu(node.port, *paths, called_ae=node.ae_title, calling_ae=aet, options=extra)


def indexed(node) -> dict[str, sa.Row]:
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            return {r.sop_uid: r for r in conn.execute(sa.text("select * from instances"))}
    finally:
        engine.dispose()


def series_row(node, series_uid: str) -> sa.Row | None:
    engine = sa.create_engine(node.db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select * from series where series_uid = :s"), {"s": series_uid}).first()
    finally:
        engine.dispose()


def spooled_path(node, ds: pydicom.Dataset) -> Path:
    return node.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_echo(start_node):
    node = start_node(extra_toml=RECEIVE_ONLY)
    result = dcmtk.echoscu(node.port, called_ae=node.ae_title, calling_ae="MODALITY")
    assert result.returncode == 0, result.stderr + node.log_tail(6000)


def test_wrong_called_ae_is_rejected(start_node):
    node = start_node(extra_toml=RECEIVE_ONLY)
    result = dcmtk.echoscu(node.port, called_ae="NOT-THE-NODE", calling_ae="MODALITY")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_120_slice_series_is_spooled_byte_for_byte_and_indexed(start_node, tmp_path):
    node = start_node(extra_toml=RECEIVE_ONLY)
    series = write_ct_series(tmp_path / "in", slices=120, size=64, seed=7)
    result = storescu(node, [tmp_path / "in"])
    assert result.returncode == 0, result.stderr + node.log_tail(6000)
    rows = indexed(node)
    assert set(rows) == set(series.sop_uids)
    for path, sop_uid in zip(series.paths, series.sop_uids, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spooled_path(node, ds)
        assert stored.is_file()
        assert Path(rows[sop_uid].path) == stored
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert rows[sop_uid].calling_ae == "MODALITY"
    row = series_row(node, series.series_uid)
    assert row is not None and row.instance_count == 120 and row.modality == "CT"
    assert not list(node.spool.rglob("*.tmp")), "temp files left behind"
    wait_for_port(node.http_port)

    def released() -> str:  # the release is counted after the peer has its A-RELEASE-RP: it may take a moment
        text = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
        return text if 'pacsnode_associations_total{event="released"}' in text else ""

    metrics = wait_until(released, 10, "the released association counted", lambda: node.log_tail(4000))
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("pacsnode_instances_received_total{") and 'source="dimse"' in line)
    assert counted == 120
    assert 'pacsnode_associations_total{event="released"} 1.0' in metrics
    log = node.log_text()
    assert "TEST^CTGEN" not in log and "CTGEN-0001" not in log and "19700101" not in log


def _dcmtk_compress(tool: str, src: Path, dst: Path, *args: str) -> None:
    exe = require_tool(tool)
    subprocess.run([exe, *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize(
    ("label", "flag"),
    [
        ("rle", "-xr"),
        ("jpegls", "-xt"),
        ("jpeg-lossless", "-xs"),
        ("jpeg-extended", "-xx"),
        ("deflated", "-xd"),
    ],
)
def test_series_compressed_by_dcmtk(shared_node, tmp_path, label, flag):
    node = shared_node
    seed = 3 + ["rle", "jpegls", "jpeg-lossless", "jpeg-extended", "deflated"].index(label)  # own UIDs per case
    series = write_ct_series(tmp_path / "plain", slices=6, size=48, seed=seed)
    out = tmp_path / label
    out.mkdir()
    tool, args = {
        "rle": ("dcmcrle", ()),
        "jpegls": ("dcmcjpls", ()),
        "jpeg-lossless": ("dcmcjpeg", ("+e1",)),
        "jpeg-extended": ("dcmcjpeg", ("+ee",)),  # lossy, 12 bit
        "deflated": (None, ()),
    }[label]
    for path in series.paths:
        if tool is None:
            shutil.copy(path, out / path.name)
        else:
            _dcmtk_compress(tool, path, out / path.name, *args)
    result = storescu(node, [out], flag)
    assert result.returncode == 0, result.stderr + node.log_tail(6000)
    for path in series.paths:
        sent = out / path.name
        stored = spooled_path(node, pydicom.dcmread(sent, stop_before_pixels=True))  # lossy gets a new SOP UID
        stored_ds = pydicom.dcmread(stored)
        if label == "deflated":
            assert stored_ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
        else:
            assert stored_ds.file_meta.TransferSyntaxUID.is_compressed
            assert dataset_bytes(stored) == dataset_bytes(sent)
        if label == "jpeg-extended":
            # Lossy: the node's decode must match DCMTK's own decode of what was sent, up to IDCT rounding.
            decoded = tmp_path / f"dcmdjpeg-{path.name}"
            subprocess.run([require_tool("dcmdjpeg"), str(sent), str(decoded)], check=True, timeout=60)
            np.testing.assert_allclose(stored_ds.pixel_array, pixels(decoded), rtol=0, atol=1)
        else:
            np.testing.assert_array_equal(stored_ds.pixel_array, pixels(path))


@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("693_J2KR.dcm", "-xv"),  # real CT, JPEG 2000 lossless (pydicom-data)
        ("J2K_pixelrep_mismatch.dcm", "-xv"),  # CT, JPEG 2000 (bundled with pydicom)
        ("JPEG-LL.dcm", "-xs"),  # JPEG lossless SV1
        ("SC_rgb_jpeg_lossy_gdcm.dcm", "-xy"),  # JPEG baseline
        ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS lossless
        ("eCT_Supplemental.dcm", "-x="),  # Enhanced CT, multi-frame (pydicom-data)
    ],
)
def test_real_files_from_pydicom_data(shared_node, tmp_path, name, flag):
    source = get_testdata_file(name)
    if source is None:
        missing_peer(f"{name} needs pydicom-data (installed by make test)")
    node = shared_node
    src = tmp_path / name
    shutil.copy(source, src)
    result = storescu(node, [src], flag)
    assert result.returncode == 0, result.stderr + node.log_tail(6000)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    stored = spooled_path(node, ds)
    # storescu drops group-length elements of real-world files, so compare element by element (the compressed
    # pixel data byte for byte).
    assert content(stored) == content(src)
    np.testing.assert_array_equal(pixels(stored), pixels(src))
    assert ds.SOPInstanceUID in indexed(node)


def test_real_file_whose_uids_are_not_uids_is_refused(start_node, tmp_path):
    """pydicom-data's bad_sequence.dcm (a real JPEG-lossless CT) carries hex strings where UIDs belong."""
    source = get_testdata_file("bad_sequence.dcm")
    if source is None:
        missing_peer("needs pydicom-data (installed by make test)")
    node = start_node(extra_toml=RECEIVE_ONLY)
    src = tmp_path / "bad_sequence.dcm"
    shutil.copy(source, src)
    result = storescu(node, [src], "-xs")
    assert result.returncode == 0xA9, result.stderr  # storescu exits with the status's high byte
    assert not indexed(node)
    assert not _all_files(node.spool)
    assert "instance_refused" in node.log_text()


def test_unlisted_calling_ae_is_refused(start_node):
    node = start_node(allowed=["CT-SCANNER-1"], extra_toml=RECEIVE_ONLY)
    refused = dcmtk.echoscu(node.port, called_ae=node.ae_title, calling_ae="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    allowed = dcmtk.echoscu(node.port, called_ae=node.ae_title, calling_ae="CT-SCANNER-1")
    assert allowed.returncode == 0, allowed.stderr
    assert "association_rejected" in node.log_text()


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_uid_path_traversal_is_refused_and_nothing_written_outside_the_spool(start_node, tmp_path, attribute):
    node = start_node(extra_toml=RECEIVE_ONLY)
    series = write_ct_series(tmp_path / "in", slices=1, size=16, seed=11)
    ds = pydicom.dcmread(series.paths[0])
    setattr(ds, attribute, "1.2.3/../../../../escaped")
    evil = tmp_path / "evil" / "evil.dcm"
    evil.parent.mkdir()
    with pydicom.config.disable_value_validation():
        ds.save_as(evil, enforce_file_format=True)
    before = _all_files(tmp_path) - _all_files(node.data_dir)
    result = storescu(node, [evil])
    assert result.returncode == 0xA9, result.stderr  # storescu exits with the status's high byte
    after = _all_files(tmp_path) - _all_files(node.data_dir)
    assert after == before, f"files appeared outside the node: {after - before}"
    assert not [p for p in _all_files(node.data_dir) if "escaped" in str(p)]
    assert ds.SOPInstanceUID not in indexed(node)


def _raw_store(port: int, ae_title: str, payload: bytes, sop_uid: str) -> int:
    """Send ``payload`` as the data set of a C-STORE request, bypassing encoding (a garbling modality)."""
    ae = AE(ae_title="GARBLER")
    ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = io.BytesIO(payload)
        context_id = assoc.accepted_contexts[0].context_id
        # As pynetdicom's own send_c_store does: pause the association's reactor so the response comes to us.
        assoc._reactor_checkpoint.clear()
        try:
            assoc.dimse.send_msg(req, context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


def test_garbled_and_truncated_datasets_get_failure_status_and_the_node_keeps_serving(start_node, tmp_path):
    node = start_node(extra_toml=RECEIVE_ONLY)
    series = write_ct_series(tmp_path / "in", slices=2, size=32, seed=5)
    good = dataset_bytes(series.paths[0])
    truncated = _raw_store(node.port, node.ae_title, good[: len(good) // 2], series.sop_uids[0])
    assert truncated == 0xC000
    garbled = _raw_store(node.port, node.ae_title, bytes(range(256)) * 8, series.sop_uids[0])
    assert garbled in (0xC000, 0xA900)
    assert not indexed(node)
    result = storescu(node, [tmp_path / "in"])
    assert result.returncode == 0, result.stderr + node.log_tail(6000)
    assert set(indexed(node)) == set(series.sop_uids)
