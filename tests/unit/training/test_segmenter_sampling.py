"""How the segmenter's trainer draws its lesion slices: per slice, or a lesion case first (small lesions' share)."""

from __future__ import annotations

import numpy as np
import pytest

from training.segmenter import LESION_SAMPLING, SegmenterSettings, lesion_picks
from training.train import TrainingError


def _rows() -> np.ndarray:
    """Lesion (case, slice) rows as `_slice_index` lists them: case 0 extensive (40 slices), case 3 one faint
    lesion on 2 slices, case 5 on 8."""
    return np.array([(0, k) for k in range(40)] + [(3, 10), (3, 11)] + [(5, k) for k in range(20, 28)])


@pytest.mark.parametrize("how", LESION_SAMPLING)
def test_every_pick_is_a_lesion_row(how: str) -> None:
    rows = _rows()
    picks = lesion_picks(rows, 5000, how, np.random.default_rng(0))
    assert picks.shape == (5000, 2)
    assert {tuple(r) for r in picks.tolist()} <= {tuple(r) for r in rows.tolist()}


def test_case_first_gives_each_lesion_case_the_same_share() -> None:
    rows, n = _rows(), 30_000
    by_slice = lesion_picks(rows, n, "slice", np.random.default_rng(1))
    by_case = lesion_picks(rows, n, "case", np.random.default_rng(1))
    share = {how: {c: float((p[:, 0] == c).mean()) for c in (0, 3, 5)}
             for how, p in (("slice", by_slice), ("case", by_case))}
    assert share["slice"][3] == pytest.approx(2 / 50, abs=0.01) and share["slice"][0] == pytest.approx(0.8, abs=0.01)
    for c in (0, 3, 5):
        assert share["case"][c] == pytest.approx(1 / 3, abs=0.015)
    faint = by_case[by_case[:, 0] == 3, 1]  # both of its slices drawn, about equally
    assert set(faint.tolist()) == {10, 11} and abs(float((faint == 10).mean()) - 0.5) < 0.03


def test_an_unknown_sampling_is_refused() -> None:
    with pytest.raises(TrainingError, match="lesion_sampling must be one of slice, case"):
        SegmenterSettings(lesion_sampling="lesion")
