"""STOW-RS request bodies and answers, for `node.dicomweb`: the ``multipart/related`` body read into parts under
the size caps, each part's Part 10 file meta split from its data set, and the PS3.18 Store Instances Response.

`stow_boundary` checks the request's Content-Type (415, 400); `BodyReader` feeds the streamed body to
python-multipart's parser (RFC 2046's preamble and transport padding, which it refuses, taken off first),
appending part payloads to one file and remembering where each part lies, and raises
`Refused` (400 malformed framing, 413 a part over ``max_instance_bytes`` or more than `MAX_PARTS` parts, 415 a part
that is not ``application/dicom``) as soon as the body shows it; `part_data` gives one part's bytes back (a large
one as a `FileSpan` over the body's file); `split_part10` finds its file meta; `store_response` builds the answer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import IntEnum
from typing import IO, TYPE_CHECKING, BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from node.errors import InvalidDatasetError
from node.ingest import EncodedDataset, FileSpan

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

IN_MEMORY_PART_BYTES = 16 << 20  # a larger part is parsed and spooled from the body's temp file, not memory
MAX_PARTS = 100_000  # parts per request; each costs a small record in memory while the body is read
MAX_PART_HEADER_BYTES = 16 << 10  # a part's header block (names and values); real ones are ~100 bytes
MAX_PART_HEADERS = 32  # header fields per part (python-multipart's default, 8, refused MIME-Version, Content-ID ...)
MAX_FILE_META_BYTES = 64 << 10  # a part's Part 10 file meta (group 0002); real ones are a few hundred bytes
MAX_PADDING_BYTES = 1024  # RFC 2046 transport padding (spaces, tabs) after a boundary, dropped before the parser
MAX_PREAMBLE_BYTES = 64 << 10  # text before the first boundary (RFC 2046 5.1.1 preamble), skipped unread


class StowFailure(IntEnum):
    """PS3.18 Table I.2-2 failure reasons that have no C-STORE twin in `StoreStatus`."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


class Refused(Exception):  # noqa: N818 - a control-flow signal answered in node.dicomweb, not an error
    """A STOW request refused as a whole (nothing stored); caught in the handler and answered with
    ``http_status``. Never leaves node.dicomweb."""

    def __init__(self, http_status: int, reason: str) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason


class PartFailed(Exception):  # noqa: N818 - a control-flow signal answered in node.dicomweb, not an error
    """One part refused with a STOW-only failure reason (see `StowFailure`)."""

    def __init__(self, status: StowFailure, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- request body → parts --------------------------------------------------------------------------------
@dataclass
class Part:
    """Where one part's payload lies in the body's file."""

    offset: int
    length: int = 0


@dataclass
class PartOutcome:
    """One part's result, for the response and the log."""

    sop_class_uid: str = ""
    sop_uid: str = ""
    stored: bool = False
    failure: int | None = None
    reason: str = ""
    retry_after: int | None = None  # refused by admission control: the client may retry after this many seconds


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    mtype, params = parse_options_header(value)
    return mtype.decode("latin-1").strip().lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()
    }


def stow_boundary(content_type: str | None) -> str:
    """The multipart boundary of a STOW-RS request; raises `Refused` (415 wrong type, 400 no boundary)."""
    if not content_type:
        raise Refused(415, "Content-Type is missing; expected multipart/related; type=\"application/dicom\"")
    mtype, params = _media_type(content_type)
    if mtype != "multipart/related":
        raise Refused(415, f"Content-Type {mtype!r} is not multipart/related")
    part_type = _media_type(params.get("type", ""))[0]
    if part_type != "application/dicom":
        raise Refused(415, f"multipart/related type {part_type or '(missing)'!r} is not application/dicom")
    boundary = params.get("boundary", "")
    if not boundary:
        raise Refused(400, "multipart/related Content-Type has no boundary")
    # RFC 2046 caps boundaries at 70 characters, but real clients exceed it (Orthanc's DICOMweb plugin sends
    # longer ones); the parser's own cap (256) is the limit, checked in `BodyReader`.
    return boundary


