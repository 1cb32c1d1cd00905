"""training.phantom.anatomy and .restack: valid CT DICOM, plausible HU per region, determinism, honest or overridden
BodyPartExamined, restacked real slices that load as one series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from models.preprocess import load_series
from training.phantom import (
    NOT_FOR_CLINICAL_USE,
    REGIONS,
    PhantomError,
    generate_region,
    render_region,
    restack_slice,
)
from training.phantom.anatomy import NOISE_MODES, TRUE_BODY_PART


@pytest.mark.parametrize("region", REGIONS)
def test_series_are_valid_ct_with_consistent_geometry(tmp_path: Path, region: str) -> None:
    files = generate_region(tmp_path, region, seed=3, size=64, slices=8)
    assert len(files) == 8
    dss = [pydicom.dcmread(f) for f in files]
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    assert np.allclose(np.diff(z), float(dss[0].SpacingBetweenSlices), atol=1e-3)  # returned in ascending position
    assert [d.InstanceNumber for d in dss] == list(range(8, 0, -1))  # instance 1 is the most cranial
    for d in dss:
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.SOPClassUID == CTImageStorage == d.file_meta.MediaStorageSOPClassUID
        assert d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID and UID(d.SOPInstanceUID).is_valid
        assert d.Modality == "CT" and d.Rows == d.Columns == 64
        assert NOT_FOR_CLINICAL_USE in d.SeriesDescription and NOT_FOR_CLINICAL_USE in d.ImageComments
        assert str(d.PatientName).startswith("PHANTOM^")
        assert d.BodyPartExamined == TRUE_BODY_PART[region]
        assert (d.SeriesInstanceUID, d.FrameOfReferenceUID) == (dss[0].SeriesInstanceUID, dss[0].FrameOfReferenceUID)
    assert len({d.SOPInstanceUID for d in dss}) == 8
    volume = load_series(files)
    assert volume.shape == (8, 64, 64) and volume.hu.min() >= -1024 and volume.hu.max() <= 3071


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    a = generate_region(tmp_path / "a", "abdomen", seed=5, index=2, size=48, slices=4)
    b = generate_region(tmp_path / "b", "abdomen", seed=5, index=2, size=48, slices=4)
    c = generate_region(tmp_path / "c", "abdomen", seed=6, index=2, size=48, slices=4)
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def test_body_part_can_lie_or_be_empty(tmp_path: Path) -> None:
    for part in ("CHEST", ""):
        files = generate_region(tmp_path / repr(part), "head", seed=1, size=48, slices=3, body_part=part)
        ds = pydicom.dcmread(files[0])
        assert "BodyPartExamined" in ds and ds.BodyPartExamined == part


def _share(hu: np.ndarray, lo: float, hi: float) -> float:
    return float(((hu >= lo) & (hu <= hi)).mean())


def test_head_is_skull_around_brain_with_little_air() -> None:
    hu = render_region("head", 4, size=128, slices=20).hu.astype(float)
    body = hu > -500
    mid = hu[8:14]  # above the skull base: a bone ring around brain
    assert _share(mid[body[8:14]], 300, 3071) > 0.05  # the skull (cortex and diploe, blurred at 2 mm pixels)
    assert _share(mid[body[8:14]], 0, 80) > 0.5  # brain and CSF
    assert _share(hu[body], -1024, -500) < 0.02  # sinuses and mastoid air cells are small


def test_abdomen_has_organs_gas_and_optional_lung_bases() -> None:
    with_bases = render_region("abdomen", 4, size=128, slices=24, lung_bases=True)
    without = render_region("abdomen", 4, size=128, slices=24, lung_bases=False)
    assert with_bases.detail == "lung bases" and without.detail == "abdomen"
    lungish = [_share(c.hu[-2:].astype(float), -900, -800) for c in (with_bases, without)]
    assert lungish[0] > lungish[1] + 0.01  # lung bases at the top slices only when asked for
    body = without.hu > -500
    assert _share(without.hu[body].astype(float), 30, 80) > 0.2  # liver, kidneys, muscle, bowel walls
    assert _share(without.hu[body].astype(float), -150, -50) > 0.1  # fat


@pytest.mark.parametrize("region", ["pelvis", "knee"])
def test_pelvis_and_knee_are_bone_muscle_and_fat(region: str) -> None:
    hu = render_region(region, 2, size=128, slices=16).hu.astype(float)
    body = hu[hu > -500]
    assert _share(body, 900, 3071) > 0.005 and _share(body, 30, 80) > 0.1 and _share(body, -150, -50) > 0.05


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_noise_modes(mode: str) -> None:
    case = render_region("noise", 1, size=64, slices=6, noise_mode=mode)
    assert case.detail == mode and case.hu.std() > 150


def test_bad_arguments() -> None:
    with pytest.raises(PhantomError, match="region"):
        render_region("thorax", 1)
    with pytest.raises(PhantomError, match="size"):
        render_region("head", 1, size=16)
    with pytest.raises(PhantomError, match="noise_mode"):
        render_region("noise", 1, noise_mode="pink")


def test_restack_a_real_slice_into_a_series(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    files = restack_slice(source, tmp_path, slices=6, seed=2, spacing_mm=2.5)
    volume = load_series(files)
    original = pydicom.dcmread(source)
    assert volume.shape == (6, 128, 128) and volume.spacing[0] == pytest.approx(2.5, abs=1e-3)
    assert volume.series_instance_uid != original.SeriesInstanceUID
    assert len(set(volume.sop_instance_uids)) == 6 and original.SOPInstanceUID not in volume.sop_instance_uids
    expected = original.pixel_array * float(original.RescaleSlope) + float(original.RescaleIntercept)
    assert np.array_equal(volume.hu[3], np.clip(expected, -1024, 3071))
    with pytest.raises(PhantomError, match="slices"):
        restack_slice(source, tmp_path, slices=0, seed=2)
