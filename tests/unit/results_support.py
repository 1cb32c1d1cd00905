"""Helpers for tests/unit/test_results.py: a synthetic CT series with findings, SR tree queries, DICOM validators."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from node.results import Findings
from tests.ctgen import write_ct_series

SLICES = 8
SIZE = 32
SPACING_MM = 2.5


def ct_sources(out_dir: Path, *, seed: int = 0) -> list[Dataset]:
    """A ctgen CT series (8 slices of 32², 1 mm pixels, 2.5 mm apart) read back, in slice order."""
    series = write_ct_series(out_dir, slices=SLICES, size=SIZE, seed=seed, spacing=SPACING_MM)
    return [pydicom.dcmread(p) for p in series.paths]


@functools.cache
def cached_series() -> tuple[list[Dataset], Findings]:
    """One `ct_sources` series with findings over `synthetic_masks` (probability 0.83), built once per process."""
    with tempfile.TemporaryDirectory() as tmp:
        sources = ct_sources(Path(tmp))
    lungs, lesion = synthetic_masks()
    return sources, Findings(probability=0.83, threshold=0.5, attention=ATTENTION, lungs=lungs, lesion=lesion)


def sent_as_spooled(mutate: Callable[[Dataset], None]) -> list[Dataset]:
    """`cached_series`'s sources with ``mutate`` applied to each (copies), written and read back as the node reads
    its spool: values decoded as received, in the character set they were sent in."""
    sources: list[Dataset] = []
    for ds in copy.deepcopy(cached_series()[0]):
        mutate(ds)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        sources.append(pydicom.dcmread(buffer))
    return sources


def synthetic_masks() -> tuple[np.ndarray, np.ndarray]:
    """Lungs (two boxes per slice) and a lesion blob over slices 3-5, largest on slice 4."""
    lungs = np.zeros((SLICES, SIZE, SIZE), dtype=bool)
    lungs[:, 6:26, 4:14] = True
    lungs[:, 6:26, 18:28] = True
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    lesion = np.zeros_like(lungs)
    for index, radius in ((3, 2.5), (4, 4.2), (5, 3.1)):
        lesion[index] = np.hypot(yy - 14, xx - 9) <= radius
    lesion[4, 20, 22] = True  # a second, smaller component on the same slice: the outline must skip it
    return lungs, lesion


ATTENTION = np.array([0.01, 0.05, 0.10, 0.30, 0.20, 0.25, 0.02, 0.07])  # top 3: slices 3, 5, 4


def walk(item: Dataset) -> Iterator[Dataset]:
    """Every content item below ``item`` (depth first)."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from walk(child)


def named(root: Dataset, value: str, scheme: str) -> list[Dataset]:
    """Content items whose concept name is (value, scheme)."""
    return [
        item
        for item in walk(root)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == value
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == scheme
    ]


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) dciodvfy prints for ``path``."""
    exe = shutil.which("dciodvfy")
    assert exe is not None
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def read_back_strictly(ds: Dataset) -> Dataset:
    """``ds`` written and read back with pydicom's reading validation set to RAISE, every value decoded."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
        back = pydicom.dcmread(buffer)
        for element in back.iterall():
            _ = element.value
    return back


def encoded_without_timestamps(ds: Dataset) -> bytes:
    """The encoded object without the creation timestamps highdicom takes from the clock."""
    ds = copy.deepcopy(ds)
    del ds.InstanceCreationDate, ds.InstanceCreationTime
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = ""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
