"""A small, valid multi-slice CT series writer for tests and benchmarks (pydicom only; no outside data).

`write_ct_series(out_dir, slices=..., size=...)` writes one CT Image Storage series as Explicit VR Little Endian
files with consistent geometry (ImagePositionPatient along z, even spacing, one FrameOfReferenceUID) and returns
a `CtSeries` naming the UIDs and paths. Pixel values are a simple body/lung disc phantom in HU, so pixel decoding
and windowing have something real to work on. This is not the chest phantom of `training/phantom.py`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

_ROOT = "1.2.826.0.1.3680043.10.1411."  # test-only UID root


@dataclass
class CtSeries:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def _uid(rng: np.random.Generator) -> UID:
    return generate_uid(prefix=_ROOT, entropy_srcs=[str(rng.integers(0, 2**62))])


def write_ct_series(
    out_dir: Path,
    *,
    slices: int = 8,
    size: int = 32,
    seed: int = 0,
    spacing: float = 2.5,
    skip: tuple[int, ...] = (),
    images_in_acquisition: bool = False,
    study_uid: str | None = None,
    patient_name: str = "TEST^CTGEN",
    patient_id: str = "CTGEN-0001",
) -> CtSeries:
    """Write a CT series of ``slices`` files (``size``² px) into ``out_dir``; slice indices in ``skip`` are left out
    (a gap in the stack). Returns the UIDs and the paths in slice order."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = CtSeries(study_uid=study_uid or _uid(rng), series_uid=_uid(rng), frame_of_reference_uid=_uid(rng))
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    base = np.where(r < size * 0.45, 40.0, -1000.0)
    base = np.where((r < size * 0.3) & (np.abs(xx - c) > size * 0.05), -850.0, base)
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    kept = [i for i in range(slices) if i not in skip]
    for n, i in enumerate(kept):
        hu = base + rng.normal(0, 10, base.shape)
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        sop_uid = _uid(rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = series.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.FrameOfReferenceUID = series.frame_of_reference_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.AccessionNumber = "CTGEN1"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.Modality = "CT"
        ds.Manufacturer = "pacs-ai-node tests"
        ds.SeriesDescription = "ctgen test series"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"  # the default routes send axial chest CT to the pneumonia pipeline
        ds.PatientPosition = "HFS"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-c, -c, round(-i * spacing, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(-i * spacing, 3)
        ds.SliceThickness = spacing
        ds.SpacingBetweenSlices = spacing
        ds.PixelSpacing = [1.0, 1.0]
        ds.KVP = 120
        if images_in_acquisition:
            ds.ImagesInAcquisition = len(kept)
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = stored.tobytes()
        path = out_dir / f"CT{n + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        series.sop_uids.append(sop_uid)
        series.paths.append(path)
    return series