class _TransportPadding:
    """Drops RFC 2046 transport padding - spaces and tabs between a boundary and the CRLF that ends its line, which
    "receivers MUST be able to handle" and python-multipart refuses - from a body that starts at its first boundary
    (`BodyReader._skip_preamble`). Only after a delimiter that begins a line (the body's start, or CRLF), so part
    payloads pass untouched; a delimiter whose line is not complete yet is held back until the next chunk (or
    ``final``). More than `MAX_PADDING_BYTES` of it, or anything else after a boundary, is left for the parser."""

    def __init__(self, dash_boundary: bytes) -> None:
        self._dash = dash_boundary
        self._delimiter = b"\r\n" + dash_boundary
        self._held = b""
        self._first = True  # the next bytes are the body's start, where its first boundary needs no CRLF

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        data = self._held + chunk if self._held else chunk
        out, pos, search = bytearray(), 0, 0
        while True:
            first, self._first = self._first, False
            if first:  # the body's first boundary: at its very start
                if len(data) < len(self._dash) and not final:
                    self._held, self._first = data, True
                    return b""
                at, end = (0, len(self._dash)) if data.startswith(self._dash) else (-1, 0)
            else:
                at = data.find(self._delimiter, search)
                end = at + len(self._delimiter)
            if at < 0:
                break
            if data[end:end + 2] == b"--":  # the close-delimiter: what follows is epilogue (BodyReader checks it)
                search = end + 2
                continue
            ws = end
            while ws < len(data) and data[ws] in b" \t" and ws - end <= MAX_PADDING_BYTES:
                ws += 1
            if not final and ws - end <= MAX_PADDING_BYTES and len(data) - ws < 2 and data[ws:] in (b"", b"\r"):
                out += data[pos:at]  # the line is not complete yet: decided with the next chunk
                self._held, self._first = data[at:], first
                return bytes(out)
            if end < ws and ws - end <= MAX_PADDING_BYTES and data[ws:ws + 2] == b"\r\n":
                out += data[pos:end]
                pos = ws
            search = ws
        cut = len(data) if final else max(pos, search, len(data) - self._partial(data))
        if pos == 0:  # nothing dropped: no copy of a chunk that needs none
            self._held = data[cut:]
            return data if cut == len(data) else data[:cut]
        out += data[pos:cut]
        self._held = data[cut:]  # begins a delimiter that the next chunk may complete
        return bytes(out)

    def _partial(self, data: bytes) -> int:
        """The length of the longest end of ``data`` that begins a delimiter (0: none); only that much is held
        back, so the parser sees everything else of a chunk at once (a part's headers answered early, say)."""
        for n in range(min(len(self._delimiter) - 1, len(data)), 0, -1):
            if data.endswith(self._delimiter[:n]):
                return n
        return 0


class BodyReader:
    """Feeds a streamed body to python-multipart's `MultipartParser`, appending part payloads to ``sink`` and
    remembering where each part lies; refuses non-DICOM parts (415) and malformed framing (400)."""

    def __init__(self, boundary: str, sink: IO[bytes], max_part_bytes: int) -> None:
        self.sink = sink
        self.max_part_bytes = max_part_bytes
        self.parts: list[Part] = []
        self.ended = False
        self._dash_boundary = b"--" + boundary.encode("latin-1", "replace")
        self._tail = b""  # the end of the body so far, for a delimiter that straddles two chunks
        self._padding = _TransportPadding(self._dash_boundary)
        self._preamble: bytearray | None = bytearray()  # the body until its first boundary; None once found
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_end": self._on_end,
        }
        try:
            self._parser = MultipartParser(boundary.encode("latin-1"), callbacks, max_header_count=MAX_PART_HEADERS)
        except (FormParserError, UnicodeEncodeError) as exc:
            raise Refused(400, f"unusable multipart boundary: {exc}") from exc

    def write(self, chunk: bytes) -> None:
        if self._preamble is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return
        self._parse(self._padding.feed(chunk))

    def _parse(self, chunk: bytes) -> None:
        if not chunk:
            return
        ended_before = self.ended
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise Refused(400, f"multipart body does not parse: {exc}") from exc
        seen = self._tail + chunk
        if self.ended:
            seen = self._check_epilogue(seen, ended_before)
        self._tail = seen[-len(self._dash_boundary) - 2:]

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """The body from its first boundary on, or b"" while that has not arrived. RFC 2046 lets a body open with a
        preamble that readers ignore; python-multipart refuses one, so it is dropped here (at most
        `MAX_PREAMBLE_BYTES`, or 400)."""
        buffered = self._preamble
        assert buffered is not None
        delimiter = b"\r\n" + self._dash_boundary
        searched = max(0, len(buffered) - len(delimiter) + 1)  # only where the new bytes may complete a delimiter
        buffered += chunk
        if buffered.startswith(self._dash_boundary):
            start = 0
        else:
            line = buffered.find(delimiter, searched, MAX_PREAMBLE_BYTES + len(delimiter))
            if line < 0 and len(buffered) > MAX_PREAMBLE_BYTES:
                raise Refused(400, f"multipart body has no boundary in its first {MAX_PREAMBLE_BYTES} bytes")
            if line < 0:
                return b""
            start = line + 2
        self._preamble = None
        return bytes(buffered[start:])

    def _check_epilogue(self, seen: bytes, ended_before: bool) -> bytes:
        """Refuse (400) a body that goes on with parts after its closing boundary (two bodies concatenated): the
        parser drops an epilogue unread, so those instances were neither stored nor named in the answer, which
        said 200, "stored all". ``seen``: the last bytes before this chunk and the chunk; returns the epilogue in it
        (all that is kept from now on)."""
        if not ended_before:  # the close-delimiter is in this chunk (or straddles the previous one)
            close = seen.find(self._dash_boundary + b"--")
            seen = seen[close + len(self._dash_boundary) + 2:] if close >= 0 else b""
        if self._dash_boundary in seen:
            raise Refused(400, "multipart body goes on after its closing boundary")
        return seen

    def finish(self) -> list[Part]:
        if self._preamble is not None:
            raise Refused(400, "multipart body has no boundary line")
        self._parse(self._padding.feed(b"", final=True))
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise Refused(400, f"multipart body does not parse: {exc}") from exc
        if not self.ended:
            raise Refused(400, "multipart body is truncated: the closing boundary is missing")
        if not self.parts:
            raise Refused(400, "multipart body has no parts")
        return self.parts

    def _on_part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise Refused(413, f"multipart body has more than {MAX_PARTS} parts")
        self.parts.append(Part(offset=self.sink.tell()))
        self._headers.clear()
        self._header_bytes = 0

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise Refused(400, f"part {len(self.parts)} has more than {MAX_PART_HEADER_BYTES} bytes of headers")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        # A part without Content-Type takes the root type named by the request's type parameter (RFC 2387).
        declared = self._headers.get("content-type")
        if declared is not None and _media_type(declared)[0] != "application/dicom":
            raise Refused(415, f"part {len(self.parts)} has Content-Type {_media_type(declared)[0]!r}, not application/dicom")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        if part.length + (end - start) > self.max_part_bytes:
            raise Refused(413, f"part {len(self.parts)} exceeds the node's limit of {self.max_part_bytes} bytes")
        self.sink.write(data[start:end])
        part.length += end - start

    def _on_end(self) -> None:
        self.ended = True


