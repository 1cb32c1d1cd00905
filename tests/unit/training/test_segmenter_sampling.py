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


def _dense_spot_model(grid: int, background_above: float | None = None) -> object:
    """A real (tiny, hand-set) Keras model that calls lesion wherever the lung window is saturated (HU above it); of
    the rest it calls background and lung alike, or, with ``background_above`` (a lung-window value), background
    above it and lung below."""
    import keras

    from models.preprocess import PreprocessConfig

    inp = keras.Input((grid, grid, PreprocessConfig(grid=grid).channels))

    def probs(x: object) -> object:
        les = keras.ops.sigmoid(60.0 * (x[..., :1] - 0.9))  # type: ignore[index]
        bg = keras.ops.full_like(les, 0.5)
        if background_above is not None:
            bg = keras.ops.sigmoid(60.0 * (x[..., :1] - background_above))  # type: ignore[index]
        return keras.ops.concatenate([(1.0 - les) * bg, (1.0 - les) * (1.0 - bg), les], axis=-1)

    return keras.Model(inp, keras.layers.Lambda(probs)(inp))


def test_hard_negatives_are_the_lesion_free_slices_the_model_calls_lesion() -> None:
    """The mined rows are exactly the listed lesion-free slices holding a spot the model calls lesion, and only
    rows that were listed."""
    from models.preprocess import PreprocessConfig
    from training.common import GridCase
    from training.segmenter import hard_negatives

    cfg = PreprocessConfig(grid=16)
    model = _dense_spot_model(16)
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


def test_hard_positives_are_the_lesion_slices_whose_lesion_the_model_mostly_misses() -> None:
    """Lesion slices whose lesion is dense (the model finds it) are not mined; those whose lesion is faint (below
    the window's top: missed) are, unless the lesion is under `HARD_POSITIVE_MIN_PIXELS` pixels; a lesion half
    found counts as found, one found on fewer than half its pixels as missed; unlisted rows never come back."""
    from models.preprocess import PreprocessConfig
    from training.common import GridCase
    from training.segmenter import HARD_POSITIVE_MIN_PIXELS, hard_positives

    assert HARD_POSITIVE_MIN_PIXELS == 4
    cfg = PreprocessConfig(grid=16)
    model = _dense_spot_model(16)
    cases = []
    for ci in range(2):
        hu = np.full((6, 16, 16), -850.0, dtype=np.float16)
        target = np.ones((6, 16, 16), dtype=np.uint8)
        for k, (hu_value, rows) in {1: (-150.0, 4), 2: (-650.0, 4), 3: (-650.0, 1), 4: (None, 4), 5: (None, 4)}.items():
            target[k, 5 : 5 + rows, 5:9] = 2  # 16 lesion pixels, or 4 in one row
            if hu_value is not None:
                hu[k, 5 : 5 + rows, 5:9] = hu_value
        hu[4, 5:7, 5:9] = -150.0  # half of the lesion dense: found on 8 of 16 pixels
        hu[5, 5:6, 5:9] = -150.0  # found on 4 of 16
        cases.append(GridCase(f"C{ci}", 1, hu, np.zeros(6), np.ones(6), None, None, target))
    cases[1].target[3, 5, 5:8] = 1  # type: ignore[index]  # case 1's faint one-row lesion: 1 pixel only, below the minimum
    with_les = np.array([(c, k) for c in range(2) for k in range(1, 6) if (c, k) != (1, 2)])  # (1, 2) not offered
    got = {tuple(r) for r in hard_positives(model, cases, with_les, cfg, batch=4).tolist()}
    assert got == {(0, 2), (0, 3), (0, 5), (1, 5)}


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_a_hard_positive_share_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(TrainingError, match="hard_positive_fraction must lie in"):
        SegmenterSettings(hard_positive_fraction=bad)


def test_background_hard_positives_are_the_misses_taken_for_background_not_lung() -> None:
    """A model that calls a faint lesion lung below about -760 HU and background above it: "any" mines both misses,
    "background" only the denser one; the lesion it finds is mined by neither."""
    from models.preprocess import PreprocessConfig
    from training.common import GridCase
    from training.segmenter import hard_positives

    cfg = PreprocessConfig(grid=16)
    model = _dense_spot_model(16, background_above=0.3)  # lung window 0.3 = -760 HU
    hu = np.full((4, 16, 16), -850.0, dtype=np.float16)
    target = np.ones((4, 16, 16), dtype=np.uint8)
    for k, value in {1: -150.0, 2: -650.0, 3: -800.0}.items():
        hu[k, 5:9, 5:9] = value
        target[k, 5:9, 5:9] = 2
    cases = [GridCase("C0", 1, hu, np.zeros(4), np.ones(4), None, None, target)]
    with_les = np.array([(0, 1), (0, 2), (0, 3)])
    assert {tuple(r) for r in hard_positives(model, cases, with_les, cfg).tolist()} == {(0, 2), (0, 3)}
    assert {tuple(r) for r in hard_positives(model, cases, with_les, cfg, kind="background").tolist()} == {(0, 2)}
    with pytest.raises(TrainingError, match="hard_positive_kind must be one of any, background"):
        SegmenterSettings(hard_positive_kind="lung")
