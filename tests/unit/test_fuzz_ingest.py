"""Fuzzing the C-STORE ingest parser (`Ingestor.accept`) with mutated encodings of real files: a CT slice from
tests/ctgen in Explicit, Implicit and Deflated VR, pydicom's CT_small.dcm, and pydicom's RLE, JPEG, JPEG-LS and
JPEG 2000 files. Every input is either accepted — and the spooled file then parses with the transfer syntax it
was stored under — or refused with a `ReceiveError` carrying a C-STORE failure status; nothing else escapes."""

from __future__ import annotations

import functools
import tempfile
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from node.db import create_engine_for, init_schema
from node.errors import ReceiveError, StoreStatus
from node.index import Index
from node.ingest import Ingestor, Origin
from node.spool import Spool
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.fuzzing import LONG, QUICK, mutated

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbled values it reads
VR_NAMES = frozenset(str(vr) for vr in VR)
ORIGIN = Origin(calling_ae="FUZZ", association_id="fuzz")
FAILURES = {StoreStatus.OUT_OF_RESOURCES, StoreStatus.OUT_OF_RESOURCES_STORE, StoreStatus.DATASET_MISMATCH,
            StoreStatus.CANNOT_UNDERSTAND}
PYDICOM_FILES = ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "JPEG2000.dcm"]


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


@functools.cache
def seeds() -> list[tuple[str, bytes]]:
    """(transfer syntax, encoded data set) of each real file the mutations start from."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_ct_series(Path(tmp), slices=1, size=16, seed=5).paths[0]
        return _seeds(path)


def _seeds(path: Path) -> list[tuple[str, bytes]]:
    ds = pydicom.dcmread(path)
    out = [
        (ExplicitVRLittleEndian, dataset_bytes(path)),
        (ImplicitVRLittleEndian, _encode(ds, implicit=True)),
        (DeflatedExplicitVRLittleEndian, _deflate(_encode(ds, implicit=False))),
    ]
    for name in PYDICOM_FILES:
        found = get_testdata_file(name)
        assert found is not None, name
        out.append((str(pydicom.dcmread(found).file_meta.TransferSyntaxUID), dataset_bytes(Path(found))))
    return out


@pytest.fixture(scope="module")
def ingestor(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz-ingest")
    engine = create_engine_for(f"sqlite:///{root / 'node.db'}")
    init_schema(engine)
    yield Ingestor(Spool(root / "spool"), Index(engine))
    engine.dispose()


def _walk(ds: Dataset) -> int:
    """Parse every sequence and check every VR (structure only: other values stay raw bytes); returns the element
    count."""
    count = 0
    for tag in list(ds.keys()):
        count += 1
        vr = ds.get_item(tag).VR
        assert vr is None or vr in VR_NAMES, f"element {tag} has VR {vr!r}"
        if vr == "SQ":
            for item in ds[tag].value:
                count += _walk(item)
    return count


def assert_parses_as(path: Path, ts: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a sender's odd values (unknown character set ...) are its content
        warnings.filterwarnings("error", message="Expected .* VR")  # pydicom guesses when the encoding differs
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ts
        if ts != DeflatedExplicitVRLittleEndian:
            assert ds.original_encoding == (ts == ImplicitVRLittleEndian, True)
        assert _walk(ds) > 0


def check_accept(ingestor: Ingestor, ts: str, data: bytes, announce: Dataset | None) -> None:
    try:
        accepted = ingestor.accept(
            data, ts, ORIGIN, max_inflated_bytes=4 << 20,
            sop_class_uid=str(announce.SOPClassUID) if announce else None,
            sop_instance_uid=str(announce.SOPInstanceUID) if announce else None,
        )
    except ReceiveError as exc:
        assert exc.status in FAILURES, f"{type(exc).__name__} with status {exc.status!r}"
        return
    assert_parses_as(Path(accepted.record.path), ts)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, bytes]:
    ts, seed = draw(st.sampled_from(seeds()))
    if ts == DeflatedExplicitVRLittleEndian and draw(st.booleans()):  # damage what is inside the deflate stream
        return ts, _deflate(draw(mutated(zlib.decompress(seed, -zlib.MAX_WBITS))))
    return ts, draw(mutated(seed))


def _fuzz(ingestor: Ingestor, data: st.DataObject) -> None:
    ts, encoded = data.draw(cases(), label="case")
    check_accept(ingestor, ts, encoded, None)


test_mutated_data_sets_are_stored_readable_or_refused_with_a_status = settings(QUICK, max_examples=1500)(
    given(data=st.data())(_fuzz)
)
test_mutated_data_sets_long = pytest.mark.slow(settings(LONG, max_examples=5000)(given(data=st.data())(_fuzz)))


def test_the_unmutated_seeds_are_all_accepted(ingestor):
    for ts, data in seeds():
        check_accept(ingestor, ts, data, None)


@pytest.mark.parametrize("fixture", sorted(p.name for p in Path(__file__).parents[1].joinpath(
    "fixtures", "fuzz").glob("ingest-*.bin")))
def test_kept_crashes_are_refused_or_stored_readable(ingestor, fixture):
    """Inputs a fuzz run once crashed on: tests/fixtures/fuzz/ingest-<transfer syntax>-<n>.bin."""
    path = Path(__file__).parents[1] / "fixtures" / "fuzz" / fixture
    ts = fixture.split("-")[1]
    check_accept(ingestor, ts, path.read_bytes(), None)
