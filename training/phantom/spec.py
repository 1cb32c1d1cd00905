"""Phantom case parameters: the tissue labels, the dataclasses, and drawing every random choice of a case."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

NOT_FOR_CLINICAL_USE = "SYNTHETIC PHANTOM - NOT FOR CLINICAL USE"
GENERATOR_VERSION = "1"


class PhantomError(Exception):
    """Bad phantom arguments, or the dataset could not be written."""


class Tissue(enum.IntEnum):
    """Labels of the ``tissue`` map saved with each case (the anatomy before lesions are painted)."""

    AIR = 0
    FAT = 1
    SOFT = 2  # muscle, mediastinum, spinal canal
    LUNG = 3  # lung parenchyma
    VESSEL = 4  # blood: heart, aorta, pulmonary vessels
    BONE = 5  # cortical bone: ribs, sternum, vertebral shells
    MARROW = 6  # cancellous bone inside vertebral bodies
    AIRWAY = 7  # trachea, main bronchi, stomach gas
    LIVER = 8
    NODULE = 9  # small benign solid nodules (confounders, not pneumonia)


@dataclass(frozen=True)
class Lesion:
    """One pneumonia lesion: a blob of sub-ellipsoids, clipped to the lungs."""

    kind: str  # "ggo" | "consolidation"
    hu: float
    centre_mm: tuple[float, float, float]  # body frame (x, y, z)
    radius_mm: float
    subtle: bool
    blobs: tuple[tuple[float, float, float, float, float, float], ...]  # (cx, cy, cz, rx, ry, rz) in mm


@dataclass
class CaseSpec:
    """Every random choice of one case, drawn up front so the rendering is a pure function of it."""

    case_id: str
    index: int
    label: int
    rows: int
    slices: int
    pixel_spacing: float
    slice_spacing: float
    z_start: float
    rotation_deg: float
    offset_mm: tuple[float, float]
    body_a: float
    body_b: float
    fat_mm: float
    muscle_mm: float
    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    t_dia: tuple[float, float]
    dome: float
    t_apex: float
    t_carina: float
    heart: tuple[float, float, float, float, float, float]  # cx, cy, ct, ax, ay, at (t in 0..1)
    spine_r: float
    disc_pitch: float
    rib_pitch: float
    rib_phase: float
    rib_slope: float
    aorta_r: float
    trachea_r: float
    stomach_gas: bool
    lut: dict[int, float]
    lung_gradient: float
    noise_hu: float
    blur_px: float
    signed: bool
    age: int
    sex: str
    symptoms: dict[str, int]
    reader_label: int
    lesions: list[Lesion] = field(default_factory=list)
    nodules: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, z, r (mm)


@dataclass(frozen=True)
class CaseResult:
    """What one generated case produced (arrays in ascending slice-position order)."""

    spec: CaseSpec
    hu: np.ndarray  # int16, HU after noise and quantisation
    tissue: np.ndarray  # uint8
    lungs: np.ndarray  # bool
    lesion_id: np.ndarray  # uint8

    @property
    def lesion(self) -> np.ndarray:
        return self.lesion_id > 0


def parse_range(text: str | int | tuple[int, int], name: str) -> tuple[int, int]:
    """``"64"`` → (64, 64), ``"40-160"`` → (40, 160); raises PhantomError naming ``name``."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        parts = str(text).split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
        except ValueError:
            raise PhantomError(f"{name}: expected N or MIN-MAX, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise PhantomError(f"{name}: expected N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(lo), int(hi)


# ---------------------------------------------------------------------------------------------------------
# Drawing the case parameters
# ---------------------------------------------------------------------------------------------------------

_SIZES = (128, 160, 192, 224, 256, 320, 384, 448, 512)


def _draw_size(rng: np.random.Generator, size: tuple[int, int]) -> int:
    lo, hi = size
    choices = [s for s in _SIZES if lo <= s <= hi]
    if lo == hi or not choices:
        return int(rng.integers(lo, hi + 1))
    return int(rng.choice(choices))


def draw_case(seed: int, index: int, label: int, size: tuple[int, int], slices: tuple[int, int]) -> CaseSpec:
    """All random parameters of case ``index`` of the dataset with ``seed``."""
    rng = np.random.default_rng([seed, index, 0x9E3779B9])
    u = rng.uniform
    rows = _draw_size(rng, size)
    n_slices = int(rng.integers(slices[0], slices[1] + 1))
    body_a = u(130.0, 178.0)
    body_b = body_a * u(0.66, 0.80)
    fov = 2 * body_a + u(40.0, 110.0)
    length = u(250.0, 320.0)  # cranio-caudal coverage, mm
    slice_spacing = round(length / n_slices, 3)
    pixel_spacing = round(fov / rows, 4)
    age = int(np.clip(rng.normal(56 + 7 * label, 16), 18, 95))
    sex = "M" if rng.random() < 0.5 else "F"
    p = {"fever": (0.18, 0.65), "cough": (0.30, 0.80), "dyspnoea": (0.15, 0.55)}
    symptoms = {k: int(rng.random() < v[label]) for k, v in p.items()}
    lut = {
        Tissue.AIR: -1000.0,
        Tissue.FAT: u(-120.0, -80.0),
        Tissue.SOFT: u(35.0, 55.0),
        Tissue.LUNG: u(-880.0, -835.0),
        Tissue.VESSEL: u(35.0, 50.0),
        Tissue.BONE: u(900.0, 1300.0),
        Tissue.MARROW: u(180.0, 300.0),
        Tissue.AIRWAY: u(-1000.0, -970.0),
        Tissue.LIVER: u(50.0, 70.0),
        Tissue.NODULE: u(20.0, 70.0),
    }
    spec = CaseSpec(
        case_id=f"CASE{index + 1:04d}",
        index=index,
        label=label,
        rows=rows,
        slices=n_slices,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        z_start=round(-u(200.0, 500.0), 2),
        rotation_deg=u(-6.0, 6.0),
        offset_mm=(u(-12.0, 12.0), u(-15.0, 15.0)),
        body_a=body_a,
        body_b=body_b,
        fat_mm=u(6.0, 30.0),
        muscle_mm=u(8.0, 18.0),
        lung_cx=u(0.44, 0.52),
        lung_cy=u(-0.08, 0.04),
        lung_ax=u(0.34, 0.42),
        lung_ay=u(0.70, 0.82),
        t_dia=(u(0.14, 0.24), u(0.10, 0.20)),  # right hemidiaphragm usually higher
        dome=u(0.06, 0.12),
        t_apex=u(0.90, 0.99),
        t_carina=u(0.58, 0.68),
        heart=(u(0.06, 0.18), u(-0.45, -0.25), u(0.30, 0.40), u(0.32, 0.42), u(0.36, 0.48), u(0.16, 0.22)),
        spine_r=u(13.0, 20.0),
        disc_pitch=u(24.0, 30.0),
        rib_pitch=u(24.0, 32.0),
        rib_phase=u(0.0, 30.0),
        rib_slope=u(25.0, 55.0),
        aorta_r=u(10.0, 15.0),
        trachea_r=u(7.0, 11.0),
        stomach_gas=bool(rng.random() < 0.5),
        lut={int(k): float(v) for k, v in lut.items()},
        lung_gradient=u(0.0, 45.0),
        noise_hu=u(8.0, 30.0),
        blur_px=u(0.4, 0.9),
        signed=bool(rng.random() < 0.5),
        age=age,
        sex=sex,
        symptoms=symptoms,
        reader_label=0,
    )
    return spec
