"""Pixel Data against its transfer syntax, at the door (node.ingest): what the syntax says must be what the bytes are.

pydicom reads native or encapsulated Pixel Data whatever the transfer syntax says, and a codec is only run when the
worker decodes the series, so an instance whose pixels cannot be decoded as declared was acknowledged and its whole
series later refused as undecodable — a sender has no reason to send again. `check_pixel_data` refuses
(`InvalidDatasetError`, 0xC000):

- encapsulated fragments under a native syntax, or native bytes under a compressed one;
- native data shorter than Rows × Columns × Samples × Frames × Bits Allocated call for;
- a first fragment that is positively another codec's stream than the syntax names (`codec_of`) and that none of
  the decoders pydicom runs for that syntax reads (`readable_under`): JPEG-LS data labelled RLE, JPEG-LS labelled
  JPEG 2000, an RLE header labelled JPEG … Only what is recognised for certain counts: a fragment that starts like
  none of them, or whose JPEG markers end before a frame header, passes (the decoder judges it later). Decoders
  that read more than their syntax's codec keep it: libjpeg (pylibjpeg for a JPEG or JPEG-LS syntax) reads JPEG
  and JPEG-LS alike, Pillow a JPEG or a JPEG 2000 codestream under either syntax it serves — the worker
  decodes those (``pixel_array``), so refusing them lost instances the node could read (found by review).

Only raw bytes are read: the element's length, the shape attributes' two-byte values, and at most `SNIFF_BYTES` of
the first fragment; Pixel Data itself is never converted.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Protocol

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from node.errors import InvalidDatasetError

SHAPE_TAGS: list[BaseTag | int] = [Tag(t) for t in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                                                      "PhotometricInterpretation")]
PIXEL_DATA = Tag("PixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
SNIFF_BYTES = 4096  # of the first fragment: a JPEG's tables before its frame header fit in far less
_ITEM = 0xFFFEE000
_ITEM_HEADER = struct.Struct("<LL")  # the item tag (group, element) read as one little-endian word, then the length

JPEG, JPEG_LS, JPEG_2000, RLE = "JPEG", "JPEG-LS", "JPEG 2000", "RLE"
_FAMILY = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70"), JPEG),
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), JPEG_LS),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"), JPEG_2000),
    "1.2.840.10008.1.2.5": RLE,
}
# JPEG frame headers (ITU-T T.81 B.1.1.3): SOF0-3, 5-7, 9-11, 13-15; C4 (DHT), C8 (JPG), CC (DAC) are not frames
_SOF_JPEG = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOF_JPEG_LS = 0xF7  # SOF55 (ITU-T T.87)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI, EOI: no length follows
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ (ITU-T T.800 A.4.1)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # a JP2 file's signature box, which some writers keep


class Seekable(Protocol):
    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def read(self, size: int = ..., /) -> bytes: ...


def check_pixel_data(ds: Dataset, ts: UID, fp: Seekable) -> None:
    """Raise `InvalidDatasetError` for Pixel Data ``ts`` cannot describe (see the module docstring); ``fp`` is the
    data set's stream, for the first fragment."""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        return
    if isinstance(raw, RawDataElement):
        length = raw.length
    else:  # already converted (a small value): its bytes, or undefined length
        length = UNDEFINED_LENGTH if raw.is_undefined_length else len(raw.value or b"")
    encapsulated = length == UNDEFINED_LENGTH
    if encapsulated != ts.is_encapsulated:
        found = "encapsulated (compressed)" if encapsulated else "native (uncompressed)"
        raise InvalidDatasetError(f"Pixel Data is {found}, but transfer syntax {ts} says otherwise")
    if encapsulated:
        expected = _FAMILY.get(str(ts))
        if expected is not None and isinstance(raw, RawDataElement):
            found_codec = codec_of(first_fragment(fp, raw.value_tell))
            if found_codec is not None and found_codec != expected and not _readable(found_codec, ts):
                raise InvalidDatasetError(f"Pixel Data is a {found_codec} stream, but transfer syntax {ts} says "
                                          f"{expected}")
        return
    _check_native_length(ds, length)


