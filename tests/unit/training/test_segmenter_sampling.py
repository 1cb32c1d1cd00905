"""How the segmenter's trainer draws its lesion slices: per slice, or a lesion case first (small lesions' share)."""

from __future__ import annotations

import numpy as np
import pytest

from training.common import TrainingError
from training.segmenter import LESION_SAMPLING, SegmenterSettings, lesion_picks


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


def test_hard_negatives_are_the_lesion_free_slices_the_model_calls_lesion() -> None:
    """A real (tiny, hand-set) Keras model that calls lesion wherever the lung window is saturated: the mined rows
    are exactly the listed lesion-free slices holding such a spot, and only rows that were listed."""
    import keras

    from models.preprocess import PreprocessConfig
    from training.common import GridCase
    from training.segmenter import hard_negatives

    cfg = PreprocessConfig(grid=16)
    inp = keras.Input((16, 16, cfg.channels))

    def probs(x: object) -> object:
        les = keras.ops.sigmoid(60.0 * (x[..., :1] - 0.9))  # type: ignore[index]
        return keras.ops.concatenate([(1.0 - les) / 2, (1.0 - les) / 2, les], axis=-1)

    model = keras.Model(inp, keras.layers.Lambda(probs)(inp))
    cases = []
    for ci in range(3):
        hu = np.full((6, 16, 16), -850.0, dtype=np.float16)
        for k in {0: (1, 4), 1: (), 2: (0, 5)}[ci]:
            hu[k, 5:8, 5:8] = -150.0  # a dense spot: above the lung window's top
        cases.append(GridCase(f"C{ci}", 0, hu, np.zeros(6), np.ones(6), None, None))
    without = np.array([(c, k) for c in range(3) for k in range(6) if (c, k) != (2, 5)])  # (2, 5) not offered
    got = {tuple(r) for r in hard_negatives(model, cases, without, cfg, batch=4).tolist()}
    assert got == {(0, 1), (0, 4), (2, 0)}


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_a_hard_negative_share_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(TrainingError, match="hard_negative_fraction must lie in"):
        SegmenterSettings(hard_negative_fraction=bad)
