"""models.scope with the shipped U-Net: chest phantoms are in scope; heads, abdomens, pelves, knees, noise and real
restacked CT slices are not, whatever BodyPartExamined says; each rule also on its own with the true lung masks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.preprocess import Volume, load_series
from models.registry import Registry, Segmenter
from models.scope import ScopeSettings, ScopeVerdict, assess_chest_scope
from tests.conftest import TEST_WEIGHTS_DIR, missing_peer, require_weights
from training.phantom import generate_dataset, load_masks
from training.phantom.anatomy import NOISE_MODES, generate_region
from training.phantom.restack import restack_slice

CHEST_SEED = 29  # at 128 px × 24 slices: 2 normal, 2 pneumonia, 2 subtle single faint lesions
SIZE, SLICES = 128, 24
# Header values that must never appear in a reason (the phantoms' patient name/ID prefixes, descriptions).
PHI_MARKERS = ("PHANTOM", "SYNTHETIC", "NOT FOR CLINICAL USE")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    require_weights()
    return Registry(Path(TEST_WEIGHTS_DIR) if TEST_WEIGHTS_DIR else None).segmenter()


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scope_chest")
    generate_dataset(out, cases=6, seed=CHEST_SEED, prevalence=0.67, size=SIZE, slices=SLICES)
    return out


def _cases(data: Path) -> Iterator[tuple[pd.Series, list[Path]]]:
    table = pd.read_csv(data / "clinical.csv")
    for _, row in table.iterrows():
        yield row, sorted((data / row.dicom_dir).glob("*.dcm"))


def _judge(segmenter: Segmenter, files: list[Path]) -> tuple[Volume, ScopeVerdict]:
    volume = load_series(files)
    verdict = assess_chest_scope(volume, segmenter.predict(volume).lungs)
    assert verdict.reason and len(verdict.reason) <= 170  # the node prefixes it and keeps 200 characters
    assert not any(marker.lower() in verdict.reason.lower() for marker in PHI_MARKERS), verdict.reason
    assert all(isinstance(v, float) and np.isfinite(v) for v in verdict.measures.values()), verdict.measures
    return volume, verdict


def _files_in_position_order(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


# ---------------------------------------------------------------------------------------------------------
# With the shipped U-Net
# ---------------------------------------------------------------------------------------------------------


def test_chest_phantoms_are_in_scope(segmenter: Segmenter, chest: Path) -> None:
    table = pd.read_csv(chest / "clinical.csv")
    assert table.label.sum() == 4 and table.subtle.sum() == 2  # the seed gives every kind of case
    refused = []
    for row, files in _cases(chest):
        _, verdict = _judge(segmenter, files)
        if not verdict.in_scope:
            refused.append((row.case_id, row.diagnosis, bool(row.subtle), verdict.reason))
    assert not refused


@pytest.mark.parametrize("region", ["head", "abdomen", "pelvis", "knee"])
@pytest.mark.parametrize("index", [0, 1])
def test_non_chest_phantoms_are_out_of_scope(segmenter: Segmenter, tmp_path: Path, region: str, index: int) -> None:
    files = generate_region(tmp_path, region, seed=8, index=index, size=SIZE, slices=SLICES,
                            lung_bases=True if region == "abdomen" else None)
    _, verdict = _judge(segmenter, files)
    assert not verdict.in_scope, verdict


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_noise_is_out_of_scope(segmenter: Segmenter, tmp_path: Path, mode: str) -> None:
    files = generate_region(tmp_path, "noise", seed=8, size=SIZE, slices=SLICES, noise_mode=mode)
    _, verdict = _judge(segmenter, files)
    assert not verdict.in_scope, verdict


def test_a_head_is_refused_as_a_head_whatever_its_header_says(segmenter: Segmenter, tmp_path: Path) -> None:
    verdicts = {}
    for part in (None, "CHEST", ""):
        files = generate_region(tmp_path / repr(part), "head", seed=9, size=SIZE, slices=SLICES, body_part=part)
        header = pydicom.dcmread(files[0], stop_before_pixels=True).BodyPartExamined
        assert header == {None: "HEAD", "CHEST": "CHEST", "": ""}[part]
        _, verdicts[part] = _judge(segmenter, files)
    assert not verdicts[None].in_scope and "head" in verdicts[None].reason
    assert verdicts["CHEST"] == verdicts[""] == verdicts[None]  # only the pixels count


def test_lung_bases_above_an_abdomen_are_a_partial_chest(segmenter: Segmenter, chest: Path) -> None:
    """The lowest slices of a chest phantom (diaphragm, lung bases: well under 1 L of lung) are refused."""
    row, files = next(_cases(chest))
    ordered = _files_in_position_order(files)
    full, verdict = _judge(segmenter, ordered)
    assert verdict.in_scope, verdict
    _, partial = _judge(segmenter, ordered[: SLICES // 4])
    assert not partial.in_scope and "only part of the lungs" in partial.reason, partial
    assert partial.measures["lung_ml"] < 0.5 * verdict.measures["lung_ml"]


REAL_CT = ["CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "bad_sequence.dcm"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # bad_sequence.dcm carries a malformed UID
@pytest.mark.parametrize("name", REAL_CT)
def test_real_ct_slices_restacked_are_out_of_scope(segmenter: Segmenter, tmp_path: Path, name: str) -> None:
    """pydicom's real CT (a chest crop around the spine, heads, a neck crop), 20 copies 5 mm apart."""
    source = get_testdata_file(name)
    if source is None:
        missing_peer(f"{name} needs pydicom-data (the test extra installs it)")
    files = restack_slice(source, tmp_path, slices=20, seed=1, spacing_mm=5.0)
    _, verdict = _judge(segmenter, files)
    assert not verdict.in_scope, verdict


