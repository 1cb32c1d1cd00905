"""node.results.seg's overlap check against highdicom's own: same answers, same error, byte-identical SEG."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from node.results import AlgorithmIdentity, Findings
from node.results import seg as seg_module
from node.results.seg import _Segmentation, build_seg
from tests.unit.results_support import ATTENTION, ct_sources, encoded_without_timestamps, synthetic_masks

BINARY = hd.seg.SegmentationTypeValues.BINARY
ALGORITHM = AlgorithmIdentity(name="pneumonia-attn", version="0.3.1")


def _stack(*planes: np.ndarray) -> np.ndarray:
    return np.stack(planes, axis=-1).astype(np.uint8)


def _both(stack: np.ndarray) -> tuple[object, object]:
    numbers = np.arange(1, stack.shape[-1] + 1)
    ours = _Segmentation._check_and_cast_pixel_array(stack, numbers, BINARY, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stack, numbers, BINARY, np.uint8)
    return ours, theirs


@pytest.mark.parametrize("case", ["overlap", "disjoint", "empty", "one-empty", "three-overlap-late", "three-disjoint"])
def test_the_overlap_answer_is_highdicoms(case: str) -> None:
    rng = np.random.default_rng(3)
    a = rng.random((4, 16, 16)) > 0.6
    b = ~a & (rng.random(a.shape) > 0.5)
    c = np.zeros_like(a)
    c[2, 3, 3] = True
    stacks = {
        "overlap": _stack(a, a & (rng.random(a.shape) > 0.9)),
        "disjoint": _stack(a, b),
        "empty": _stack(np.zeros_like(a), np.zeros_like(a)),
        "one-empty": _stack(a, np.zeros_like(a)),
        "three-overlap-late": _stack(a & ~c, b & ~c, c | (a & (rng.random(a.shape) > 0.99))),
        "three-disjoint": _stack(a & ~c, b & ~c, c),
    }
    (ours_array, ours), (theirs_array, theirs) = _both(stacks[case])
    assert ours == theirs
    assert ours_array is stacks[case] or np.array_equal(ours_array, theirs_array)


def test_a_non_binary_stack_fails_the_same_way() -> None:
    stack = _stack(np.ones((2, 4, 4), bool), np.ones((2, 4, 4), bool))
    stack[0, 0, 0, 0] = 2
    messages = []
    for cls in (_Segmentation, hd.seg.Segmentation):
        with pytest.raises(ValueError) as err:
            cls._check_and_cast_pixel_array(stack, np.array([1, 2]), BINARY, np.uint8)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_the_seg_is_byte_identical_to_one_built_by_highdicoms_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = ct_sources(tmp_path)
    lungs, lesion = synthetic_masks()
    findings = Findings(probability=0.8, threshold=0.5, attention=ATTENTION, lungs=lungs, lesion=lesion)
    when = dt.datetime(2026, 1, 2, 3, 4, 5)

    def build() -> Dataset:
        return build_seg(sources, findings, ALGORITHM, series_uid=str(sources[0].SeriesInstanceUID),
                         series_version=1, content_datetime=when)

    ours = build()
    assert ours.SegmentsOverlap == "YES"  # the lesion lies inside the lungs
    monkeypatch.setattr(seg_module, "_Segmentation", hd.seg.Segmentation)
    theirs = build()
    assert type(theirs) is hd.seg.Segmentation
    assert encoded_without_timestamps(ours) == encoded_without_timestamps(theirs)
