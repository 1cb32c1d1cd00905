"""Ingest: header-only parse, UID checks, request/dataset agreement, durable spool + index, bad input refused."""

from __future__ import annotations

import zlib

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.db import create_engine_for, init_schema
from node.errors import (
    InvalidDatasetError,
    InvalidUIDError,
    SOPClassMismatchError,
    StoreFailedError,
    StoreStatus,
)
from node.index import Index, RecordOutcome
from node.ingest import Ingestor, Origin
from node.spool import Spool
from node.states import SeriesState
from tests.conftest import missing_peer
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes


@pytest.fixture
def ingestor(tmp_path, db_url):
    engine = create_engine_for(db_url)
    init_schema(engine)
    yield Ingestor(Spool(tmp_path / "spool"), Index(engine))
    engine.dispose()


@pytest.fixture
def series(tmp_path):
    return write_ct_series(tmp_path / "in", slices=3, size=16, seed=1, images_in_acquisition=True)


ORIGIN = Origin(calling_ae="CT1", association_id="assoc-1")


def test_accepts_and_indexes_geometry_without_patient_attributes(ingestor, series):
    body = dataset_bytes(series.paths[1])
    accepted = ingestor.accept(body, ExplicitVRLittleEndian, ORIGIN)
    assert accepted.outcome is RecordOutcome.NEW
    rec = accepted.record
    assert (rec.study_uid, rec.series_uid, rec.sop_uid) == (series.study_uid, series.series_uid, series.sop_uids[1])
    assert rec.modality == "CT" and rec.instance_number == 2 and rec.images_in_acquisition == 3
    assert rec.image_position.split("\\")[2] == "-2.5"
    assert rec.frame_of_reference_uid == series.frame_of_reference_uid
    stored = pydicom.dcmread(rec.path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.SourceApplicationEntityTitle == "CT1"
    assert dataset_bytes(rec.path) == body
    assert not hasattr(rec, "patient_name")


def test_deflated_dataset(ingestor, series):
    body = dataset_bytes(series.paths[0])
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(body) + compressor.flush()
    rec = ingestor.accept(deflated, DeflatedExplicitVRLittleEndian, ORIGIN).record
    assert rec.sop_uid == series.sop_uids[0]
    assert pydicom.dcmread(rec.path).pixel_array.shape == (16, 16)


@pytest.mark.parametrize("cut", [0.5, 0.99, 0.1])
def test_truncated_dataset_is_refused(ingestor, series, cut):
    body = dataset_bytes(series.paths[0])
    with pytest.raises((InvalidDatasetError, InvalidUIDError, SOPClassMismatchError)) as err:
        ingestor.accept(body[: int(len(body) * cut)], ExplicitVRLittleEndian, ORIGIN)
    assert err.value.status in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DATASET_MISMATCH)
    assert not list(ingestor.spool.root.rglob("*.dcm"))


def test_garbage_is_refused_with_c000(ingestor):
    with pytest.raises(InvalidDatasetError) as err:
        ingestor.accept(bytes(range(256)) * 4, ExplicitVRLittleEndian, ORIGIN)
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND


def test_request_and_dataset_must_agree(ingestor, series):
    body = dataset_bytes(series.paths[0])
    with pytest.raises(SOPClassMismatchError):
        ingestor.accept(body, ExplicitVRLittleEndian, ORIGIN, sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    with pytest.raises(SOPClassMismatchError):
        ingestor.accept(body, ExplicitVRLittleEndian, ORIGIN, sop_instance_uid="1.2.3.4")


def test_image_without_pixel_data_is_refused(ingestor, series, tmp_path):
    ds = pydicom.dcmread(series.paths[0])
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SOPClassMismatchError, match="no pixel data") as err:
        ingestor.accept(dataset_bytes(path), ExplicitVRLittleEndian, ORIGIN)
    assert err.value.status == StoreStatus.DATASET_MISMATCH


