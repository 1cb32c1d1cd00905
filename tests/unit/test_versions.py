"""Tests for node.versions.withdrawal: the rejection note of a version whose result files retention deleted.

A late instance starts version 2 after the files of version 1 are gone: the note is built from stand-ins made of
the results rows and a source header (`_stub`). The patient and study come from that header, in its character
set; without the set, highdicom wrote a Japanese or UTF-8 name as '?' and a Latin-1 one as undeclared bytes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files

from node.results import AlgorithmIdentity, build_results
from node.versions import withdrawal
from tests.unit.results_support import cached_series, dciodvfy_errors, read_back_strictly
from tests.unit.test_results import needs_dciodvfy  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="versions-model", version="0.0.1")
SOURCES = ("japanese", "utf8", "latin1")


def _sent(which: str, spool: Path) -> list[Path]:
    """The CT series in ``which`` character set as the node's spool holds it: written files."""
    if which == "japanese":
        (path,) = get_charset_files("chrH31.dcm")  # \ISO 2022 IR 87, Yamada^Tarou=山田^太郎=やまだ^たろう
        sample = pydicom.dcmread(path, stop_before_pixels=True)
        charset, name = sample.SpecificCharacterSet, sample.PatientName
    else:
        charset, name = {"utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東"), "latin1": ("ISO_IR 100", "Müller^Jürgen")}[which]
    paths = []
    for n, ds in enumerate(copy.deepcopy(cached_series()[0])):
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        paths.append(spool / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _note_for_deleted_files(paths: list[Path]) -> Dataset:
    """Version 1's SR and SEG built from the series, their files gone; version 2's rejection note of them."""
    sources = [pydicom.dcmread(p) for p in paths]
    results = build_results(sources, cached_series()[1], ALGORITHM)
    assert results.seg is not None
    rows = [SimpleNamespace(path=str(paths[0].parent / f"deleted-{o.Modality}.dcm"), study_uid=o.StudyInstanceUID,
                            result_series_uid=o.SeriesInstanceUID, sop_uid=o.SOPInstanceUID,
                            sop_class_uid=o.SOPClassUID) for o in (results.sr, results.seg)]

    def header() -> Dataset:  # as the worker reads it
        return pydicom.dcmread(paths[0], stop_before_pixels=True)

    ((kind, note),) = withdrawal(rows, ALGORITHM, str(sources[0].SeriesInstanceUID), 2, header)
    assert kind == "kos"
    return note


@pytest.mark.parametrize("which", SOURCES)
def test_note_keeps_the_source_names_and_set(which: str, tmp_path: Path) -> None:
    paths = _sent(which, tmp_path)
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    back = read_back_strictly(_note_for_deleted_files(paths))
    assert str(back.PatientName) == str(source.PatientName)
    assert str(back.ReferringPhysicianName) == str(source.ReferringPhysicianName)
    # the source's set, value 1 respelt where it was empty (node.results.attributes.charset_repair)
    assert _charset(back) in (_charset(source), ["ISO 2022 IR 6", *_charset(source)[1:]])


def _charset(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet", [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("which", SOURCES)
def test_dciodvfy_accepts_the_note(which: str, tmp_path: Path) -> None:
    path = tmp_path / "kos.dcm"
    _note_for_deleted_files(_sent(which, tmp_path)).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_errors(path)
    assert errors == [], errors  # Latin-1 was: "Character invalid for character repertoire"
    assert all("99PACSAI" in w for w in warnings), warnings