def _check_native_length(ds: Dataset, length: int) -> None:
    rows, columns, bits, samples = (raw_us(ds, tag) for tag in SHAPE_TAGS[:4])
    if rows is None or columns is None or bits is None:  # not an image the node decodes; judged elsewhere
        return
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return
    photometric = ds.get_item(SHAPE_TAGS[4], keep_deferred=True)
    value = photometric.value if photometric is not None else None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    if text.strip(" \0") == "YBR_FULL_422":
        samples = 2  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    need = (rows * columns * frames * (samples or 1) * bits + 7) // 8
    if length < need:
        raise InvalidDatasetError(f"Pixel Data holds {length} bytes; Rows, Columns, Samples per Pixel, Number "
                                  f"of Frames and Bits Allocated call for {need}")


def raw_us(ds: Dataset, tag: BaseTag | int) -> int | None:
    """A US value read from its two raw little-endian bytes (the node refuses big endian), None when absent or not
    two bytes."""
    raw = ds.get_item(tag, keep_deferred=True)
    value = raw.value if raw is not None else None
    if isinstance(value, int):  # converted already
        return value
    return int.from_bytes(value, "little") if isinstance(value, bytes) and len(value) == 2 else None


def first_fragment(fp: Seekable, value_tell: int) -> bytes:
    """Up to `SNIFF_BYTES` of the first fragment after the Basic Offset Table item; b"" where the items do not
    read as items (the structural walk judges them)."""
    fp.seek(value_tell)
    length = 0
    for item in ("offset table", "first fragment"):
        header = fp.read(8)
        if len(header) < 8:
            return b""
        tag, length = _ITEM_HEADER.unpack(header)
        if (tag & 0xFFFF) << 16 | tag >> 16 != _ITEM or length == UNDEFINED_LENGTH:
            return b""
        if item == "offset table":
            fp.seek(length, 1)
    return fp.read(min(length, SNIFF_BYTES))


def codec_of(head: bytes) -> str | None:
    """Which codec's stream ``head`` (a fragment's first bytes) positively is: `JPEG`, `JPEG_LS`, `JPEG_2000`,
    `RLE`, or None when it is none of them for certain."""
    if head.startswith(_J2K_CODESTREAM) or head.startswith(_JP2_SIGNATURE):
        return JPEG_2000
    if head.startswith(b"\xff\xd8"):
        return _jpeg_frame(head)
    if len(head) >= 64:
        segments, first = struct.unpack_from("<LL", head)
        if 1 <= segments <= 15 and first == 64:  # PS3.5 G.5: the RLE header, its first segment right after it
            return RLE
    return None


def _jpeg_frame(head: bytes) -> str | None:
    """`JPEG` or `JPEG_LS` by the first frame header after SOI (markers walked by their lengths), None when the
    bytes end before one or the marker stream breaks."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _SOF_JPEG_LS:
            return JPEG_LS
        if marker in _SOF_JPEG:
            return JPEG
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(head[pos + 2 : pos + 4], "big")
    return None


# What each of pydicom's decoder plugins reads, by the family of the syntax it runs for; None: anything (a plugin
# not known here, e.g. GDCM, is never second-guessed). libjpeg reads JPEG and JPEG-LS whichever the syntax says;
# Pillow opens whatever image its bytes are (JPEG — lossless and 12-bit too with libjpeg-turbo 3 — or JPEG 2000).
_PLUGIN_READS: dict[tuple[str, str], frozenset[str]] = {
    ("pylibjpeg", JPEG): frozenset({JPEG, JPEG_LS}), ("pylibjpeg", JPEG_LS): frozenset({JPEG, JPEG_LS}),
    ("pylibjpeg", JPEG_2000): frozenset({JPEG_2000}), ("pylibjpeg", RLE): frozenset({RLE}),
    ("pyjpegls", JPEG_LS): frozenset({JPEG_LS}), ("pydicom", RLE): frozenset({RLE}),
    **{("pillow", family): frozenset({JPEG, JPEG_2000}) for family in (JPEG, JPEG_2000)},
}


@lru_cache(maxsize=32)
def readable_under(ts: str) -> tuple[frozenset[str] | None, ...]:
    """What each decoder plugin pydicom has for ``ts`` here reads (None: anything); empty when it has none
    (nothing decodes that syntax, so the family check stands alone)."""
    from pydicom.pixels import get_decoder

    try:
        plugins = get_decoder(ts).available_plugins
    except (NotImplementedError, ValueError):
        return ()
    return tuple(_PLUGIN_READS.get((name, _FAMILY[ts])) for name in plugins)


def _readable(found: str, ts: UID) -> bool:
    """Whether one of the decoders pydicom runs for ``ts`` reads a stream of the ``found`` codec."""
    return any(reads is None or found in reads for reads in readable_under(str(ts)))