def test_missing_uid_is_refused(ingestor, series, tmp_path):
    ds = pydicom.dcmread(series.paths[0])
    del ds.SeriesInstanceUID
    path = tmp_path / "nouid.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidUIDError, match="SeriesInstanceUID is missing"):
        ingestor.accept(dataset_bytes(path), ExplicitVRLittleEndian, ORIGIN)


def test_the_same_instance_from_another_sender_is_a_duplicate(ingestor, series, tmp_path):
    """A PACS forwarding back what the modality sent it (or the same instance by STOW-RS) carries the same
    dataset bytes; the file meta the node writes names the sender, so the hash must leave it out. Changed
    content still counts as changed."""
    body = dataset_bytes(series.paths[0])
    first = ingestor.accept(body, ExplicitVRLittleEndian, Origin(calling_ae="CT1", association_id="a1"))
    with ingestor.index.engine.begin() as conn:
        conn.execute(sa.text("update series set state = 'complete'"))
    again = ingestor.accept(body, ExplicitVRLittleEndian, Origin(calling_ae="ORTHANC", association_id="a2"))
    assert again.outcome is RecordOutcome.DUPLICATE and again.record.sha256 == first.record.sha256
    stow = ingestor.accept(body, ExplicitVRLittleEndian, Origin(calling_ae="STOW-RS", association_id="h1"))
    assert stow.outcome is RecordOutcome.DUPLICATE
    assert ingestor.index.get_series(series.series_uid).state == SeriesState.COMPLETE
    changed = pydicom.dcmread(series.paths[0])
    changed.WindowCenter = 41  # any change of the dataset
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    assert ingestor.accept(dataset_bytes(tmp_path / "changed.dcm"), ExplicitVRLittleEndian, ORIGIN).outcome is RecordOutcome.REPLACED
    assert ingestor.index.get_series(series.series_uid).state == SeriesState.REOPENED


def test_a_refused_re_send_never_overwrites_the_acknowledged_instance(ingestor, series, tmp_path, monkeypatch):
    """Instance A is acknowledged; a re-send B with the same UIDs but other content is written, and then its index
    commit fails (the sender gets 0xA701). A's file must still be the one its row describes. B committed later
    takes the path; no staged file is left behind either way."""
    body = dataset_bytes(series.paths[0])
    first = ingestor.accept(body, ExplicitVRLittleEndian, ORIGIN).record
    changed = pydicom.dcmread(series.paths[0])
    changed.WindowCenter = 41
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    changed_body = dataset_bytes(tmp_path / "changed.dcm")

    def broken(recs):
        raise StoreFailedError("index write failed: OperationalError")

    with monkeypatch.context() as m:
        m.setattr(ingestor.index, "record_instances", broken)
        m.setattr(ingestor.index, "record_instance", broken)
        with pytest.raises(StoreFailedError):
            ingestor.accept(changed_body, ExplicitVRLittleEndian, ORIGIN)
    row = ingestor.index.get_instance(first.sop_uid)
    assert row.sha256 == first.sha256 and dataset_bytes(row.path) == body
    assert ingestor.accept(changed_body, ExplicitVRLittleEndian, ORIGIN).outcome is RecordOutcome.REPLACED
    assert dataset_bytes(ingestor.index.get_instance(first.sop_uid).path) == changed_body
    assert ingestor.accept(changed_body, ExplicitVRLittleEndian, ORIGIN).outcome is RecordOutcome.DUPLICATE
    assert sorted(p.name for p in ingestor.spool.root.rglob("*") if p.is_file()) == [f"{first.sop_uid}.dcm"]


