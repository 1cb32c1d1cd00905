"""Second review of f2b67b0 (node.pixelcheck): a stream of another codec family than its transfer syntax names is
refused only when the node's own decoder (pydicom, with the plugins installed for that syntax: what the worker's
``pixel_array`` runs) cannot read it. libjpeg (pylibjpeg-libjpeg, a dependency) reads JPEG and JPEG-LS whichever
of the two the syntax names, and Pillow reads a JPEG 2000 codestream under JPEG Baseline and an 8-bit JPEG under
JPEG 2000: those series got a verdict before f2b67b0, and were refused 0xC000 after it (lost)."""

from __future__ import annotations

import io
import shutil
import subprocess

import pydicom
import pytest
from pydicom.uid import UID

from node.db import create_engine_for, init_schema
from node.errors import InvalidDatasetError
from node.index import Index
from node.ingest import Ingestor, Origin
from node.pixelcheck import _FAMILY
from node.spool import Spool
from tests.conftest import missing_peer
from tests.ctgen import write_ct_series

ORIGIN = Origin(calling_ae="CT1", association_id="assoc-1")
TOOLS = {  # (program, options): real encoders, DCMTK's and GDCM's, on a 512x512 12-bit CT slice
    "jpeg-baseline": ("dcmcjpeg", ["+eb"]), "jpeg-extended": ("dcmcjpeg", ["+ee"]),
    "jpeg-lossless": ("dcmcjpeg", ["+e1"]), "jpeg-ls": ("dcmcjpls", ["+el"]),
    "jpeg-ls-near": ("dcmcjpls", ["+en"]), "j2k": ("gdcmconv", ["-K"]), "j2k-lossy": ("gdcmconv", ["-K", "--irreversible"]),
    "rle": ("dcmcrle", []),
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codecs")
    source = write_ct_series(folder / "src", slices=1, size=512, seed=5).paths[0]
    out = {}
    for name, (program, options) in TOOLS.items():
        if shutil.which(program) is None:
            missing_peer(f"{program} (dcmtk / libgdcm-tools)")
        out[name] = folder / f"{name}.dcm"
        subprocess.run([program, *options, str(source), str(out[name])], check=True, capture_output=True)
    return out


@pytest.fixture
def ingestor(tmp_path, db_url):
    engine = create_engine_for(db_url)
    init_schema(engine)
    yield Ingestor(Spool(tmp_path / "spool"), Index(engine))
    engine.dispose()


def relabelled(path, ts: str) -> tuple[bytes, pydicom.Dataset]:
    """The file's data set under transfer syntax ``ts`` (bytes as a sender sends them, and the dataset)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(ts)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):], ds


def decodes(ds: pydicom.Dataset) -> bool:
    try:
        ds.pixel_array  # noqa: B018 - what models.preprocess runs
    except Exception:  # noqa: BLE001 - pydicom raises RuntimeError, ValueError, ... for an unreadable stream
        return False
    return True


def test_another_codec_is_refused_exactly_when_the_nodes_decoder_cannot_read_it(encoded, ingestor):
    false_refusals, wrongly_accepted = [], []
    for name, path in encoded.items():
        own = _FAMILY[str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)]
        for ts in sorted(_FAMILY):
            if _FAMILY[ts] == own or ts in ("1.2.840.10008.1.2.4.92",
                                                                                "1.2.840.10008.1.2.4.93"):
                continue
            body, ds = relabelled(path, ts)
            try:
                ingestor.accept(body, UID(ts), ORIGIN)
                refused = False
            except InvalidDatasetError:
                refused = True
            readable = decodes(ds)
            if refused and readable:
                false_refusals.append(f"{name} under {ts}")
            if not refused and not readable:
                wrongly_accepted.append(f"{name} under {ts}")
    assert false_refusals == []  # decodable pixels refused: the instance lost
    # what f2b67b0 set out to refuse still is (RLE, JPEG-LS or J2K where no decoder for the syntax reads them); left
    # to the decoder, on the safe side, only what Pillow is asked to open and pydicom's Pillow plugin then turns
    # down (more than 8 bits): JPEG under a JPEG 2000 syntax, JPEG 2000 under a JPEG one
    pillow_pairs = {("JPEG", "JPEG 2000"), ("JPEG 2000", "JPEG")}
    assert all((_FAMILY[str(pydicom.dcmread(encoded[name], stop_before_pixels=True).file_meta.TransferSyntaxUID)],
                _FAMILY[ts]) in pillow_pairs for name, _, ts in (case.split() for case in wrongly_accepted)), \
        wrongly_accepted


@pytest.mark.parametrize(("name", "ts"), [("jpeg-ls", "1.2.840.10008.1.2.4.70"), ("jpeg-lossless", "1.2.840.10008.1.2.4.80"),
                                          ("j2k", "1.2.840.10008.1.2.4.50"), ("jpeg-baseline", "1.2.840.10008.1.2.4.90")])
def test_a_relabelled_stream_the_worker_decodes_is_stored_as_sent(encoded, ingestor, name, ts):
    body, ds = relabelled(encoded[name], ts)
    record = ingestor.accept(body, UID(ts), ORIGIN).record
    stored = pydicom.dcmread(record.path)
    assert stored.file_meta.TransferSyntaxUID == ts
    assert (stored.pixel_array == pydicom.dcmread(encoded[name]).pixel_array).all() or name == "jpeg-baseline"
