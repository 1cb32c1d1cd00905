"""Is this volume a chest CT the models can judge? Decided from the image and the U-Net's lung mask, never headers.

:func:`assess_chest_scope` returns a :class:`ScopeVerdict`; it reads only ``volume.hu``, ``volume.spacing`` and
``volume.orientation`` (geometry is needed to measure in mm), so a missing or lying BodyPartExamined changes
nothing. The ``reason`` is a short sentence of measured numbers for a "not processed" report: it never quotes a
DICOM attribute value, so it carries no PHI.

How it measures (on a working grid of ~2 mm pixels, block means of the source pixels):

- *coherence*: the Pearson correlation of horizontally neighbouring pixels. Anatomy is smooth at 2 mm, so CT
  gives 0.95–1.0; white noise gives ~0.
- *body*: voxels above -500 HU, opened with a 3×3 square per slice (drops speckle), connected in 3-D; every
  component at least 5 % of the largest is kept (two legs, arms beside a chest), holes are filled per slice, so
  the lungs, being enclosed by the chest wall, are part of the body. ``body_border_fraction`` is the share of the
  image border covered by body: a field of view that cuts through the trunk (a small reconstruction circle, a
  crop) or noise covers most of it.
- *head*: a slice is head-like when a closed ring of bone (>300 HU) encloses at least 20 % of the body's
  cross-section and the enclosed region is ≥60 % 0…80 HU (brain, CSF) with <5 % air.
- *lungs*: only the part of the U-Net lung mask inside the body counts (the U-Net also marks table foam and the
  air around limbs); its volume, the share of it aerated (below -500 HU; the median is reported too), its
  cranio-caudal extent (slices where lung covers ≥1 cm² and ≥5 % of the body's cross-section, × slice spacing;
  the 5 % keeps bowel gas from stretching it), the smaller side's share of it (left/right of the body's centre on
  each slice) and its share of the body on those slices.

Thresholds (:class:`ScopeSettings`, so the node config can expose them) were chosen by measurement with
``benchmarks/scope_corpus.py --seed 2024`` (392 series): 60 chest phantoms from ``training.phantom.generate_dataset``
(128–384 px, 24–96 slices; 27 pneumonia, 9 subtle single faint lesions, 24 normal), the same 60 cut to their
lowest quarter and to their upper half, 40 non-chest phantoms per region from ``training.phantom.anatomy`` (head;
abdomen, 23 of them with lung bases; pelvis; knee; noise: uniform, Gaussian, smoothed blobs) and six real
pydicom/pydicom-data CT slices restacked 20 and 60 times (CT_small: an 85 mm crop around a thoracic spine; three
copies of one head slice, 693_*; a skull base, J2K_pixelrep_mismatch; a 147 mm neck/abdomen crop, bad_sequence).
Measured (whole chests) vs. (the rest), with the threshold between:

- pixel correlation ≥ 0.5: chest ≥ 0.96; uniform and Gaussian noise ≤ 0.003.
- the 1st percentile of the image below -500 HU (air; added 2026-12-06, not from the corpus run): every chest holds
  air outside the body and in the lungs (≈ -1000 HU); pixel values that never read as air are not HU — an
  intercept of 0 on data stored as HU + 1024, signed data read as unsigned, an MR series labelled CT — which the
  next rule used to refuse as "no whole body cross-section", a misleading reason.
- ≤ 50 % of the image border covered by body: chest 0 %; smoothed-blob noise 53–99 %, the two real crops 63–66 %.
  Then body ≥ 1000 mL (chest ≥ 9.9 L): an empty or near-empty image.
- head-like slices ≤ 30 %: chest 0 %; head phantoms 70–83 %, the real head slice 100 %.
- lungs inside the body ≥ 100 mL, or the reason is "no lungs" (pelvis, knee ≤ 14 mL; abdomen without lung bases
  ≤ 158 mL, head ≤ 51 mL).
- aerated share ≥ 0.5, i.e. median below -500 HU: chest ≥ 0.85 (pneumonia included; median ≤ -808 HU); the skull
  base's sinus and mastoid air 0.31, blob noise ≤ 0.34.
- 1000–12000 mL over ≥ 150 mm on ≥ 3 slices: whole chests 1.6–7.1 L over 198–287 mm. A series that covers only
  part of the lungs is outside the scope, because pneumonia in the part not imaged cannot be seen and a
  "no pneumonia" verdict would mislead: lung bases above an abdomen (≤ 865 mL, ≤ 96 mm), a chest's lowest
  quarter (≤ 1.3 L, ≤ 65 mm) and its upper half (105–146 mm) are all refused. Adult lungs span 200–300 mm and
  hold 3–7 L at CT; small children, whom the model never saw, fall outside too.
- lungs ending inside the series: the first and the last slice each hold at most 35 % of the largest slice's lung
  (added 2026-12-05, not from the corpus run: whole chest phantoms hold 0–5 %; lungs cut at an end — a scan that
  stops at mid-lung or above the bases yet spans ≥ 150 mm — hold 35–100 %, and a real chest scan covers apex to
  base with a margin).
- smaller side ≥ 5 % of the lung: chest ≥ 43 %. Kept low so one lung mostly consolidated still passes.
- lung ≥ 5 % of the body on the lung slices: chest ≥ 0.17, lung-base abdomens ≥ 0.10; a backstop for a large
  body holding a few air pockets.
- slice normal within ~37° of the body axis (|cos| ≥ 0.8): the models read axial slices.

Contrast (:func:`contrast_problem`, asked by the node when ``[gate] refuse_contrast`` is on): the tissue between
the lungs on the lung slices — body voxels that are not lung and have lung on both sides along the lateral axis —
farther than 15 mm from bone (any voxel over 600 HU: a vertebral body's or the sternum's marrow reads 150-300 HU
inside its cortex); regions of it at 130-600 HU at least 6 mm across (an in-plane 3 x 3 opening on the working
grid: noise's lone bright voxels go) of more than 30 mL mean iodine in the blood pool, where unenhanced blood reads
30-60 HU. Measured with ``benchmarks/contrast_corpus.py`` on 28 chest phantoms (seed 2024: 16 x 192 px, 24-96
slices; seed 77: 12 x 384 px, 100-200 slices; the U-Net's lungs): unenhanced 0 mL, none refused; with 60 % of the
cortex at marrow values 0-1 mL; their blood raised to venous values (140-200 HU) 113-729 mL and to arterial
(200-400 HU) 119-770 mL, all refused; late-phase blood (100-140 HU) 0-373 mL, 7 of 28 refused, the rest pass. The
margin (seed 2024): at 12 / 15 / 18 / 25 mm the least enhanced arterial case kept 161 / 119 / 85 / 23 mL (at 25 mm
one venous and one arterial case passed), unenhanced and open-cortex ones 0 mL at every margin; 15 mm is about a
thoracic vertebral body's radius.

Limits: no real chest CT was available offline, so the chest side of every threshold is measured on phantoms
only; on real chests the U-Net's lung mask decides most of it. The check takes ~0.1–0.2 s per small series
here, ~0.3–0.45 s for 120 × 512² slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from models.preprocess import Volume

WORK_MM = 2.0  # working grid pixel size; the measures need anatomy, not detail
BODY_HU = -500.0  # above: tissue; below: air and lung
BONE_HU = 300.0
BRAIN_HU = (0.0, 80.0)
AIR_HU = -500.0
LUNG_SLICE_MIN_MM2 = 100.0  # a slice "holds lung" from 1 cm² on …
LUNG_SLICE_MIN_BODY_SHARE = 0.05  # … and from 5 % of the body's cross-section (bowel gas in an abdomen does not)
NO_LUNGS_ML = 100.0  # below this the reason says "no lungs", above it "only part of the lungs" (wording only)
HEAD_SLICE_MIN_MM2 = 2000.0  # slices with less body than 20 cm² are not judged head-like or not
SOFT_TISSUE_HU = (-20.0, 600.0)  # soft tissue and blood, enhanced or not; no fat, air or dense bone
ENHANCED_HU = (130.0, 600.0)  # blood or tissue with iodine: unenhanced blood reads 30-60 HU, clotted up to ~80
DENSE_BONE_HU = 600.0  # cortical bone (and metal) at the working grid; marrow and enhanced blood read less
BONE_MARGIN_MM = 15.0  # tissue this close to dense bone is not judged for contrast: ~ a thoracic vertebral body's radius


@dataclass(frozen=True)
class ScopeSettings:
    """The thresholds of :func:`assess_chest_scope` (see the module docstring for how they were measured)."""

    min_pixel_correlation: float = 0.5
    min_body_ml: float = 1000.0
    max_body_border_fraction: float = 0.5
    max_head_slice_fraction: float = 0.3
    min_lung_ml: float = 1000.0
    max_lung_ml: float = 12000.0
    min_aerated_fraction: float = 0.5
    min_lung_extent_mm: float = 150.0
    min_lung_slices: int = 3
    max_lung_end_share: float = 0.35  # lung on the first or last slice, as a share of the largest lung slice
    min_side_share: float = 0.05
    min_lung_body_ratio: float = 0.05
    min_axial_cosine: float = 0.8
    max_enhanced_ml: float = 30.0  # tissue between the lungs within ENHANCED_HU, away from bone; more: contrast

    def __post_init__(self) -> None:
        for name in ("min_pixel_correlation", "max_body_border_fraction", "max_head_slice_fraction",
                     "min_aerated_fraction", "min_side_share", "min_lung_body_ratio", "min_axial_cosine",
                     "max_lung_end_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ScopeSettings.{name} must be in [0, 1], got {v}")
        for name in ("min_body_ml", "min_lung_ml", "min_lung_extent_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"ScopeSettings.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_lung_ml <= self.min_lung_ml:
            raise ValueError(f"ScopeSettings.max_lung_ml ({self.max_lung_ml}) must exceed min_lung_ml ({self.min_lung_ml})")
        if self.min_lung_slices < 1:
            raise ValueError(f"ScopeSettings.min_lung_slices must be >= 1, got {self.min_lung_slices}")


@dataclass(frozen=True)
class ScopeVerdict:
    """``in_scope``; ``reason``: one sentence, why not (or what was found); ``measures``: the numbers behind it."""

    in_scope: bool
    reason: str
    measures: dict[str, float] = field(default_factory=dict)


def _block_mean(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """(s, r, c) → (s, r // fy, c // fx) block means in float32 (the remainder rows/columns are dropped).

    Summed as fy·fx strided planes, then divided: ~4× faster than a reshaped ``mean(axis=(1, 3))`` on 512² slices,
    and the same numbers wherever the sums are exact in float32 (integer HU, masks)."""
    s, r, c = a.shape
    r2, c2 = r // fy * fy, c // fx * fx
    if (fy, fx) == (1, 1):
        return a.astype(np.float32, copy=False)
    v = a[:, :r2, :c2]
    out = v[:, 0::fy, 0::fx].astype(np.float32)
    for i in range(fy):
        for j in range(fx):
            if i or j:
                out += v[:, i::fy, j::fx]
    out /= np.float32(fy * fx)
    return out


_PLANAR_CROSS = np.zeros((3, 3, 3), bool)
_PLANAR_CROSS[1] = ndimage.generate_binary_structure(2, 1)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` of every slice of a (s, r, c) mask, in one pass: the background's 4-connected
    components within each slice that do not touch that slice's border are holes."""
    labels, n = ndimage.label(~mask, structure=_PLANAR_CROSS)
    outside = np.zeros(n + 1, bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = False
    return ~outside[labels]


def _pixel_correlation(h: np.ndarray, max_slices: int = 32) -> float:
    """Pearson correlation of horizontally neighbouring pixels, on at most ``max_slices`` evenly spaced slices."""
    h = h[np.unique(np.linspace(0, h.shape[0] - 1, min(max_slices, h.shape[0])).astype(int))]
    a, b = h[:, :, :-1].astype(np.float64), h[:, :, 1:].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return 1.0 if denom == 0.0 else float((a * b).sum() / denom)  # a constant image is perfectly coherent


def _open_planar(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_opening`` of a (s, r, c) mask with a 3 x 3 square in each slice (outside the array: False),
    as a minimum then a maximum filter on bytes: the same mask in ~60 % of the time."""
    eroded = ndimage.minimum_filter(mask.view(np.uint8), size=(1, 3, 3), mode="constant")
    return ndimage.maximum_filter(eroded, size=(1, 3, 3), mode="constant").view(bool)


def _body(h: np.ndarray) -> np.ndarray:
    tissue = _open_planar(h > BODY_HU)
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(labels.ravel())[1:]
    body = np.isin(labels, np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1)
    return _fill_holes_per_slice(body)


def _head_like(h: np.ndarray, body: np.ndarray, px_mm2: float) -> tuple[int, int]:
    """(head-like slices, slices with enough body to judge)."""
    judged = head = 0
    bones = h > BONE_HU
    filled = _fill_holes_per_slice(bones)
    for k in range(h.shape[0]):
        area = int(body[k].sum())
        if area * px_mm2 < HEAD_SLICE_MIN_MM2:
            continue
        judged += 1
        bone = bones[k]
        enclosed = filled[k] & ~bone
        if enclosed.sum() < 0.2 * area:
            continue
        v = h[k][enclosed]
        if ((v >= BRAIN_HU[0]) & (v <= BRAIN_HU[1])).mean() >= 0.6 and (v < AIR_HU).mean() < 0.05:
            head += 1
    return head, judged


def _flanked(lung: np.ndarray, axis: int) -> np.ndarray:
    """Voxels with lung on both sides of them (or in them) along ``axis`` of a (s, r, c) mask: between the first
    and the last lung voxel of their line."""
    n = lung.shape[axis]
    has = lung.any(axis=axis, keepdims=True)
    first = np.argmax(lung, axis=axis, keepdims=True)
    last = n - 1 - np.argmax(np.flip(lung, axis=axis), axis=axis, keepdims=True)
    coord = np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
    return has & (coord >= first) & (coord <= last)


def _mediastinum(h: np.ndarray, body: np.ndarray, lung: np.ndarray, holds: np.ndarray, lateral_axis: int,
                 px_mm: float, vox_ml: float) -> dict[str, float]:
    """The tissue between the lungs on the lung slices — body voxels that are not lung, with lung on both sides of
    them along the lateral axis, farther than `BONE_MARGIN_MM` from any voxel over `DENSE_BONE_HU` (a vertebral
    body's or the sternum's marrow reads 150-300 HU inside its cortex, whether or not the cortex reads as a closed
    ring) — as ``mediastinum_ml`` (within `SOFT_TISSUE_HU`), ``mediastinum_enhanced_ml`` and
    ``mediastinum_enhanced_hu`` (their median) for the regions within `ENHANCED_HU` at least 3 x 3 working-grid
    pixels (6 mm) across. ~35 ms for 120 slices of 512 x 512 (the whole check ~0.5 s)."""
    ks = np.flatnonzero(holds)
    out = {"mediastinum_ml": 0.0, "mediastinum_enhanced_ml": 0.0, "mediastinum_enhanced_hu": 0.0}
    if not ks.size:
        return out
    flanked = _flanked(lung[ks], lateral_axis)
    margin = max(1, round(BONE_MARGIN_MM / px_mm))
    window = [slice(None)]  # what follows only where lungs flank anything, and bone near enough to matter
    for axis in (1, 2):
        seen = np.flatnonzero(flanked.any(axis=(0, 3 - axis)))
        if not seen.size:
            return out
        window.append(slice(max(0, seen[0] - margin), seen[-1] + 1 + margin))
    box = tuple(window)
    h_k, flanked = h[box][ks], flanked[box]
    near_bone = ndimage.maximum_filter((h_k > DENSE_BONE_HU).view(np.uint8), size=(1, 2 * margin + 1, 2 * margin + 1))
    between = flanked & body[box][ks] & ~lung[box][ks] & ~near_bone.view(bool)
    out["mediastinum_ml"] = float((between & (h_k >= SOFT_TISSUE_HU[0]) & (h_k <= SOFT_TISSUE_HU[1])).sum()) * vox_ml
    dense = between & (h_k >= ENHANCED_HU[0]) & (h_k <= ENHANCED_HU[1])
    if not dense.any():
        return out
    # opened with a 3 x 3 square, within the candidates' bounds: chambers and great vessels stay, noise's lone
    # bright voxels go
    rows, cols = np.flatnonzero(dense.any(axis=(0, 2))), np.flatnonzero(dense.any(axis=(0, 1)))
    near = (slice(None), slice(max(0, rows[0] - 1), rows[-1] + 2), slice(max(0, cols[0] - 1), cols[-1] + 2))
    enhanced = h_k[near][_open_planar(dense[near])]
    out["mediastinum_enhanced_ml"] = float(enhanced.size) * vox_ml
    out["mediastinum_enhanced_hu"] = float(np.median(enhanced)) if enhanced.size else 0.0
    return out


def contrast_problem(m: dict[str, float], settings: ScopeSettings | None = None) -> str | None:
    """Why the image looks contrast-enhanced (blood between the lungs denser than unenhanced blood can be), or
    None; from :func:`measure`'s numbers."""
    s = settings or ScopeSettings()
    if m.get("mediastinum_enhanced_ml", 0.0) <= s.max_enhanced_ml:
        return None
    return (f"contrast enhancement in the image: {m['mediastinum_enhanced_ml']:.0f} mL between the lungs at a "
            f"median {m['mediastinum_enhanced_hu']:.0f} HU (unenhanced blood 30-60); models trained on non-contrast "
            f"CT only")


def measure(volume: Volume, lungs: np.ndarray) -> dict[str, float]:
    """The measures :func:`assess_chest_scope` decides on (see the module docstring): ``axial_cosine``,
    ``pixel_correlation``, ``low_hu``, ``body_ml``, ``body_border_fraction``, ``head_slice_fraction``, ``lung_segmented_ml``
    (all of the mask), ``lung_ml`` (inside the body), ``lung_median_hu``, ``lung_aerated_fraction``,
    ``lung_slices``, ``lung_extent_mm``, ``lung_body_ratio``, ``lung_side_share``, ``mediastinum_ml``,
    ``mediastinum_enhanced_ml``, ``mediastinum_enhanced_hu`` (the tissue between the lungs, for
    :func:`contrast_problem`). Raises ValueError when
    ``lungs`` is not a mask shaped like ``volume.hu``."""
    if lungs.shape != volume.hu.shape:
        raise ValueError(f"lungs must be shaped like volume.hu {volume.hu.shape}, got {lungs.shape}")
    dz, dy, dx = (float(v) for v in volume.spacing)
    ori = np.asarray(volume.orientation, dtype=float)
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    fy, fx = max(1, round(WORK_MM / dy)), max(1, round(WORK_MM / dx))
    h = _block_mean(volume.hu, fy, fx)
    lung = _block_mean(lungs.view(np.uint8) if lungs.dtype == np.bool_ else (lungs > 0).view(np.uint8), fy, fx) >= 0.5
    px_mm2 = dy * fy * dx * fx
    vox_ml = px_mm2 * dz / 1000.0

    m: dict[str, float] = {"axial_cosine": float(abs(normal[2]))}
    m["pixel_correlation"] = _pixel_correlation(h)
    m["low_hu"] = float(np.percentile(h, 1.0)) if h.size else 0.0  # air (outside the body, in the lungs): ~ -1000
    body = _body(h)
    m["body_ml"] = float(body.sum()) * vox_ml
    edges = np.concatenate([body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]], axis=1)
    m["body_border_fraction"] = float(edges.mean())
    head, judged = _head_like(h, body, px_mm2)
    m["head_slice_fraction"] = head / judged if judged else 0.0

    inside = lung & body
    m["lung_segmented_ml"] = float(lung.sum()) * vox_ml
    m["lung_ml"] = float(inside.sum()) * vox_ml
    values = h[inside]
    m["lung_median_hu"] = float(np.median(values)) if values.size else 0.0
    m["lung_aerated_fraction"] = float((values < AIR_HU).mean()) if values.size else 0.0
    per_slice = inside.sum(axis=(1, 2))
    holds = (per_slice * px_mm2 >= LUNG_SLICE_MIN_MM2) & (per_slice >= LUNG_SLICE_MIN_BODY_SHARE * body.sum(axis=(1, 2)))
    m["lung_slices"] = float(holds.sum())
    largest = float(per_slice.max()) if per_slice.size else 0.0
    m["lung_end_share"] = float(max(per_slice[0], per_slice[-1])) / largest if largest else 0.0
    m["lung_extent_mm"] = float(holds.sum()) * dz
    m["lung_body_ratio"] = float(inside[holds].sum() / max(1, body[holds].sum()))
    # Lateral = the in-plane image axis closest to the patient's left-right axis.
    lateral_axis = 2 if abs(row_dir[0]) >= abs(col_dir[0]) else 1
    m.update(_mediastinum(h, body, inside, holds, lateral_axis, float(np.sqrt(px_mm2)), vox_ml))
    n_lat = h.shape[lateral_axis]
    coord = np.arange(n_lat, dtype=np.float64)
    sides = np.zeros(2)
    across = 2 - lateral_axis  # the slice's other in-plane axis, summed over for a lateral profile
    for k in np.flatnonzero(holds):
        b_prof = body[k].sum(axis=across)
        centre = float((b_prof * coord).sum() / max(1, b_prof.sum()))
        l_prof = inside[k].sum(axis=across)
        sides += (l_prof[coord < centre].sum(), l_prof[coord >= centre].sum())
    m["lung_side_share"] = float(sides.min() / sides.sum()) if sides.sum() else 0.0
    return m


def assess_chest_scope(volume: Volume, lungs: np.ndarray, settings: ScopeSettings | None = None) -> ScopeVerdict:
    """Whether ``volume`` is a chest CT the models can judge, given the U-Net's boolean lung mask ``lungs`` (shaped
    like ``volume.hu``). The first failing check names the reason. Raises ValueError for a mis-shaped mask."""
    s = settings or ScopeSettings()
    m = measure(volume, lungs)

    reason = _image_problem(m, s) or _lung_problem(m, s)
    if reason is not None:
        return ScopeVerdict(False, reason, m)
    return ScopeVerdict(True, f"chest CT: {m['lung_ml']:.0f} mL of aerated lung over {m['lung_extent_mm']:.0f} mm", m)


def _image_problem(m: dict[str, float], s: ScopeSettings) -> str | None:
    """The first reason the images are not an axial body CT (noise, a cropped field of view, a head), or None."""
    if m["axial_cosine"] < s.min_axial_cosine:
        return (f"not an axial series: slices lie {np.degrees(np.arccos(m['axial_cosine'])):.0f}° off axial, "
                   f"the models read axial slices")
    if m["pixel_correlation"] < s.min_pixel_correlation:
        return (f"no coherent image, like random noise: neighbouring pixels correlate {m['pixel_correlation']:.2f}, "
                   f"at least {s.min_pixel_correlation:.2f} expected")
    if m["low_hu"] > AIR_HU:  # every chest CT holds air: values that never read as air are not HU at all
        return (f"no air anywhere in the images: the lowest values read {m['low_hu']:.0f} HU where air reads about "
                f"-1000 HU, so the pixel values are not Hounsfield units (Rescale Intercept/Slope or Pixel "
                f"Representation wrong for the data) or the images hold no air at all")
    if m["body_border_fraction"] > s.max_body_border_fraction:
        return (f"no whole body cross-section: tissue covers {100 * m['body_border_fraction']:.0f}% of the image "
                   f"border, at most {100 * s.max_body_border_fraction:.0f}% expected, as in a cropped field of view or noise")
    if m["body_ml"] < s.min_body_ml:
        return (f"no body found: {m['body_ml']:.0f} mL above {BODY_HU:.0f} HU, at least {s.min_body_ml:.0f} mL expected")
    if m["head_slice_fraction"] > s.max_head_slice_fraction:
        return (f"looks like a head: a skull ring around brain-density tissue on "
                   f"{100 * m['head_slice_fraction']:.0f}% of slices")
    return None


def _lung_problem(m: dict[str, float], s: ScopeSettings) -> str | None:
    """The first reason the segmented lungs are not a whole, aerated pair of a chest, or None."""
    if m["lung_ml"] < NO_LUNGS_ML:
        return (f"no lungs found: {m['lung_ml']:.0f} mL segmented inside the body, at least {s.min_lung_ml:.0f} mL expected")
    if m["lung_aerated_fraction"] < s.min_aerated_fraction:
        return (f"the segmented lungs are not air-filled: median {m['lung_median_hu']:.0f} HU, "
                   f"{100 * m['lung_aerated_fraction']:.0f}% below {AIR_HU:.0f} HU "
                   f"(at least {100 * s.min_aerated_fraction:.0f}% expected)")
    if m["lung_ml"] > s.max_lung_ml:
        return (f"implausible lungs: {m['lung_ml']:.0f} mL segmented, at most {s.max_lung_ml:.0f} mL expected")
    if (m["lung_ml"] < s.min_lung_ml or m["lung_extent_mm"] < s.min_lung_extent_mm
            or m["lung_slices"] < s.min_lung_slices):
        return (f"only part of the lungs: {m['lung_ml']:.0f} mL over {m['lung_extent_mm']:.0f} mm on "
                   f"{m['lung_slices']:.0f} slices; at least {s.min_lung_ml:.0f} mL over {s.min_lung_extent_mm:.0f} mm "
                   f"on {s.min_lung_slices} slices expected")
    if m["lung_end_share"] > s.max_lung_end_share:
        return (f"only part of the lungs: they are cut at the first or last slice, which holds "
                   f"{100 * m['lung_end_share']:.0f}% of the largest slice's lung (at most "
                   f"{100 * s.max_lung_end_share:.0f}%); the series must cover the lungs from apex to base")
    if m["lung_side_share"] < s.min_side_share:
        return (f"lungs on one side only: the other side holds {100 * m['lung_side_share']:.1f}% of them, "
                   f"at least {100 * s.min_side_share:.0f}% expected")
    if m["lung_body_ratio"] < s.min_lung_body_ratio:
        return (f"too little lung for a chest: {100 * m['lung_body_ratio']:.1f}% of the body on lung slices, "
                   f"at least {100 * s.min_lung_body_ratio:.0f}% expected")
    return None
