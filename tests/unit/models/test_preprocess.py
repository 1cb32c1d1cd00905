"""models.preprocess: series loading (sorting, rescale, geometry checks), model grid, resampling, augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.preprocess import (
    HU_MIN,
    PreprocessConfig,
    PreprocessError,
    augment,
    dice,
    load_series,
    masks_to_grid,
    masks_to_source,
    resize_slices,
    to_model_input,
)
from training.phantom import Tissue

from .util import case_files, case_masks


def test_load_series_sorts_along_normal_and_rescales(tiny_phantom: Path) -> None:
    files = case_files(tiny_phantom)
    shuffled = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    vol = load_series(shuffled)
    assert vol.hu.shape == (12, 64, 64) and vol.hu.dtype == np.float32
    z = vol.positions[:, 2]
    assert np.all(np.diff(z) > 0), "slices must ascend along the normal (+z for axial HFS)"
    for k in (0, 5, 11):
        ds = pydicom.dcmread(next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == vol.sop_instance_uids[k]))
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.hu[k], expected.astype(np.float32))
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(z[k])
    assert vol.spacing[0] == pytest.approx(float(ds.SpacingBetweenSlices), abs=1e-3)
    assert vol.spacing[1] == pytest.approx(float(ds.PixelSpacing[0]))
    assert [d.SOPInstanceUID for d in vol.datasets] == list(vol.sop_instance_uids)
    assert all("PixelData" not in d for d in vol.datasets)
    assert vol.frame_numbers == (None,) * 12
    assert vol.series_instance_uid == ds.SeriesInstanceUID
    assert vol.patient_sex in ("M", "F") and vol.patient_age is not None


def test_volume_order_matches_ground_truth_masks(small_phantom: Path) -> None:
    # The masks are saved in load_series order; lungs must be dark and lesions denser than lung in that order.
    for i in range(2):
        vol = load_series(case_files(small_phantom, i))
        m = case_masks(small_phantom, i)
        assert m["lungs"].shape == vol.hu.shape
        assert vol.hu[m["tissue"] == Tissue.LUNG].mean() < -750
        assert vol.hu[m["lesion"]].mean() > vol.hu[m["tissue"] == Tissue.LUNG].mean() + 100


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _copies(tiny_phantom: Path, tmp_path: Path) -> list[Path]:
    out = []
    for f in case_files(tiny_phantom):
        shutil.copy(f, tmp_path / f.name)
        out.append(tmp_path / f.name)
    return out


def test_not_dicom_raises(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(PreprocessError, match="file 0"):
        load_series([bad])


def test_empty_list_raises() -> None:
    with pytest.raises(PreprocessError):
        load_series([])


def test_truncated_pixel_data_raises(tiny_phantom: Path, tmp_path: Path) -> None:
    files = _copies(tiny_phantom, tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.PixelData = ds.PixelData[:100]
    _write(ds, files[3])
    with pytest.raises(PreprocessError, match="cannot decode pixel data"):
        load_series(files)


@pytest.mark.parametrize(
    "mutate, message, kind",
    [
        (lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "ImageOrientationPatient",
         "orientation"),
        (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]), "PixelSpacing", "mixed_geometry"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3.4"), "different series", "frame_of_reference"),
        (lambda ds: setattr(ds, "ImagePositionPatient", [0, 0]), "must have 3", "geometry"),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "missing ImagePositionPatient", "geometry"),
        # Type 1 in the CT Image Module; read as 0 it made air 0 HU for unsigned slices stored with the usual -1024
        (lambda ds: delattr(ds, "RescaleIntercept"), "no RescaleIntercept", "pixels"),
    ],
)
def test_inconsistent_geometry_raises(tiny_phantom: Path, tmp_path: Path, mutate, message: str, kind: str) -> None:
    files = _copies(tiny_phantom, tmp_path)
    ds = pydicom.dcmread(files[4])
    mutate(ds)
    _write(ds, files[4])
    with pytest.raises(PreprocessError, match=message) as raised:
        load_series(files)
    assert raised.value.kind == kind  # node.worker codes the refusal by it


def test_duplicate_position_and_gap_raise(tiny_phantom: Path, tmp_path: Path) -> None:
    files = _copies(tiny_phantom, tmp_path)
    dup = pydicom.dcmread(files[2])
    dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    with pytest.raises(PreprocessError, match="share one position") as raised:
        load_series([*files, _write(dup, tmp_path / "dup.dcm")])
    assert raised.value.kind == "spacing"
    with pytest.raises(PreprocessError, match="not uniform") as raised:
        load_series(files[:5] + files[6:])
    assert raised.value.kind == "spacing"


def test_to_model_input_shape_and_range(tiny_phantom: Path) -> None:
    vol = load_series(case_files(tiny_phantom))
    cfg = PreprocessConfig(grid=32)
    x = to_model_input(vol.hu, cfg)
    assert x.shape == (12, 32, 32, 2) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Lung window: air is 0; soft-tissue window: bone saturates at 1.
    assert x[..., 0].min() == 0.0 and x[..., 1].max() == 1.0
    with pytest.raises(PreprocessError):
        to_model_input(vol.hu[0], cfg)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="grid"):
        PreprocessConfig(grid=4)


def test_resize_pads_non_square_and_masks_round_trip() -> None:
    rows, cols = 90, 120
    yy, xx = np.mgrid[:rows, :cols]
    disk = ((yy - 45) ** 2 + (xx - 70) ** 2) < 25**2
    hu = np.where(disk, 40.0, -1000.0).astype(np.float32)[None].repeat(3, axis=0)
    small = resize_slices(hu, 32)
    assert small.shape == (3, 32, 32)
    assert small[0, 0, 0] == pytest.approx(-1024.0, abs=1.0)  # padding is air
    frac = masks_to_grid(disk[None].repeat(3, axis=0), 32)
    assert frac.shape == (3, 32, 32) and frac.min() >= 0.0 and frac.max() <= 1.0
    assert frac.sum(axis=(1, 2))[0] == pytest.approx(disk.sum() * (32 / 120) ** 2, rel=0.05)
    back = masks_to_source(frac, (rows, cols))
    assert back.shape == (3, rows, cols) and back.dtype == bool
    assert dice(back[0], disk) > 0.95


def test_masks_to_source_skips_only_slices_that_cannot_reach_the_threshold() -> None:
    """Slices whose largest probability lies below the threshold are not resampled; the masks equal resampling
    every slice, also for slices whose peak lies just below, at or just above 0.5, and on a non-square grid."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    prob = rng.random((12, 32, 32)).astype(np.float32) * 0.3
    peaks = [0.0, 0.2, 0.4994, 0.4996, 0.49999997, 0.5, 0.5000001, 0.9, 0.3, 1.0, 0.45, 0.7]
    for i, peak in enumerate(peaks):
        prob[i, 10:13, 8:12] = peak  # a small blob, so the upsampled peak sits inside it
    rows, cols = 90, 120
    side = 120  # resize_slices pads to the square (side 120, top 15, left 0)
    every = tf.image.resize(prob[..., None], (side, side), method="bilinear").numpy()[:, 15 : 15 + rows, :, 0] >= 0.5
    got = masks_to_source(prob, (rows, cols), chunk=4)
    assert np.array_equal(got, every)
    assert not got[:5].any() and got[5:8].any()  # under 0.5 nothing, from 0.5 on the blob


