"""Helpers for comparing DICOM files in tests: the encoded dataset after the file meta, and decoded pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, i.e. everything after preamble and file meta."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(dcmread(path).pixel_array)


def content(path: Path) -> dict[int, object]:
    """Element values of a file's dataset, without group lengths and trailing padding (DCMTK drops both when it
    sends a file)."""
    ds = dcmread(path)
    return {int(e.tag): e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}
