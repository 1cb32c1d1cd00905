"""Ingest: the one path every received instance takes into the node, whichever front door it came through.

`Ingestor.accept(dataset, transfer_syntax_uid, ...)` parses only the attributes the index needs, validates
the UIDs, writes the Part 10 file durably to the spool and commits the index row — in that order — and returns
an `Accepted`; concurrent accepts (several associations, STOW-RS requests) share the last two steps' folder fsync
and index commit (`node.durability`). Given an `Admission` (`node.admission`), the instance's series must pass
admission control before anything is written. Any failure raises a `ReceiveError` whose ``status`` is the C-STORE status to answer with (STOW-RS
maps the same errors to its failure reasons). Nothing is acknowledged before both writes are durable.

The parse walks the whole data set in the negotiated transfer syntax and refuses (0xC000) what would be stored as
an unreadable file: a value or element header cut short, trailing bytes, Implicit VR bytes sent on an Explicit VR
context (pydicom would silently switch), an element without a DICOM VR or malformed sequence structure at any depth
(`node.ingestscan`, which steps through sequences without reading them: memory stays flat whatever they hold). A Deflated data set is inflated as it is parsed, keeping a 64 KiB window,
and refused with 0xA700 past ``max_inflated_bytes``: a deflate bomb costs CPU up to that limit, not memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.durability import InstanceCommitter
from node.errors import (
    InstanceTooLargeError,
    InvalidDatasetError,
    ReceiveError,
    SOPClassMismatchError,
    StoreFailedError,
    StoreStatus,
)
from node.groupcommit import DEFAULT_MAX_BATCH
from node.index import Index, InstanceRecord, RecordOutcome
from node.ingestscan import check_first_group, read_top_level
from node.pixelcheck import SHAPE_TAGS, check_pixel_data
from node.spool import Spool
from node.uids import check_uid

if TYPE_CHECKING:
    from node.admission import Admission

# Transfer syntaxes both front doors accept: those whose pixel data the node can decode later (pydicom +
# pylibjpeg plugins). In order of preference (pynetdicom accepts the first of ours a context offers): uncompressed,
# then lossless, then lossy last — a sender offering both in one context must not be asked to compress lossily.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
]
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1411.1.1"
DEFAULT_MAX_INFLATED_BYTES = 256 << 20  # [node] max_inflated_bytes
IMPLEMENTATION_VERSION = "PACSAINODE_010"

# The only attributes the receive path reads (patient attributes are never read here).
_INDEX_TAGS: list[BaseTag | int] = [
    Tag(t)
    for t in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "FrameOfReferenceUID",
        "NumberOfFrames",
        "ImagesInAcquisition",
        "SpecificCharacterSet",
    )
]
# Present-or-not is all the receive path needs of these; large values are seeked past, never read (defer_size).
_PIXEL_TAGS: list[BaseTag | int] = [Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")]
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Origin:
    """Where an instance came from: calling AE (or HTTP client label) and the association/request id."""

    calling_ae: str
    association_id: str | None = None


@dataclass(frozen=True)
class Accepted:
    record: InstanceRecord
    outcome: RecordOutcome


# pydicom's scan for the delimiter of an undefined-length value reads this much at a time and takes a short read
# as the end of the data; every other read it makes is a header or a value of known length.
_SCAN_READ = 8192


def _check_read(size: int | None, got: int) -> None:
    """pydicom takes a short read at the end of the data for a complete (shorter) value or silently stops at a
    cut element header, which would let a truncated data set through; a short read is truncation."""
    if size is not None and 0 < got < size < _SCAN_READ:
        raise InvalidDatasetError(f"dataset is truncated: {size - got} bytes missing at the end")


class FileSpan:
    """``length`` bytes of ``file`` from ``offset``: an encoded data set too large to hold in memory, read in place
    (a C-STORE data set spilled to disk, a STOW-RS part inside the request's temp file). A readable, seekable view;
    the file is shared, so every read seeks first."""

    def __init__(self, file: IO[bytes], offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, not {offset}, {length}")
        self.file = file
        self.offset = offset
        self.length = length
        self._pos = 0

    def __len__(self) -> int:
        return self.length

    def read(self, size: int | None = -1, /) -> bytes:
        left = self.length - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        self.file.seek(self.offset + self._pos)
        data = self.file.read(n)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        base = {0: 0, 1: self._pos, 2: self.length}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def sub(self, start: int) -> FileSpan:
        """The part of this span from ``start`` on."""
        start = min(max(start, 0), self.length)
        return FileSpan(self.file, self.offset + start, self.length - start)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The whole span, ``size`` bytes at a time."""
        done = 0
        while done < self.length:
            self.file.seek(self.offset + done)
            chunk = self.file.read(min(size, self.length - done))
            if not chunk:
                raise StoreFailedError(f"temporary data set file ended {self.length - done} bytes early")
            done += len(chunk)
            yield chunk


EncodedDataset = bytes | FileSpan  # what the front doors hand to `Ingestor.accept`


class _StrictReader:
    """The encoded data set (bytes or a `FileSpan`), read strictly (`_check_read`)."""

    def __init__(self, source: EncodedDataset) -> None:
        self._raw: BytesIO | FileSpan = BytesIO(source) if isinstance(source, bytes) else source

    def read(self, size: int | None = -1, /) -> bytes:
        data = self._raw.read(size)
        _check_read(size, len(data))
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class _InflatingBuffer:
    """A Deflated data set (raw deflate, PS3.5 A.5) inflated as pydicom reads it: forward reads and seeks, and
    seeks back within `WINDOW` bytes (all pydicom needs), so memory stays at the window whatever the data set
    inflates to. Inflating past ``limit`` raises `InstanceTooLargeError` (0xA700); a broken or cut deflate
    stream `InvalidDatasetError`."""

    WINDOW = 1 << 16
    CHUNK = 1 << 16

    def __init__(self, source: EncodedDataset, limit: int) -> None:
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._input = BytesIO(source) if isinstance(source, bytes) else source.sub(0)
        self._buf = bytearray()
        self._buf_start = 0  # stream offset of _buf[0]
        self._pos = 0
        self._limit = limit
        self._ended = False

    @property
    def _end(self) -> int:
        return self._buf_start + len(self._buf)

    def _fill(self, upto: int, keep_from: int | None) -> None:
        """Inflate until the stream offset ``upto`` is buffered or the stream ends, dropping what lies before
        ``keep_from`` (None: all but the last `WINDOW` bytes inflated)."""
        while self._end < upto and not self._ended:
            want = min(upto - self._end, self.CHUNK)
            try:
                if self._inflater.unconsumed_tail:
                    out = self._inflater.decompress(self._inflater.unconsumed_tail, want)
                elif chunk := self._input.read(self.CHUNK):
                    out = self._inflater.decompress(chunk, want)
                else:
                    out = self._inflater.flush()
                    if not self._inflater.eof:
                        raise InvalidDatasetError("Deflated data set is truncated: the deflate stream does not end")
            except zlib.error as exc:
                raise InvalidDatasetError(f"Deflated data set does not inflate: {exc}") from exc
            self._ended = self._inflater.eof
            self._buf += out
            if self._end > self._limit:
                raise InstanceTooLargeError(f"Deflated data set inflates beyond the node's limit of {self._limit} bytes")
            keep = keep_from if keep_from is not None else self._end - self.WINDOW
            drop = min(keep - self._buf_start, len(self._buf))
            if drop > self.CHUNK:
                del self._buf[:drop]
                self._buf_start += drop

    def read(self, size: int | None = -1, /) -> bytes:
        keep_from = self._pos - self.WINDOW
        if size is None or size < 0:
            self._fill(self._limit + 1, keep_from)
            size = max(self._end - self._pos, 0)
        self._fill(self._pos + size, keep_from)
        start = self._pos - self._buf_start
        data = bytes(self._buf[start : start + size]) if start >= 0 else b""
        self._pos += len(data)
        _check_read(size, len(data))
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        target = {0: offset, 1: self._pos + offset}.get(whence)
        if target is None:
            target = self.total() + offset
        if target < self._buf_start:
            raise InvalidDatasetError(f"Deflated data set: a seek back past the {self.WINDOW}-byte window")
        self._fill(target, target - self.WINDOW)  # forward: inflate, dropping what is passed over
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def total(self) -> int:
        """The inflated length (inflating the rest and dropping it)."""
        self._fill(self._limit + 1, None)
        return self._end


def _parse_header(data: EncodedDataset, ts: UID, max_inflated_bytes: int) -> Dataset:
    """Read the index attributes from an encoded dataset (no file meta); walks the whole dataset so a truncated
    or garbled one is refused rather than stored."""
    try:
        buffer: _StrictReader | _InflatingBuffer
        if ts == DeflatedExplicitVRLittleEndian:
            buffer = _InflatingBuffer(data, max_inflated_bytes)
        else:
            buffer = _StrictReader(data)
        fp = DicomIO(buffer)
        fp.is_little_endian = ts.is_little_endian
        fp.is_implicit_VR = ts.is_implicit_VR
        check_first_group(fp, ts)
        ds = read_top_level(fp, ts, specific_tags=[*_INDEX_TAGS, *SHAPE_TAGS, *_PIXEL_TAGS], defer_size=256,
                            check_vrs=not ts.is_implicit_VR)
        if ds.original_encoding[0] != ts.is_implicit_VR:
            found, expected = ("Implicit", "Explicit") if ds.original_encoding[0] else ("Explicit", "Implicit")
            raise InvalidDatasetError(f"dataset is encoded in {found} VR, but its transfer syntax {ts} is {expected} VR")
        # Values not asked for are seeked past, so a position beyond the end means a truncated value.
        end = buffer.total() if isinstance(buffer, _InflatingBuffer) else len(data)
        if fp.tell() > end:
            raise InvalidDatasetError(f"dataset is truncated: an element runs {fp.tell() - end} bytes past the end")
        if fp.tell() < end:
            raise InvalidDatasetError(f"dataset has {end - fp.tell()} trailing bytes that do not parse")
        for tag in (*_INDEX_TAGS, *SHAPE_TAGS):
            raw = ds.get_item(tag)
            if (
                isinstance(raw, RawDataElement)
                and raw.value is not None
                and raw.length != _UNDEFINED_LENGTH
                and len(raw.value) != raw.length
            ):
                raise InvalidDatasetError(f"dataset is truncated inside {Tag(tag)}")
        for tag in _INDEX_TAGS:  # force conversion now, inside the error boundary
            ds.get(tag)
        check_pixel_data(ds, ts, fp)
        return ds
    except ReceiveError:
        raise
    except Exception as exc:  # pydicom raises many types on bad input; all mean "cannot understand"
        raise InvalidDatasetError(f"dataset does not parse: {type(exc).__name__}: {exc}") from exc


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Ingestor:
    """Accepts encoded datasets into ``spool`` and ``index``; with ``admission`` (`node.admission`), only while
    admission control lets the instance's series in (else `AdmissionRefusedError`, 0xA700, nothing written)."""

    def __init__(self, spool: Spool, index: Index, admission: Admission | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.spool = spool
        self.index = index
        self.admission = admission
        self.committer = InstanceCommitter(spool, index, max_batch)  # the group commit every accept ends in

    def accept(
        self,
        dataset: EncodedDataset,
        transfer_syntax_uid: str,
        origin: Origin,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_uid: str | None = None,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ) -> Accepted:
        """Store one instance durably and index it. ``dataset`` is the encoded data set: bytes, or a `FileSpan` for
        one too large to hold in memory (read in place). ``sop_class_uid``/``sop_instance_uid`` are what the request
        announced (C-STORE Affected SOP Class/Instance UID), ``study_uid`` the study a STOW-RS URL named; the
        dataset must agree with them (0xA900). A Deflated data set inflating past ``max_inflated_bytes`` raises
        `InstanceTooLargeError` (0xA700); admission control refusing the series `AdmissionRefusedError` (0xA700)."""
        ts = UID(transfer_syntax_uid)
        if not ts.is_transfer_syntax:
            raise InvalidDatasetError(f"unknown transfer syntax {transfer_syntax_uid!r}")
        ds = _parse_header(dataset, ts, max_inflated_bytes)
        sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        found_study = ds.get("StudyInstanceUID")
        if study_uid is not None and str(found_study or "") != study_uid:
            raise ReceiveError(
                f"StudyInstanceUID {found_study} differs from the request's study {study_uid}",
                status=StoreStatus.DATASET_MISMATCH,
            )
        study_uid = check_uid(found_study, "StudyInstanceUID")
        series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        if UID(sop_class).name.endswith("Image Storage") and not any(t in ds for t in _PIXEL_TAGS):
            raise SOPClassMismatchError(f"{UID(sop_class).name} instance {sop_uid} has no pixel data")
        if sop_class_uid is not None and sop_class_uid != sop_class:
            raise SOPClassMismatchError(f"dataset SOPClassUID {sop_class} differs from the request's {sop_class_uid}")
        if sop_instance_uid is not None and sop_instance_uid != sop_uid:
            raise SOPClassMismatchError(f"dataset SOPInstanceUID {sop_uid} differs from the request's")
        if self.admission is not None:
            self.admission.check(series_uid)  # the one admission boundary both front doors pass
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        meta.SourceApplicationEntityTitle = origin.calling_ae[:16] or "UNKNOWN"
        header = DicomBytesIO()
        header.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(header, meta, enforce_standard=True)
        body = [dataset] if isinstance(dataset, bytes) else dataset.chunks()
        spooled = self.spool.write(study_uid, series_uid, sop_uid, body, header=header.getvalue(), sync_dir=False,
                                   stage_replacement=True)  # the group commit syncs the folder (_commit_batch)
        if self.admission is not None:
            self.admission.written(spooled.size)
        record = InstanceRecord(
            sop_uid=sop_uid,
            series_uid=series_uid,
            study_uid=study_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(ts),
            path=self.spool.key(spooled.path),
            spool_id=self.spool.spool_id,
            size=spooled.size,
            sha256=spooled.sha256,
            modality=(_text(ds, "Modality") or None),
            instance_number=_int(ds, "InstanceNumber"),
            image_position=_text(ds, "ImagePositionPatient"),
            image_orientation=_text(ds, "ImageOrientationPatient"),
            frame_of_reference_uid=_optional_uid(ds.get("FrameOfReferenceUID")),
            number_of_frames=_int(ds, "NumberOfFrames"),
            images_in_acquisition=_int(ds, "ImagesInAcquisition"),
            calling_ae=origin.calling_ae,
            association_id=origin.association_id,
        )
        try:
            outcome = self.committer.commit(record, spooled.path.parent)
        except BaseException:
            self.spool.discard(spooled)  # a re-send refused: the instance acknowledged before keeps its file
            raise
        self.spool.place(spooled)  # a re-send committed (changed, or the same bytes): its file takes the path
        return Accepted(record=record, outcome=outcome)


def _optional_uid(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = str(value)
    return text if len(text) <= 64 else None
