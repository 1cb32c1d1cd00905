"""Restacking one real CT slice into a series: copies at even steps along the slice normal, with new UIDs.

Real test files (pydicom's ``CT_small.dcm``, pydicom-data's ``693_UNCI.dcm``) are single slices; copied into a
volume they give the scope check and the models real scanner images to judge. The pixel data, transfer syntax
and every other attribute are kept as they are, so a restacked series is only as truthful as its source.
Raises :class:`~training.phantom.spec.PhantomError` for bad arguments or an unreadable/unwritable file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom

from training.phantom.dicom import _ds_value, _uid
from training.phantom.spec import PhantomError


def restack_slice(source: str | Path, out_dir: str | Path, slices: int, seed: int, *,
                  spacing_mm: float | None = None) -> list[Path]:
    """Write ``slices`` copies of the single-frame CT file ``source`` as one series under ``out_dir``.

    Copy ``k`` lies ``k * spacing_mm`` (default: the source's SliceThickness, else 5 mm) along the slice normal from
    the source position; Study/Series/SOP Instance and Frame of Reference UIDs are new and derive from ``seed``
    and the source file name. Returns the paths in ascending position.
    """
    if slices < 1:
        raise PhantomError(f"slices must be >= 1, got {slices}")
    source = Path(source)
    try:
        ds = pydicom.dcmread(source)
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ValueError … on bad files
        raise PhantomError(f"cannot read {source.name}: {exc}") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise PhantomError(f"{source.name} is multi-frame; restack_slice takes single-frame images")
    try:
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise PhantomError(f"{source.name} lacks usable ImagePositionPatient/ImageOrientationPatient") from exc
    if spacing_mm is None:
        spacing_mm = float(getattr(ds, "SliceThickness", 0) or 5.0)
    if spacing_mm <= 0:
        raise PhantomError(f"spacing_mm must be positive, got {spacing_mm}")
    normal = np.cross(ori[:3], ori[3:])
    tag = (seed, "restack", source.name)
    study, series, frame = (_uid(*tag, kind) for kind in ("study", "series", "frame-of-reference"))
    out_dir = Path(out_dir)
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for k in range(slices):
            c = copy.deepcopy(ds)
            sop = _uid(*tag, "sop", k)
            c.SOPInstanceUID = sop
            c.file_meta.MediaStorageSOPInstanceUID = sop
            c.StudyInstanceUID, c.SeriesInstanceUID, c.FrameOfReferenceUID = study, series, frame
            p = pos + k * spacing_mm * normal
            c.ImagePositionPatient = [_ds_value(float(v)) for v in p]
            c.SliceLocation = _ds_value(float(p @ normal))
            c.InstanceNumber = slices - k
            c.SpacingBetweenSlices = _ds_value(spacing_mm)
            path = out_dir / f"IM{k + 1:04d}.dcm"
            c.save_as(path, enforce_file_format=True)
            paths.append(path)
    except OSError as exc:
        raise PhantomError(f"cannot write restacked series to {out_dir}: {exc.strerror or exc}") from exc
    return paths