def test_pixel_data_its_transfer_syntax_cannot_describe_is_refused(ingestor, series, tmp_path):
    """Found by review: compressed fragments on an uncompressed context, native bytes on a compressed one, and native
    Pixel Data shorter than Rows × Columns × Bits Allocated call for were all acknowledged 0x0000, and the worker then
    refused the whole series as undecodable ("not processed"), with no reason for the sender to send again. They are
    refused 0xC000 now, nothing stored; the well-formed forms still pass."""
    from pydicom.uid import RLELossless

    from node.errors import InvalidDatasetError

    native = pydicom.dcmread(series.paths[0])
    rle = pydicom.dcmread(series.paths[1])
    rle.compress(RLELossless)
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    short = pydicom.dcmread(series.paths[2])
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    short.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    refused = [
        (dataset_bytes(tmp_path / "rle.dcm"), ExplicitVRLittleEndian, "encapsulated"),
        (dataset_bytes(series.paths[0]), RLELossless, "native"),
        (dataset_bytes(tmp_path / "short.dcm"), ExplicitVRLittleEndian, "call for"),
    ]
    for data, ts, words in refused:
        with pytest.raises(InvalidDatasetError, match=words) as err:
            ingestor.accept(data, ts, ORIGIN)
        assert int(err.value.status) == 0xC000
    assert not list((tmp_path / "spool").rglob("*.dcm"))
    assert ingestor.accept(dataset_bytes(tmp_path / "rle.dcm"), RLELossless, ORIGIN).record.sop_uid == rle.SOPInstanceUID
    assert ingestor.accept(dataset_bytes(series.paths[0]), ExplicitVRLittleEndian, ORIGIN).record.sop_uid == \
        native.SOPInstanceUID


CODEC_FILES = {  # real files (pydicom's own and pydicom-data) in each codec family the node decodes
    "JPEG": ("SC_rgb_jpeg_lossy_gdcm.dcm", "JPEG-LL.dcm"),
    "JPEG-LS": ("MR_small_jpeg_ls_lossless.dcm",),
    "JPEG 2000": ("693_J2KR.dcm", "MR_small_jp2klossless.dcm"),
    "RLE": ("MR_small_RLE.dcm", "SC_rgb_rle.dcm"),
}
CODEC_SYNTAX = {  # a transfer syntax of each family
    "JPEG": "1.2.840.10008.1.2.4.70", "JPEG-LS": "1.2.840.10008.1.2.4.80", "JPEG 2000": "1.2.840.10008.1.2.4.90",
    "RLE": "1.2.840.10008.1.2.5",
}


@pytest.mark.parametrize("declared", sorted(CODEC_SYNTAX))
def test_pixel_data_of_another_codec_than_its_transfer_syntax_is_refused(ingestor, declared):
    """Found by review: a sender (or a PACS re-labelling on forward) that puts one codec's stream under another
    compressed syntax — JPEG-LS under RLE, JPEG under JPEG 2000 — was acknowledged, and the worker could not decode the
    series. Every real file of another family under ``declared`` is refused 0xC000 naming both — unless the node's
    decoder reads it anyway (libjpeg reads JPEG and JPEG-LS under either syntax, Pillow JPEG under JPEG 2000:
    accepted, second review); each
    file under its own syntax family is accepted."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import UID

    from node.errors import InvalidDatasetError

    for family, names in CODEC_FILES.items():
        for name in names:
            path = get_testdata_file(name)
            if path is None:
                missing_peer(f"{name} needs pydicom-data (installed by make test)")
            data = dataset_bytes(path)
            own = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            if family == declared:
                assert ingestor.accept(data, UID(own), ORIGIN).outcome is not None
                continue
            if {family, declared} == {"JPEG", "JPEG-LS"} or (family, declared) == ("JPEG", "JPEG 2000"):
                # the worker's decoders read them: libjpeg JPEG and JPEG-LS, Pillow (a J2K syntax's second plugin) JPEG
                assert ingestor.accept(data, UID(CODEC_SYNTAX[declared]), ORIGIN).outcome is not None
                continue
            with pytest.raises(InvalidDatasetError, match=f"{family} stream.*says {declared}") as err:
                ingestor.accept(data, UID(CODEC_SYNTAX[declared]), ORIGIN)
            assert int(err.value.status) == 0xC000
