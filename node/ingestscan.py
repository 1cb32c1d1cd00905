"""The structural walk of a received data set (node.ingest), in bounded memory whatever the data set holds.

pydicom reads a sequence of undefined length whole, every value of every item, into Python objects, even when the
caller asks for other tags only: a 14 MiB data set holding one such sequence of 600,000 small items took 680 MB and
28 s of CPU in the listener to parse, and a 1 GiB one (under ``max_instance_bytes``) would take tens of gigabytes.
So the ingest parse never lets pydicom read a sequence: `Walker.stop_when` stops pydicom's element generator
before each one, and `Walker.walk` steps through its items itself — each item's elements with pydicom's generator,
every value seeked past, nested sequences likewise — keeping nothing. With ``check_vrs`` (Explicit VR data sets)
every element met, at any depth, must carry a DICOM VR: a bit flipped in transit or a garbled writer's element
would be stored and read back undecodable (found by fuzzing). Malformed structure (an item that is not one, an
element or item that runs past its parent, nesting deeper than `MAX_DEPTH`) raises `InvalidDatasetError`.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.tag import BaseTag, ItemTag, SequenceDelimiterTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

from node.errors import InvalidDatasetError

MAX_DEPTH = 64  # sequences nested deeper are refused (real objects: SR content trees, a dozen levels)
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_DELIMITER = 0xFFFEE00D
_PIXEL_DATA = 0x7FE00010  # encapsulated Pixel Data: undefined length and items of fragments, not a sequence
_KNOWN_VRS = frozenset(str(vr) for vr in VR)


def check_first_group(fp: DicomIO, ts: UID) -> None:
    """Refuse a data set that starts with command (0000) or file meta (0002) elements: they belong to no data set,
    and a reader takes them for its own (pydicom reads a leading group 0000 as an Implicit VR command set, and
    leading group 0002 elements as more file meta, transfer syntax included), so the file would not read back in
    the transfer syntax it was stored under. Found by fuzzing (tests/unit/test_fuzz_ingest.py)."""
    head = fp.read(2)
    fp.seek(0)
    if len(head) == 2:
        group = int.from_bytes(head, "little" if ts.is_little_endian else "big")
        if group in (0x0000, 0x0002):
            raise InvalidDatasetError(f"dataset starts with group {group:04X} elements, which belong to no data set")


class Walker:
    """Steps through the sequences of one data set read from ``fp`` (a `DicomIO` over the encoded data set)
    without reading them; see the module docstring."""

    def __init__(self, fp: DicomIO, ts: UID, *, check_vrs: bool) -> None:
        self.fp = fp
        self.implicit = bool(ts.is_implicit_VR)
        self.little = bool(ts.is_little_endian)
        self.check_vrs = check_vrs
        self._header = struct.Struct("<HHL" if self.little else ">HHL")  # an item's tag and length (PS3.5 7.5)
        self.stopped_at: tuple[int, int] | None = None  # (value offset, length) of the sequence stopped at

    def stop_when(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        """pydicom's ``stop_when`` hook, called for every element with ``fp`` at its value: checks the VR, and
        answers True (pydicom then rewinds to the element's start) for a sequence, noting where its value is."""
        if self.check_vrs and vr is not None and vr not in _KNOWN_VRS and "AA" <= vr <= "ZZ":
            # (the generator decodes any two bytes in that range as a VR; others make it switch to Implicit VR)
            raise InvalidDatasetError(f"element {Tag(tag)} has no valid VR")
        if tag == _PIXEL_DATA:
            return False
        if vr == VR.SQ or (length == UNDEFINED_LENGTH and (vr == VR.UN or (vr is None and self._items_follow()))):
            self.stopped_at = (self.fp.tell(), length)
            return True
        return False

    def _items_follow(self) -> bool:
        """Whether an element of undefined length and no VR (Implicit VR) holds items: a sequence, as pydicom
        decides for a tag it does not know."""
        here = self.fp.tell()
        head = self.fp.read(4)
        self.fp.seek(here)
        return len(head) == 4 and self._tag(head + b"\0\0\0\0") in (ItemTag, SequenceDelimiterTag)

    def _tag(self, header: bytes) -> int:
        group, element, _ = self._header.unpack(header)
        return int(group) << 16 | int(element)

    def _read_header(self) -> tuple[int, int]:
        header = self.fp.read(8)
        if len(header) < 8:
            raise InvalidDatasetError("dataset is truncated inside a sequence")
        return self._tag(header), int(self._header.unpack(header)[2])

    def _implicit_item(self, implicit: bool) -> bool:
        """Whether the item starting at ``fp`` is in Implicit VR: always inside an Implicit VR parent; else as
        pydicom decides from its first element's VR bytes (a UN sequence of undefined length holds Implicit VR
        items, PS3.5 6.2.2; some writers switch inside sequences too)."""
        if implicit:
            return True
        here = self.fp.tell()
        head = self.fp.read(6)
        self.fp.seek(here)
        return len(head) == 6 and not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)

    def resume(self) -> None:
        """Step through the sequence `stop_when` stopped at; ``fp`` is left right after it."""
        assert self.stopped_at is not None
        offset, length = self.stopped_at
        self.stopped_at = None
        self.fp.seek(offset)
        self.walk(length, 1, self.implicit)

    def walk(self, length: int, depth: int, implicit: bool) -> None:
        """Step through a sequence's items, from ``fp``'s position (its value's first byte)."""
        if depth > MAX_DEPTH:
            raise InvalidDatasetError(f"sequences nested deeper than {MAX_DEPTH} levels")
        end = None if length == UNDEFINED_LENGTH else self.fp.tell() + length
        while end is None or self.fp.tell() < end:
            tag, item_length = self._read_header()
            if tag == SequenceDelimiterTag and end is None:
                return
            if tag != ItemTag:
                raise InvalidDatasetError(f"a sequence holds {Tag(tag)} where an item belongs")
            self._item(None if item_length == UNDEFINED_LENGTH else self.fp.tell() + item_length, depth,
                       self._implicit_item(implicit))
        if self.fp.tell() != end:
            raise InvalidDatasetError("an item runs past the end of its sequence")

    def _item(self, end: int | None, depth: int, implicit: bool) -> None:
        """Step through one item's elements: to ``end``, or (undefined length) through its Item Delimitation Item."""
        fp = self.fp

        def stop(tag: BaseTag, vr: str | None, length: int) -> bool:  # also ends at the next element past ``end``
            return (end is not None and fp.tell() > end) or self.stop_when(tag, vr, length)

        while True:
            for _ in data_element_generator(cast(BinaryIO, fp), implicit, self.little, stop_when=stop, defer_size=0):
                pass  # every value seeked past (Specific Character Set, a few bytes, excepted)
            if self.stopped_at is not None:  # a sequence inside the item: step through it, then go on
                offset, length = self.stopped_at
                self.stopped_at = None
                fp.seek(offset)
                self.walk(length, depth + 1, implicit)
                continue
            if end is not None:
                if fp.tell() == end + 8 and self._delimits_at(end):
                    # the item ended a sequence that ended an undefined-length item: pydicom's generator read that
                    # item's delimiter and returned without a stop (PS3.5 7.5 lets the two length forms mix)
                    fp.seek(end)
                elif fp.tell() != end:
                    raise InvalidDatasetError("an element runs past the end of its sequence item"
                                              if fp.tell() > end else "dataset is truncated inside a sequence item")
                return
            # pydicom's generator returns after the Item Delimitation Item, or at the end of the data
            fp.seek(fp.tell() - 8)
            if self._read_header()[0] != _ITEM_DELIMITER:
                raise InvalidDatasetError("dataset is truncated inside a sequence item")
            return

    def _delimits_at(self, offset: int) -> bool:
        """Whether an Item Delimitation Item starts at ``offset`` (``fp`` is left there)."""
        self.fp.seek(offset)
        return self._read_header()[0] == _ITEM_DELIMITER


def read_top_level(fp: DicomIO, ts: UID, *, specific_tags: list[BaseTag | int], defer_size: int,
                   check_vrs: bool) -> Dataset:
    """pydicom's ``read_dataset`` of ``specific_tags`` from ``fp`` (top-level elements only), with every sequence
    stepped through by a `Walker` instead of read, and with ``check_vrs`` every VR at any depth checked. Only the
    first part (up to the first sequence) goes through ``read_dataset``, whose guess at the VR mode the caller checks;
    the rest is read in the transfer syntax's mode (a guess made again after each sequence could take an Implicit VR
    element whose length bytes read as letters for Explicit VR, and misread all that follows)."""
    walker = Walker(fp, ts, check_vrs=check_vrs)
    implicit, little = bool(ts.is_implicit_VR), bool(ts.is_little_endian)
    ds = read_dataset(cast(BinaryIO, fp), implicit, little, stop_when=walker.stop_when, defer_size=defer_size,
                      specific_tags=specific_tags)
    while walker.stopped_at is not None:
        walker.resume()
        for element in data_element_generator(cast(BinaryIO, fp), implicit, little, stop_when=walker.stop_when,
                                              defer_size=defer_size, specific_tags=specific_tags):
            ds[element.tag] = element
    return ds