# ---------------------------------------------------------------------------------------------------------
# Each rule on its own, with the phantoms' true lung masks (no U-Net)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest_truth(chest: Path) -> tuple[Volume, np.ndarray]:
    row, files = next(_cases(chest))
    return load_series(files), load_masks(chest / row.masks)["lungs"]


def _with_hu(volume: Volume, hu: np.ndarray) -> Volume:
    return dataclasses.replace(volume, hu=hu, _cache={})


def test_true_lungs_are_in_scope(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    verdict = assess_chest_scope(volume, lungs)
    assert verdict.in_scope, verdict
    m = verdict.measures
    assert 1500 < m["lung_ml"] < 8000 and m["lung_aerated_fraction"] > 0.9 and m["lung_side_share"] > 0.3
    assert m["head_slice_fraction"] == 0.0 and m["body_border_fraction"] < 0.1 and m["pixel_correlation"] > 0.9


def test_lungs_filled_with_tissue_are_not_air(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    hu = volume.hu.copy()
    hu[lungs] = 40.0
    verdict = assess_chest_scope(_with_hu(volume, hu), lungs)
    assert not verdict.in_scope and "not air-filled" in verdict.reason, verdict.reason


def test_one_sided_lungs_are_refused(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    one = lungs.copy()
    one[:, :, : lungs.shape[2] // 2] = False
    verdict = assess_chest_scope(volume, one)
    assert not verdict.in_scope and "one side" in verdict.reason, verdict.reason


def test_the_lowest_slices_alone_are_part_of_the_lungs(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    n = volume.shape[0] // 3  # diaphragm and lung bases, as at the top of an abdominal CT
    low = dataclasses.replace(volume, hu=volume.hu[:n], positions=volume.positions[:n], _cache={})
    verdict = assess_chest_scope(low, lungs[:n])
    assert not verdict.in_scope and "only part of the lungs" in verdict.reason, verdict.reason


def test_lungs_outside_the_body_do_not_count(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    outside = np.zeros_like(lungs)
    outside[:, :4, :] = True  # the air above the body, as the U-Net marks table foam or air around limbs
    verdict = assess_chest_scope(volume, outside)
    assert not verdict.in_scope and "no lungs" in verdict.reason, verdict.reason
    assert verdict.measures["lung_segmented_ml"] > 0 and verdict.measures["lung_ml"] == 0


def test_noise_in_place_of_the_image(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    noise = np.random.default_rng(0).uniform(-1024, 3071, volume.hu.shape).astype(np.float32)
    verdict = assess_chest_scope(_with_hu(volume, noise), lungs)
    assert not verdict.in_scope and "noise" in verdict.reason, verdict.reason


def test_settings_decide(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    measured = assess_chest_scope(volume, lungs).measures["lung_ml"]
    verdict = assess_chest_scope(volume, lungs, ScopeSettings(min_lung_ml=measured + 1, max_lung_ml=measured + 2))
    assert not verdict.in_scope and "only part of the lungs" in verdict.reason, verdict.reason
    verdict = assess_chest_scope(volume, lungs, ScopeSettings(min_lung_extent_mm=1000.0))
    assert not verdict.in_scope and "1000 mm" in verdict.reason, verdict.reason


def test_bad_arguments_fail_fast(chest_truth: tuple[Volume, np.ndarray]) -> None:
    volume, lungs = chest_truth
    with pytest.raises(ValueError, match="lungs"):
        assess_chest_scope(volume, lungs[1:])
    with pytest.raises(ValueError, match="min_aerated_fraction"):
        ScopeSettings(min_aerated_fraction=1.5)
    with pytest.raises(ValueError, match="max_lung_ml"):
        ScopeSettings(min_lung_ml=5000, max_lung_ml=4000)


def test_the_one_pass_hole_filling_is_scipys_per_slice() -> None:
    from scipy import ndimage

    from models.scope import _fill_holes_per_slice

    rng = np.random.default_rng(0)
    for t in range(60):
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        noise = rng.random(shape) > rng.uniform(0.5, 0.97)
        mask = ndimage.binary_dilation(noise, structure=np.ones((1, 3, 3), bool)) if t % 2 else noise
        expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
        assert np.array_equal(_fill_holes_per_slice(mask), expected), shape


def test_the_planar_opening_is_scipys_binary_opening() -> None:
    from scipy import ndimage

    from models.scope import _open_planar

    rng = np.random.default_rng(1)
    for _ in range(60):
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = rng.random(shape) < rng.uniform(0.1, 0.95)
        expected = ndimage.binary_opening(mask, structure=np.ones((1, 3, 3), bool))
        assert np.array_equal(_open_planar(mask), expected), shape


@pytest.mark.parametrize("factors", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_block_means_are_the_reshaped_means(factors: tuple[int, int]) -> None:
    from models.scope import _block_mean

    fy, fx = factors
    hu = np.random.default_rng(1).integers(-1024, 3000, (3, 41, 38)).astype(np.float32)  # integer HU: exact sums
    r2, c2 = 41 // fy * fy, 38 // fx * fx
    expected = hu[:, :r2, :c2].reshape(3, r2 // fy, fy, c2 // fx, fx).mean(axis=(2, 4), dtype=np.float32)
    assert np.array_equal(_block_mean(hu, fy, fx), expected)
    mask = hu > 0
    assert np.array_equal(_block_mean(mask.view(np.uint8), fy, fx) >= 0.5, expected_mask := (
        mask[:, :r2, :c2].reshape(3, r2 // fy, fy, c2 // fx, fx).mean(axis=(2, 4)) >= 0.5))
    assert expected_mask.shape == expected.shape


def test_lungs_cut_at_an_end_are_part_of_the_lungs_even_over_150_mm(chest_truth: tuple[Volume, np.ndarray]) -> None:
    """A series that starts below the apices (or stops above the bases) but still spans ≥ 150 mm of lung passed the
    extent rule; the lung on its first slice shows the cut."""
    volume, lungs = chest_truth
    area = lungs.reshape(lungs.shape[0], -1).sum(axis=1)
    assert max(area[0], area[-1]) <= 0.05 * area.max()  # the whole phantom: lungs end inside the series
    top = int(np.argmax(area >= 0.6 * area.max()))  # the first slice with 60 % of the largest lung slice
    cut = dataclasses.replace(volume, hu=volume.hu[top:], positions=volume.positions[top:], _cache={})
    whole = assess_chest_scope(volume, lungs)
    assert whole.in_scope and whole.measures["lung_end_share"] <= 0.05, whole
    verdict = assess_chest_scope(cut, lungs[top:])
    assert verdict.measures["lung_extent_mm"] >= ScopeSettings().min_lung_extent_mm  # the old rule let it pass
    assert not verdict.in_scope and "cut at the first or last slice" in verdict.reason, verdict.reason


@pytest.mark.parametrize("shift", [1024.0, 2048.0])
def test_values_that_never_read_as_air_are_named_as_not_hounsfield_units(chest_truth: tuple[Volume, np.ndarray],
                                                                        shift: float) -> None:
    """Found by review: a chest stored as HU + 1024 with a Rescale Intercept of 0 (or signed data read as unsigned)
    was refused as "no whole body cross-section ... cropped field of view or noise", which sends radiology IT
    looking at the wrong thing. Values that never read as air are now named for what they are."""
    volume, lungs = chest_truth
    verdict = assess_chest_scope(_with_hu(volume, volume.hu + shift), lungs)
    assert not verdict.in_scope and "not Hounsfield units" in verdict.reason, verdict.reason
    assert assess_chest_scope(volume, lungs).in_scope  # the same chest in HU