# -- one part → its data set ------------------------------------------------------------------------------
def split_part10(data: EncodedDataset) -> tuple[Dataset, int]:
    """The file meta of a Part 10 file and the offset where its dataset starts; `InvalidDatasetError` if the
    bytes are not a Part 10 file. Only the first `MAX_FILE_META_BYTES` (after the preamble) are read for it: pydicom
    reads every group 0002 value whole, so a part declaring a 1 GiB meta element cost 1 GiB of memory."""
    limit = 132 + MAX_FILE_META_BYTES
    head = data[:limit] if isinstance(data, bytes) else data.sub(0).read(limit)
    fp = io.BytesIO(head)
    try:
        read_preamble(cast(BinaryIO, fp), False)
        # pydicom's file meta reader (private but unchanged since pydicom 1.x; pinned <4 in pyproject.toml)
        # leaves fp at the first dataset element, which is the offset we need.
        meta = _read_file_meta_info(cast(BinaryIO, fp))
        for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            meta.get(keyword)  # convert inside the boundary
    except Exception as exc:  # pydicom raises many types on bad input; all mean "cannot understand"
        raise InvalidDatasetError(f"part is not a DICOM Part 10 file: {type(exc).__name__}: {exc}") from exc
    if fp.tell() >= len(head) and len(data) > len(head):
        raise InvalidDatasetError(f"part's file meta runs past {MAX_FILE_META_BYTES} bytes")
    missing = [k for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID") if not meta.get(k)]
    if missing:
        raise InvalidDatasetError(f"part's file meta lacks {', '.join(missing)}")
    return meta, fp.tell()


def part_data(body: IO[bytes], part: Part) -> EncodedDataset:
    """A part's bytes; a part over `IN_MEMORY_PART_BYTES` is read in place from the body's temp file."""
    if part.length > IN_MEMORY_PART_BYTES:
        return FileSpan(body, part.offset, part.length)
    body.seek(part.offset)
    return body.read(part.length)



def store_response(outcomes: list[PartOutcome]) -> Dataset:
    """The PS3.18 Store Instances Response (Table I.1-1). RetrieveURLs are present but empty (Type 2): this node
    serves no WADO-RS, so it names no URL it cannot answer."""
    resp = Dataset()
    resp.RetrieveURL = ""
    referenced, failed = [], []
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class_uid
        item.ReferencedSOPInstanceUID = o.sop_uid
        if o.stored:
            item.RetrieveURL = ""
            referenced.append(item)
        else:
            item.FailureReason = o.failure
            failed.append(item)
    if referenced:
        resp.ReferencedSOPSequence = referenced
    if failed:
        resp.FailedSOPSequence = failed
    return resp


__all__ = [
    "MAX_PARTS",
    "BodyReader",
    "Part",
    "PartFailed",
    "PartOutcome",
    "Refused",
    "StowFailure",
    "part_data",
    "split_part10",
    "store_response",
    "stow_boundary",
]
