"""The one preprocessing shared by training and the node: DICOM series → HU volume → model grid, and back.

- :func:`load_series` reads CT files (single- or multi-frame), sorts the slices along the slice normal, applies the
  modality rescale and returns a :class:`Volume` in HU; it raises :class:`PreprocessError` on unreadable files,
  undecodable pixel data or inconsistent geometry.
- :class:`PreprocessConfig` (stored in each model card) says which grid and HU windows a model was trained on;
  :func:`to_model_input` turns HU slices into the model's float32 input with it.
- :func:`masks_to_source` resamples per-slice model-grid probabilities back to the source grid.
- :func:`augment` is the training-time augmentation (flip, rotation, noise, intensity shift), applied in HU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.clinical import header_str, patient_age_years
from models.errors import ModelError

HU_MIN = -1024.0
HU_MAX = 3071.0


class PreprocessError(ModelError):
    """A series could not be turned into a volume: unreadable file, undecodable pixels, inconsistent geometry.

    ``kind`` says which, for the refusal a caller codes (node.worker): ``"pixels"`` (unreadable file, pixel data
    or rescale), ``"geometry"`` (a slice cannot be placed: position, orientation or spacing missing or invalid),
    ``"mixed_geometry"`` (slices differ in matrix size or pixel spacing), ``"orientation"``, ``"frame_of_reference"``
    (several series or frames of reference), ``"spacing"`` (gaps or two slices at one position)."""

    def __init__(self, message: str, kind: str = "pixels") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Volume:
    """A CT series in HU, slices sorted by ascending position along the slice normal.

    ``hu`` is float32 (slices, rows, cols). ``datasets`` holds each source file's header (pixel data dropped),
    ``frame_numbers`` the 1-based frame per slice for multi-frame sources (None for single-frame files), so
    slice ``i`` came from ``sop_instance_uids[i]`` (frame ``frame_numbers[i]``). ``spacing`` is (z, y, x) in mm,
    ``positions`` (slices, 3) the ImagePositionPatient of each slice, ``orientation`` the six direction cosines.
    """

    hu: np.ndarray
    datasets: list[Any]
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    patient_age: float | None = None
    patient_sex: str | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.hu.shape
        return int(s[0]), int(s[1]), int(s[2])


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model sees a series: each slice padded to square, resized to ``grid``², windowed into channels."""

    grid: int = 128
    windows: tuple[tuple[float, float], ...] = ((-1000.0, -200.0), (-200.0, 300.0))

    def __post_init__(self) -> None:
        if self.grid < 16:
            raise ValueError(f"PreprocessConfig.grid must be >= 16, got {self.grid}")
        if not self.windows or any(hi <= lo for lo, hi in self.windows):
            raise ValueError(f"PreprocessConfig.windows must be non-empty (lo, hi) pairs, got {self.windows}")

    @property
    def channels(self) -> int:
        return len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "windows": [list(w) for w in self.windows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        try:
            return cls(grid=int(d["grid"]), windows=tuple((float(lo), float(hi)) for lo, hi in d["windows"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PreprocessError(f"invalid preprocessing config {d!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Reading a series
# ---------------------------------------------------------------------------------------------------------


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PreprocessError(f"{where}: {what} is not numeric", kind="geometry") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise PreprocessError(f"{where}: {what} must have {n} finite values, got {value!r}", kind="geometry")
    return arr


def _frame_attr(ds: Any, index: int, seq: str, attr: str) -> Any:
    """An attribute from the per-frame, else the shared, functional groups of a multi-frame image (or None)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    for item in (per_frame[index] if per_frame and index < len(per_frame) else None, shared[0] if shared else None):
        sub = getattr(item, seq, None) if item is not None else None
        value = getattr(sub[0], attr, None) if sub else None
        if value is not None:
            return value
    return None


@dataclass
class _Slice:
    pixels: np.ndarray  # float32 HU
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    sop_uid: str
    frame: int | None
    ds_index: int


def _decode(ds: Any, where: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types here (missing plugin, corrupt stream, bad length)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PreprocessError(f"{where}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise PreprocessError(f"{where}: expected a single-sample (greyscale) image")
    return np.asarray(arr)


def _padding_mask(ds: Any, raw: np.ndarray, frame: int = 0) -> np.ndarray | None:
    """Where ``raw`` (frame ``frame`` of ``ds``) holds PixelPaddingValue, compared as stored: pydicom clears bits
    above BitsStored or sign-extends from HighBit, so padding outside that range (63536, -3024 in 12 bits) was read
    as bone. The value (US or SS) is its BitsAllocated-bit pattern: native words compared as such (or read as the
    value: 12-bit -2000 stored 0x0830), decoded ones as pydicom reads the pattern."""
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is None:
        return None
    pattern = int(pad) & ((1 << (bits := int(getattr(ds, "BitsAllocated", 16) or 16))) - 1)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if bits in (8, 16, 32) and ts is not None and not ts.is_compressed:
        order = "<" if ts.is_little_endian else ">"
        words = np.frombuffer(ds.PixelData, dtype=f"{order}u{bits // 8}")
        if words.size >= (frame + 1) * raw.size:
            return (words[frame * raw.size:(frame + 1) * raw.size] == pattern).reshape(raw.shape) | (raw == int(pad))
    value = pattern & ((1 << (stored := int(getattr(ds, "BitsStored", bits) or bits))) - 1)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1 and value >= 1 << (stored - 1):
        value -= 1 << stored
    return np.asarray(raw == value)


def _rescale(slope: Any, intercept: Any, where: str) -> tuple[float, float]:
    """(slope, intercept) as numbers, an absent slope read as 1. Raises PreprocessError for a slope that is not a
    positive number or an intercept that is not finite: slope 0 was once read as 1, and the series got a verdict."""
    try:
        s, i = 1.0 if slope is None or str(slope).strip() == "" else float(slope), float(intercept)
    except (TypeError, ValueError):
        s = i = math.nan
    if not (math.isfinite(s) and s > 0.0 and math.isfinite(i)):
        raise PreprocessError(f"{where}: RescaleSlope is not a positive number or RescaleIntercept not a finite one; "
                              f"the pixel values cannot be read as HU")
    return s, i


def _slices_of(ds: Any, ds_index: int, where: str) -> list[_Slice]:
    if "PixelData" not in ds:
        raise PreprocessError(f"{where}: no pixel data")
    raw = _decode(ds, where)
    sop = str(getattr(ds, "SOPInstanceUID", ""))
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    out: list[_Slice] = []
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        frames = raw.reshape((n_frames, *raw.shape[-2:]))
        for f in range(n_frames):
            fw = f"{where} frame {f + 1}"
            pos = _frame_attr(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            ori = _frame_attr(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            spc = _frame_attr(ds, f, "PixelMeasuresSequence", "PixelSpacing")
            slope = _frame_attr(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _frame_attr(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
            if pos is None or ori is None or spc is None:
                raise PreprocessError(f"{fw}: missing plane position, orientation or pixel spacing", kind="geometry")
            slope, inter = _rescale(slope, 0.0 if inter is None else inter, fw)
            hu = frames[f].astype(np.float32) * np.float32(slope) + np.float32(inter)
            pad = _padding_mask(ds, frames[f], f)
            if pad is not None:
                hu[pad] = HU_MIN
            out.append(
                _Slice(hu, _floats(pos, 3, "ImagePositionPatient", fw), _floats(ori, 6, "ImageOrientationPatient", fw),
                       _floats(spc, 2, "PixelSpacing", fw), sop, f + 1, ds_index)
            )
        return out
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds:
            raise PreprocessError(f"{where}: missing {kw}; cannot place the slice in the series", kind="geometry")
    if getattr(ds, "RescaleIntercept", None) in (None, ""):  # Type 1 in the CT Image Module: the HU offset
        raise PreprocessError(f"{where}: no RescaleIntercept; the pixel values cannot be read as HU")
    slope, inter = _rescale(getattr(ds, "RescaleSlope", None), ds.RescaleIntercept, where)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    pad = _padding_mask(ds, raw)
    if pad is not None:
        hu[pad] = HU_MIN
    out.append(
        _Slice(hu, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),
               _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
               _floats(ds.PixelSpacing, 2, "PixelSpacing", where), sop, None, ds_index)
    )
    return out


def load_series(paths: Sequence[str | Path], *, spacing_tolerance: float = 0.1,
                reader: FileReader | None = None) -> Volume:
    """Read a CT series into a :class:`Volume` (HU, sorted along the slice normal, headers kept).

    Raises PreprocessError when a file is not DICOM or has no decodable pixel data, when the files belong to
    different series or frames of reference, or when the geometry is inconsistent: different matrix size,
    orientation or pixel spacing, two slices at one position, or slice gaps differing from the median by more
    than ``spacing_tolerance`` (relative). Error messages name files by their index, never by patient data.
    ``reader`` replaces `read_file` (streaming inference hands in files it decoded while the series arrived).
    """
    if len(paths) == 0:
        raise PreprocessError("no files given")
    datasets, slices = _read_files(paths, reader)
    series, fors, ori, normal, px = _common_geometry(datasets, slices)
    order, dz = _slice_order(datasets, slices, normal, spacing_tolerance)

    sorted_slices = [slices[i] for i in order]
    hu = np.stack([s.pixels for s in sorted_slices]).astype(np.float32, copy=False)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    rank: dict[int, int] = {}
    for k, s in enumerate(sorted_slices):
        rank.setdefault(s.ds_index, k)
    first = datasets[sorted_slices[0].ds_index]
    sex = header_str(first, "PatientSex").strip().upper() or None  # CS: leading spaces are not significant
    return Volume(
        hu=hu,
        datasets=[datasets[j] for j in sorted(rank, key=lambda j: rank[j])],
        sop_instance_uids=tuple(s.sop_uid for s in sorted_slices),
        frame_numbers=tuple(s.frame for s in sorted_slices),
        spacing=(round(dz, 6), float(px[0]), float(px[1])),
        positions=np.stack([s.position for s in sorted_slices]),
        orientation=ori,
        series_instance_uid=next(iter(series)) or None,
        study_instance_uid=str(getattr(first, "StudyInstanceUID", "")) or None,
        frame_of_reference_uid=next(iter(fors)) or None,
        patient_age=patient_age_years(first),
        patient_sex=sex if sex in ("M", "F", "O") else None,
    )


def read_file(index: int, path: str | Path, data: bytes | None = None) -> tuple[Any, list[_Slice]]:
    """One file's header (pixels dropped) and its decoded HU slices; ``index`` names it in errors and is the
    slices' ``ds_index``; ``data``, when given, is the file's content already read (decoded instead of reading
    ``path``). Raises PreprocessError."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    where = f"file {index} ({Path(path).name})"
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else str(path))
    except OSError as exc:  # its text repeats the full path, and folders are often named after the patient
        raise PreprocessError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except (InvalidDicomError, EOFError) as exc:
        raise PreprocessError(f"{where}: not a readable DICOM file: {exc}") from exc
    except Exception as exc:  # corrupt files make pydicom raise ValueError, KeyError, struct.error, …
        raise PreprocessError(f"{where}: cannot parse the DICOM file: {type(exc).__name__}: {exc}") from exc
    slices = _slices_of(ds, index, where)
    if "PixelData" in ds:
        del ds.PixelData  # keep headers only; the pixels live on in the volume
    return ds, slices


FileReader = Callable[[int, "str | Path"], tuple[Any, list[_Slice]]]


def _read_files(paths: Sequence[str | Path], reader: FileReader | None = None) -> tuple[list[Any], list[_Slice]]:
    """Each file's header (pixels dropped) and its slices, in the order given (``reader``: e.g. a cache of
    `read_file` results; its slices must carry ``ds_index`` = the file's index here)."""
    datasets: list[Any] = []
    slices: list[_Slice] = []
    for i, p in enumerate(paths):
        ds, file_slices = (reader or read_file)(i, p)
        slices.extend(file_slices)
        datasets.append(ds)
    return datasets, slices


def _common_geometry(
    datasets: Sequence[Any], slices: Sequence[_Slice]
) -> tuple[set[str], set[str], np.ndarray, np.ndarray, np.ndarray]:
    """(series UIDs, frame-of-reference UIDs, orientation, slice normal, pixel spacing) shared by every slice;
    raises PreprocessError when the slices disagree or the orientation is not orthonormal."""
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise PreprocessError(f"files belong to {len(series)} different series", kind="frame_of_reference")
    fors = {str(getattr(d, "FrameOfReferenceUID", "")) for d in datasets}
    if len(fors) > 1:
        raise PreprocessError(f"files have {len(fors)} different frames of reference", kind="frame_of_reference")
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) > 1:
        raise PreprocessError(f"slices have different matrix sizes: {sorted(shapes)}", kind="mixed_geometry")
    ori = slices[0].orientation
    if any(np.abs(s.orientation - ori).max() > 1e-3 for s in slices):
        raise PreprocessError("slices have different ImageOrientationPatient", kind="orientation")
    row, col = ori[:3], ori[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise PreprocessError(f"ImageOrientationPatient is not two orthonormal vectors: {ori.tolist()}",
                              kind="geometry")
    px = slices[0].pixel_spacing
    if any(np.abs(s.pixel_spacing - px).max() > 1e-3 * max(1.0, float(px.max())) for s in slices):
        raise PreprocessError("slices have different PixelSpacing", kind="mixed_geometry")
    if np.any(px <= 0):
        raise PreprocessError(f"PixelSpacing must be positive, got {px.tolist()}", kind="geometry")
    return series, fors, ori, normal, px


def _slice_order(
    datasets: Sequence[Any], slices: Sequence[_Slice], normal: np.ndarray, spacing_tolerance: float
) -> tuple[np.ndarray, float]:
    """The slices' order along ``normal`` and the slice spacing in mm; raises PreprocessError for two slices at
    one position or gaps that differ from the median by more than ``spacing_tolerance`` (relative)."""
    along = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    if len(gaps) and gaps.min() < 1e-3:
        raise PreprocessError("two slices share one position along the slice normal", kind="spacing")
    if len(gaps):
        dz = float(np.median(gaps))
        worst = float(np.abs(gaps - dz).max())
        if worst > spacing_tolerance * dz:
            raise PreprocessError(
                f"slice spacing is not uniform: median {dz:.3f} mm, a gap differs by {worst:.3f} mm", kind="spacing"
            )
    else:
        first = datasets[0]
        dz = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
    return order, dz


# ---------------------------------------------------------------------------------------------------------
# Model grid
# ---------------------------------------------------------------------------------------------------------


def _square_pad(rows: int, cols: int) -> tuple[int, int, int]:
    """(side, top, left) padding that centres a rows×cols image in a square."""
    side = max(rows, cols)
    return side, (side - rows) // 2, (side - cols) // 2


def _resize_square(x: np.ndarray, grid: int, pad_value: float) -> np.ndarray:
    import tensorflow as tf

    s, r, c = x.shape
    side, top, left = _square_pad(r, c)
    if side != r or side != c:
        padded = np.full((s, side, side), pad_value, dtype=np.float32)
        padded[:, top : top + r, left : left + c] = x
        x = padded
    if side == grid:
        return np.array(x, dtype=np.float32)
    try:
        out = tf.image.resize(tf.convert_to_tensor(x[..., None], tf.float32), (grid, grid), method="bilinear",
                              antialias=True)
    except (tf.errors.OpError, ValueError) as exc:
        raise PreprocessError(f"cannot resize slices of shape {x.shape} to {grid}: {exc}") from exc
    return out.numpy()[..., 0]


def resize_slices(hu: np.ndarray, grid: int) -> np.ndarray:
    """(slices, rows, cols) HU → (slices, grid, grid) HU: pad to square with air, antialiased bilinear resize."""
    return _resize_square(hu, grid, HU_MIN)


def window(hu_grid: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """HU (..., H, W) → float32 (..., H, W, channels) in [0, 1], one channel per window."""
    chans = [np.clip((hu_grid - lo) / (hi - lo), 0.0, 1.0) for lo, hi in config.windows]
    return np.stack(chans, axis=-1).astype(np.float32)


def to_model_input(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Source HU slices (slices, rows, cols) → model input float32 (slices, grid, grid, channels)."""
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise PreprocessError(f"expected HU slices shaped (slices, rows, cols), got {hu.shape}")
    return window(resize_slices(hu, config.grid), config)


def volume_grid(volume: Volume, grid: int) -> np.ndarray:
    """The volume's HU resized to ``grid`` (cached on the volume, so classifier and U-Net resize once)."""
    key = ("grid", grid)
    if key not in volume._cache:
        volume._cache[key] = resize_slices(volume.hu, grid)
    return volume._cache[key]


def masks_to_source(prob: np.ndarray, shape: tuple[int, int], *, threshold: float = 0.5, chunk: int = 16) -> np.ndarray:
    """Model-grid probabilities (slices, grid, grid) → boolean masks (slices, rows, cols) on the source grid.

    Bilinear upsampling of the probabilities, then the threshold (so edges are smooth, not blocky); the square
    padding added by :func:`resize_slices` is cropped off. Works in chunks of slices to bound memory.

    A slice whose largest probability lies below ``threshold`` by a margin is all False without resampling: every
    bilinearly interpolated value is a convex combination of its grid neighbours, so none can reach the threshold
    (most slices have no lesion, and resampling is ~0.7 ms per 512² slice).
    """
    import tensorflow as tf

    s = prob.shape[0]
    rows, cols = shape
    side, top, left = _square_pad(rows, cols)
    out = np.zeros((s, rows, cols), dtype=bool)
    limit = threshold * _MASK_MARGIN if threshold > 0 else -np.inf  # (a threshold ≤ 0: every slice resampled)
    below = np.asarray(prob, dtype=np.float32).reshape(s, -1).max(axis=1, initial=-np.inf) < limit
    todo = np.flatnonzero(~below)
    for a in range(0, len(todo), chunk):
        at = todo[a : a + chunk]
        p = prob[at, ..., None].astype(np.float32)
        if p.shape[1] != side or p.shape[2] != side:
            try:
                p = tf.image.resize(p, (side, side), method="bilinear").numpy()
            except (tf.errors.OpError, ValueError) as exc:
                raise PreprocessError(f"cannot resample masks of shape {prob.shape} to {shape}: {exc}") from exc
        out[at] = p[:, top : top + rows, left : left + cols, 0] >= threshold
    return out


_MASK_MARGIN = 0.999  # far above float32 rounding in a 4-neighbour interpolation (~1e-7 relative)


def masks_to_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """Boolean/label masks (slices, rows, cols) → float32 area fractions on the model grid (training targets)."""
    return np.clip(_resize_square(mask.astype(np.float32), grid, 0.0), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Augmentation (training only)
# ---------------------------------------------------------------------------------------------------------


def augment(
    hu_grid: np.ndarray,
    rng: np.random.Generator,
    masks: Sequence[np.ndarray] = (),
    *,
    max_rotation_deg: float = 12.0,
    max_noise_hu: float = 25.0,
    max_shift_hu: float = 30.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random left-right flip, in-plane rotation, Gaussian noise and HU shift of (slices, H, W) HU arrays.

    The same geometric transform is applied to every slice and to each mask (nearest-neighbour for masks);
    noise and shift touch only the image. Returns (image, masks).
    """
    img = np.asarray(hu_grid, dtype=np.float32)
    ms = [np.asarray(m) for m in masks]
    if rng.random() < 0.5:
        img = img[..., ::-1]
        ms = [m[..., ::-1] for m in ms]
    angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    if abs(angle) > 0.5:
        img = ndimage.rotate(img, angle, axes=(-1, -2), reshape=False, order=1, mode="constant", cval=HU_MIN)
        ms = [
            ndimage.rotate(m, angle, axes=(-1, -2), reshape=False, order=0, mode="constant", cval=0) for m in ms
        ]
    sigma = float(rng.uniform(0.0, max_noise_hu))
    noisy = img + np.float32(rng.uniform(-max_shift_hu, max_shift_hu))
    if sigma > 0:
        noisy = noisy + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.ascontiguousarray(noisy, dtype=np.float32), [np.ascontiguousarray(m) for m in ms]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom
