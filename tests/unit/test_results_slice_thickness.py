"""SliceThickness is Type 2 in a CT image (empty is valid) but highdicom reads it as a number for the SEG's pixel
measures and the SR's image library: a series without it used to fail every build, so the job ran the models three
times and died with a "processing failed" report (found by review). The measured slice distance stands in."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from node.results import AlgorithmIdentity, build_results
from tests.conftest import require_tool
from tests.unit.results_support import cached_series, dciodvfy_errors


def _without_thickness(sources: list[Dataset], how: str) -> list[Dataset]:
    out = []
    for ds in sources:
        ds = ds.copy()
        ds._dict = dict(ds._dict)  # the copy's own elements: the cached series stays as it was
        if how == "absent":
            del ds.SliceThickness
        else:
            ds.SliceThickness = None  # empty, as Type 2 allows
        out.append(ds)
    return out


@pytest.mark.parametrize("how", ["empty", "absent"])
def test_a_series_without_slice_thickness_gets_its_results(tmp_path: Path, how: str) -> None:
    sources, findings = cached_series()
    bare = _without_thickness(sources, how)
    built = build_results(bare, findings, AlgorithmIdentity(name="pneumonia-attn", version="0.3.1"))
    spacing = abs(float(sources[1].ImagePositionPatient[2]) - float(sources[0].ImagePositionPatient[2]))
    measures = built.seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(spacing)
    assert all(ds.get("SliceThickness") in (None, "") for ds in bare)  # the inputs are not modified
    require_tool("dciodvfy")
    for name, ds in (("sr", built.sr), ("seg", built.seg)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path)[0] == [], name