def test_augment_keeps_shapes_and_moves_masks_with_image() -> None:
    img = np.full((4, 32, 32), -1000.0, dtype=np.float32)
    img[:, 5:10, 2:6] = 500.0
    mask = (img > 0).astype(np.uint8)
    a1, (m1,) = augment(img, np.random.default_rng(3), [mask])
    a2, (m2,) = augment(img, np.random.default_rng(3), [mask])
    np.testing.assert_array_equal(a1, a2)  # deterministic for a seed
    assert a1.shape == img.shape and m1.shape == mask.shape
    assert set(np.unique(m1)) <= {0, 1}
    # The bright block and its mask still coincide after the transform.
    assert a1[m1 == 1].mean() > 300 and a1[m1 == 0].mean() < -800
    assert not np.array_equal(a1, img)


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[:2] = True
    assert dice(b, b) == 1.0 and dice(b, a) == 0.0


def _multiframe_from(files: list[Path], path: Path, *, reverse: bool = True) -> Path:
    """An Enhanced-CT-like multi-frame file built from single-frame phantom slices (frames in reverse order)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    if reverse:
        dss = dss[::-1]
    first = dss[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", uid
    ds.SeriesInstanceUID, ds.StudyInstanceUID = first.SeriesInstanceUID, first.StudyInstanceUID
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = first.Rows, first.Columns, len(dss)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "-1024"
    shared.PixelValueTransformationSequence[0].RescaleSlope = "1"
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for d in dss:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = d.ImagePositionPatient
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multiframe_series_is_unpacked_and_sorted(tiny_phantom: Path, tmp_path: Path) -> None:
    files = case_files(tiny_phantom)
    single = load_series(files)
    multi = load_series([_multiframe_from(files, tmp_path / "mf.dcm")])
    np.testing.assert_array_equal(multi.hu, single.hu)
    np.testing.assert_allclose(multi.positions, single.positions)
    assert multi.frame_numbers == tuple(range(12, 0, -1))  # frames were stored head → feet
    assert len(set(multi.sop_instance_uids)) == 1 and len(multi.datasets) == 1
    assert multi.spacing == pytest.approx(single.spacing)


def test_real_ct_file_from_pydicom_test_data() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    vol = load_series([path])
    ds = pydicom.dcmread(path)
    assert vol.hu.shape == (1, ds.Rows, ds.Columns)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.hu[0], np.clip(expected, -1024, 3071).astype(np.float32))
    assert vol.spacing[0] == pytest.approx(float(ds.SliceThickness))


@pytest.mark.parametrize(("representation", "bits_stored", "pattern", "pad", "pad_vr"), [
    (0, 12, 0xF830, 63536, "US"),  # outside 12 bits, as scanners write it (pydicom reads the pixel as 2096)
    (1, 12, 0xF430, -3024, "SS"),  # outside 12-bit signed (pydicom reads 1072)
    (0, 16, 0xF830, -2000, "SS"),  # the same 16 bits as 63536, written with the other sign's VR
    (1, 12, 0x0830, -2000, "SS"),  # 12-bit two's complement, upper bits clear: pydicom reads -2000 (2nd review)
])
def test_padding_outside_bits_stored_is_air_not_bone(tmp_path: Path, representation: int, bits_stored: int,
                                                      pattern: int, pad: int, pad_vr: str) -> None:
    """pydicom masks the stored words to BitsStored (or sign-extends from HighBit), so padding written outside that
    range no longer equaled PixelPaddingValue and was read as 1072 or 3071 HU: a ring of bone in the corners, and a
    valid chest CT refused as out of scope (found by review). A tissue pixel whose masked value equals the masked
    padding stays tissue."""
    masked = pattern & ((1 << bits_stored) - 1)  # what pydicom reads for the padding's word
    if representation and masked >= 1 << (bits_stored - 1):
        masked -= 1 << bits_stored
    paths = []
    for k in range(3):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, representation
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        words = np.full((ds.Rows, ds.Columns), 1024, dtype=np.uint16)  # 0 HU
        words[:4, :4] = pattern  # padding in a corner
        if bits_stored < 16 and masked != pad:
            words[10, 10] = masked & 0xFFFF  # tissue whose value pydicom reads like the padding's
        ds.PixelData = words.tobytes()
        ds.add_new(0x00280120, pad_vr, pad)
        ds.ImagePositionPatient = [0, 0, 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1])
    hu = load_series(paths).hu
    assert (hu[:, :4, :4] == HU_MIN).all()
    assert hu[0, 20, 20] == pytest.approx(0.0)
    if bits_stored < 16 and masked != pad:
        assert hu[0, 10, 10] == pytest.approx(float(masked) - 1024.0)


def test_a_file_that_cannot_be_read_is_named_by_its_base_name_only(tmp_path) -> None:
    """An OSError's text repeats the whole path, and hospital exports name folders after the patient: the error
    names the file's base name and why, not the path (reported by the training review)."""
    from models.preprocess import PreprocessError, read_file

    folder = tmp_path / "DOE_JOHN_1957" / "CT_CHEST"
    (folder / "IM0001.dcm").mkdir(parents=True)  # a folder where a file should be: IsADirectoryError
    with pytest.raises(PreprocessError) as caught:
        read_file(0, folder / "IM0001.dcm")
    assert str(caught.value) == "file 0 (IM0001.dcm): cannot be read (Is a directory)"
    with pytest.raises(PreprocessError, match=r"\(IM0002.dcm\): cannot be read \(No such file or directory\)$"):
        read_file(1, folder / "IM0002.dcm")
