"""training.phantom: valid CT DICOM, realistic HU where the masks say, determinism, clinical table."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage
from scipy import ndimage

from tests.conftest import require_tool
from training.phantom import (
    CLINICAL_COLUMNS,
    NOT_FOR_CLINICAL_USE,
    PhantomError,
    Tissue,
    generate_dataset,
    load_masks,
    parse_range,
)


def _series(data: Path, i: int) -> tuple[list[pydicom.Dataset], dict[str, np.ndarray], dict]:
    table = pd.read_csv(data / "clinical.csv")
    files = sorted((data / table.dicom_dir.iloc[i]).glob("*.dcm"))
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    masks = load_masks(data / table.masks.iloc[i])
    info = json.loads((data / table.case_id.iloc[i] / "case.json").read_text())
    return dss, masks, info


def _hu(dss: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])


def test_series_are_ct_image_storage_with_consistent_geometry(phantom_set: Path) -> None:
    table = pd.read_csv(phantom_set / "clinical.csv")
    for i in range(len(table)):
        dss, masks, _ = _series(phantom_set, i)
        assert len(dss) == 24 == table.slices.iloc[i]
        first = dss[0]
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for d in dss:
            assert d.SOPClassUID == CTImageStorage == d.file_meta.MediaStorageSOPClassUID
            assert d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID
            assert d.Modality == "CT" and d.Rows == d.Columns == 128
            assert str(d.PatientName).startswith("PHANTOM^CASE") and d.PatientID.startswith("PHANTOM-")
            assert NOT_FOR_CLINICAL_USE in d.SeriesDescription and NOT_FOR_CLINICAL_USE in d.ImageComments
            assert d.ImagesInAcquisition == 24
            assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert d.FrameOfReferenceUID == first.FrameOfReferenceUID
            assert d.SeriesInstanceUID == table.series_instance_uid.iloc[i]
            assert d.StudyInstanceUID == table.study_instance_uid.iloc[i]
            assert d.RescaleType == "HU" and float(d.RescaleSlope) == 1.0
            for uid in (d.SOPInstanceUID, d.SeriesInstanceUID, d.StudyInstanceUID, d.FrameOfReferenceUID):
                assert UID(uid).is_valid
        assert len({d.SOPInstanceUID for d in dss}) == 24
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        assert np.allclose(np.diff(z), float(first.SpacingBetweenSlices), atol=1e-3)
        assert float(first.SliceThickness) == pytest.approx(float(first.SpacingBetweenSlices))
        # Instance 1 is the most cranial slice (head-first acquisition order).
        assert dss[-1].InstanceNumber == 1 and dss[0].InstanceNumber == 24
        assert masks["lungs"].shape == masks["lesion"].shape == masks["tissue"].shape == (24, 128, 128)


def test_dcmdump_reads_every_file(phantom_set: Path) -> None:
    require_tool("dcmdump")
    files = sorted(phantom_set.glob("CASE000*/dicom/*.dcm"))[:10]
    res = subprocess.run(["dcmdump", "-q", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "E:" not in res.stderr
    assert "PHANTOM^CASE" in res.stdout and "(7fe0,0010)" in res.stdout.lower()


def test_dciodvfy_reports_no_errors(phantom_set: Path) -> None:
    require_tool("dciodvfy")
    table = pd.read_csv(phantom_set / "clinical.csv")
    for i in range(len(table)):
        f = sorted((phantom_set / table.dicom_dir.iloc[i]).glob("*.dcm"))[5]
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
        assert "CTImage" in res.stdout + res.stderr


def test_hu_where_the_masks_say(phantom_set: Path) -> None:
    table = pd.read_csv(phantom_set / "clinical.csv")
    n_lesions = 0
    for i in range(len(table)):
        dss, m, info = _series(phantom_set, i)
        hu = _hu(dss)
        tissue, lesion = m["tissue"], m["lesion"]
        near_lesion = ndimage.binary_dilation(lesion, iterations=3)
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = True
        # Parenchyma away from walls, vessels and lesions (the scanner blur mixes those in at the edges).
        lung = ndimage.binary_erosion(tissue == Tissue.LUNG, in_plane) & ~near_lesion
        assert -900 <= hu[lung].mean() <= -800, "lung parenchyma should be -850 ± 50 HU"
        assert hu[tissue == Tissue.AIR].mean() < -950
        assert -140 <= np.median(hu[tissue == Tissue.FAT]) <= -60
        assert 0 <= np.median(hu[tissue == Tissue.SOFT]) <= 90
        bone = hu[tissue == Tissue.BONE]
        assert bone.size > 100 and np.percentile(bone, 75) >= 700, "cortical bone should reach 700+ HU"
        assert m["lungs"][tissue == Tissue.LUNG].all() and not (lesion & ~m["lungs"]).any()
        assert lesion.any() == bool(table.label.iloc[i])
        for li, les in enumerate(info["lesions"], start=1):
            # Core of the lesion (edges are blended with lung, as partial volume does).
            core = ndimage.binary_erosion(m["lesion_id"] == li, in_plane) & (tissue == Tissue.LUNG)
            if core.sum() < 20:
                continue  # overwritten by a later lesion, or too small for a core at this resolution
            n_lesions += 1
            med = float(np.median(hu[core]))
            if les["kind"] == "ggo":
                assert -700 <= les["hu"] <= -300 and -760 <= med <= -250, (les, med)
            else:
                assert -100 <= les["hu"] <= 50 and -250 <= med <= 100, (les, med)
    assert n_lesions >= 1


def test_anatomy_varies_between_cases(phantom_set: Path) -> None:
    infos = [_series(phantom_set, i)[2] for i in range(4)]
    for key in ("body_a", "body_b", "lung_ax", "spine_r", "t_apex", "pixel_spacing", "noise_hu"):
        assert len({round(float(x[key]), 4) for x in infos}) == 4, key
    areas = [_series(phantom_set, i)[1]["lungs"].sum() for i in range(4)]
    assert len(set(areas)) == 4


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        generate_dataset(out, cases=2, seed=seed, size=48, slices=6, prevalence=0.5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * (6 + 2) + 1
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "CASE0001/dicom/IM0001.dcm").read_bytes() != (c / "CASE0001/dicom/IM0001.dcm").read_bytes()
    ta, tc = pd.read_csv(a / "clinical.csv"), pd.read_csv(c / "clinical.csv")
    assert not set(ta.study_instance_uid) & set(tc.study_instance_uid)


def test_clinical_table(tmp_path: Path) -> None:
    table = generate_dataset(tmp_path, cases=20, seed=9, size=32, slices=4, prevalence=0.3)
    disk = pd.read_csv(tmp_path / "clinical.csv")
    assert list(disk.columns) == list(CLINICAL_COLUMNS)
    assert len(disk) == 20 and int(disk.label.sum()) == 6  # exact prevalence
    assert (disk.diagnosis == np.where(disk.label == 1, "pneumonia", "normal")).all()
    assert disk.case_id.is_unique and disk.series_instance_uid.is_unique
    for col in ("fever", "cough", "dyspnoea", "reader_label"):
        assert set(disk[col]) <= {0, 1}
    assert disk.age.between(18, 95).all() and set(disk.sex) <= {"M", "F"}
    assert (disk.n_lesions[disk.label == 0] == 0).all() and (disk.n_lesions[disk.label == 1] >= 1).all()
    assert table.equals(disk)


def test_size_and_slice_ranges_are_respected(tmp_path: Path) -> None:
    table = generate_dataset(tmp_path, cases=6, seed=3, size="32-64", slices="5-9")
    assert table.rows.between(32, 64).all() and table.slices.between(5, 9).all()
    assert table.rows.nunique() > 1 or table.slices.nunique() > 1


def test_pleural_lesions_add_one_consolidation_against_the_wall_and_change_nothing_else(tmp_path: Path) -> None:
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    args = {"cases": 10, "seed": 21, "size": 64, "slices": 12, "prevalence": 0.7}
    t0 = generate_dataset(plain, **args)
    t1 = generate_dataset(extra, **args, pleural_lesions=1.0)
    non_subtle = (t0.label == 1) & (t0.subtle == 0)
    assert non_subtle.sum() >= 3 and (t0.label == 0).sum() >= 2
    # Every non-subtle pneumonia case got exactly one more lesion; normals and subtle cases got none.
    assert (t1.n_lesions == t0.n_lesions + non_subtle.astype(int)).all()
    for i in range(len(t0)):
        dicom = sorted((plain / t0.dicom_dir[i]).glob("*.dcm"))
        same = [(extra / f.relative_to(plain)).read_bytes() == f.read_bytes() for f in dicom]
        masks0, masks1 = load_masks(plain / t0.masks[i]), load_masks(extra / t1.masks[i])
        assert (masks0["tissue"] == masks1["tissue"]).all() and (masks0["lungs"] == masks1["lungs"]).all()
        if not non_subtle[i]:
            assert all(same), t0.case_id[i]
            continue
        assert not all(same)
        info = json.loads((extra / t1.case_id[i] / "case.json").read_text())
        before = json.loads((plain / t0.case_id[i] / "case.json").read_text())["lesions"]
        assert info["lesions"][:-1] == before and info["pleural_lesions"] == 1.0
        added = info["lesions"][-1]
        assert added["kind"] == "consolidation" and -100 <= added["hu"] <= 50 and 8 <= added["radius_mm"] <= 20
        new = masks1["lesion_id"] == len(info["lesions"])
        assert new.any() and (masks1["lesion"] | ~masks0["lesion"]).all()  # the old lesions stay lesion
        # It abuts tissue outside the lungs (wall or mediastinum) in-plane.
        outside = ndimage.binary_dilation(~masks1["lungs"], structure=np.ones((1, 3, 3), dtype=bool))
        assert (new & outside).any()
    with pytest.raises(PhantomError, match="pleural_lesions"):
        generate_dataset(tmp_path / "bad", cases=1, seed=1, size=32, slices=4, pleural_lesions=1.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"cases": 0}, {"prevalence": 1.5}, {"size": "abc"}, {"size": "64-32"}, {"size": 8}, {"slices": 1}],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    args = {"cases": 1, "seed": 1, "size": 32, "slices": 4, **kwargs}
    with pytest.raises(PhantomError):
        generate_dataset(tmp_path, **args)


def test_parse_range() -> None:
    assert parse_range("64", "size") == (64, 64)
    assert parse_range("40-160", "slices") == (40, 160)
    assert parse_range((3, 4), "x") == (3, 4)


@pytest.mark.slow
def test_generation_speed_256px_64_slices(tmp_path: Path) -> None:
    t = time.perf_counter()
    generate_dataset(tmp_path, cases=2, seed=1, size=256, slices=64)
    assert (time.perf_counter() - t) / 2 < 2.0
