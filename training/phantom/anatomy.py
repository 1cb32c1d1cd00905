"""Non-chest CT phantoms (head, abdomen, pelvis, knee) and random-noise volumes, written as real DICOM series.

They exist to test that the chest pipeline refuses what its models cannot judge. ``render_region(region, seed)``
is a pure function of its arguments; ``write_region`` writes CT Image Storage files (Explicit VR Little Endian,
one frame of reference, even spacing, instance 1 the most cranial slice) labelled "not for clinical use" like the
chest phantoms, with BodyPartExamined set truthfully unless ``body_part`` overrides it ("" or a lying "CHEST"
too), because the image check must hold when headers lie. Approximate HU: air -1000, fat -120…-80, CSF 0…15,
brain 24…45, muscle/organs 30…70, trabecular bone 150…400, cortical bone 1000…1800. Raises
:class:`~training.phantom.spec.PhantomError` for bad arguments or an unwritable folder.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from training.phantom.dicom import _BASE_DATE, _ds_value, _uid, phantom_header
from training.phantom.spec import GENERATOR_VERSION, NOT_FOR_CLINICAL_USE, PhantomError

REGIONS = ("head", "abdomen", "pelvis", "knee", "noise")
NOISE_MODES = ("uniform", "gaussian", "blobs")
# What BodyPartExamined says when it tells the truth (noise has no body part: the element is written empty).
TRUE_BODY_PART = {"head": "HEAD", "abdomen": "ABDOMEN", "pelvis": "PELVIS", "knee": "KNEE", "noise": ""}


@dataclass(frozen=True)
class RegionCase:
    """One rendered non-chest volume: int16 HU (slices, rows, cols), slices ascending feet → head."""

    region: str
    index: int
    hu: np.ndarray
    pixel_spacing: float
    slice_spacing: float
    z_start: float
    detail: str  # e.g. "lung bases" for an abdomen that shows them, the noise mode for noise

    @property
    def slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def rows(self) -> int:
        return int(self.hu.shape[1])


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers (X lateral, patient left positive; Y anterior → posterior; mm)
# ---------------------------------------------------------------------------------------------------------


def _ell(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, p: float = 2.0) -> np.ndarray:
    if a <= 0 or b <= 0:
        return np.zeros(x.shape, dtype=bool)
    return (np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p) < 1.0


def _rot_ell(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    dx, dy = x - cx, y - cy
    return _ell(c * dx + s * dy, -s * dx + c * dy, 0.0, 0.0, a, b)


class _Frame:
    """Pixel grid in mm, with the patient rotated and shifted in the field of view."""

    def __init__(self, rows: int, fov: float, rotation_deg: float, offset: tuple[float, float]):
        self.ps = fov / rows
        self.origin = -(rows - 1) / 2.0 * self.ps
        coords = (self.origin + np.arange(rows, dtype=np.float32) * self.ps).astype(np.float32)
        px, py = np.meshgrid(coords, coords)
        th = math.radians(rotation_deg)
        dx, dy = px - offset[0], py - offset[1]
        self.X = (math.cos(th) * dx + math.sin(th) * dy).astype(np.float32)
        self.Y = (-math.sin(th) * dx + math.cos(th) * dy).astype(np.float32)


def _table(hu: np.ndarray, f: _Frame, y_top: float, rng_hu: float) -> None:
    """A CT table under the patient: a thin dense shell over a foam core (real tables show both)."""
    depth = f.Y - (y_top + 0.0008 * f.X**2)  # mm below the table's curved top surface
    hu[(depth > 0.0) & (depth < 3.0) & (np.abs(f.X) < 220)] = rng_hu
    hu[(depth >= 3.0) & (depth < 18.0) & (np.abs(f.X) < 210)] = -880.0


def _spine(hu: np.ndarray, f: _Frame, cy: float, r: float, z: float, pitch: float, bone: float, marrow: float,
           soft: float) -> None:
    x, y = f.X, f.Y
    d = np.sqrt(x**2 + (y - cy) ** 2)
    if (z % pitch) < 5.0:
        hu[d < r] = soft  # intervertebral disc
    else:
        hu[d < r] = bone
        hu[d < r - 2.5] = marrow
    canal_y = cy + r + 9.0
    dc = np.sqrt(x**2 + (y - canal_y) ** 2)
    hu[(dc < 13.0) & (dc >= 8.0)] = bone
    hu[dc < 8.0] = soft
    hu[(np.abs(x) < 3.5) & (y > canal_y + 12.0) & (y < canal_y + 30.0)] = bone


# A region: field of view (mm), cranio-caudal length (mm), the slice painter (frame, t in 0..1, z mm) → HU, detail.
_Region = tuple[float, float, Callable[["_Frame", float, float], np.ndarray], str]

# ---------------------------------------------------------------------------------------------------------
# Regions: each draws its parameters from ``rng`` and returns (fov, length, slice painter, detail)
# ---------------------------------------------------------------------------------------------------------


def _head(rng: np.random.Generator) -> _Region:
    u = rng.uniform
    A, B = u(68.0, 80.0), u(86.0, 100.0)
    scalp, skull = u(4.0, 7.0), u(5.0, 9.0)
    t_wide, t_base = u(0.35, 0.5), u(0.18, 0.3)
    hu_scalp, hu_cort, hu_dipl = u(20.0, 50.0), u(1100.0, 1600.0), u(350.0, 700.0)
    hu_csf, hu_grey, hu_white = u(2.0, 12.0), u(34.0, 42.0), u(24.0, 30.0)
    vent = (u(7.0, 13.0), u(25.0, 35.0), u(6.0, 10.0))
    mastoid = rng.random((64, 64)) < 0.35  # air-cell pattern, sampled by position
    fov = u(220.0, 260.0)
    length = u(130.0, 190.0)

    def paint(f: _Frame, t: float, z: float) -> np.ndarray:
        x, y = f.X, f.Y
        hu = np.full(x.shape, -1000.0, dtype=np.float32)
        if t > t_wide:
            s = math.sqrt(max(0.0, 1.0 - ((t - t_wide) / (1.04 - t_wide)) ** 2))
        else:
            s = 1.0 - 0.12 * (t_wide - t) / t_wide
        s = max(s, 0.12)
        a, b = A * s, B * s
        _table(hu, f, B + 12.0, 150.0)
        hu[_ell(x, y, 0, 0, a + 6.0, b + 6.0) & (y > 0.3 * b)] = 60.0  # head-holder cradle
        hu[_ell(x, y, 0, 0, a + 3.0, b + 3.0) & (y > 0.3 * b)] = -900.0  # its foam pad
        hu[_ell(x, y, 0, 0, a, b)] = hu_scalp
        ao, bo = a - scalp, b - scalp
        hu[_ell(x, y, 0, 0, ao, bo)] = hu_cort
        hu[_ell(x, y, 0, 0, ao - 1.5, bo - 1.5)] = hu_dipl
        hu[_ell(x, y, 0, 0, ao - skull + 1.5, bo - skull + 1.5)] = hu_cort
        ai, bi = ao - skull, bo - skull
        inner = _ell(x, y, 0, 0, ai, bi)
        hu[inner] = hu_csf
        hu[_ell(x, y, 0, 0, ai - 2.0, bi - 2.0)] = hu_grey
        if 0.3 < t < 0.9:
            hu[_ell(x, y, 0, 0, 0.72 * ai, 0.75 * bi)] = hu_white
        if 0.45 < t < 0.75:
            for side in (-1.0, 1.0):
                hu[_ell(x, y, side * vent[0], 0.0, vent[2], vent[1])] = hu_csf
        hu[inner & (np.abs(x) < 1.0) & (y < -0.2 * bi)] = 75.0  # falx
        if t < t_base:  # skull base and face: petrous bone, mastoid air, sphenoid, orbits, maxillary sinuses
            for side in (-1.0, 1.0):
                hu[_rot_ell(x, y, side * 0.42 * ai, 0.1 * bi, 0.38 * ai, 7.0, side * 35.0)] = hu_cort + 200.0
                cells = _ell(x, y, side * 0.7 * ai, 0.3 * bi, 0.18 * ai, 0.14 * bi)
                ix = np.clip(((x + 200.0) / 400.0 * 64).astype(int), 0, 63)
                iy = np.clip(((y + 200.0) / 400.0 * 64).astype(int), 0, 63)
                hu[cells] = hu_dipl
                hu[cells & mastoid[iy, ix]] = -1000.0
            hu[_ell(x, y, 0, 0.25 * bi, 5.0, 0.3 * bi)] = hu_cort  # clivus
            if t > t_base - 0.12:
                hu[_ell(x, y, 0, -0.3 * bi, 14.0, 10.0)] = -1000.0  # sphenoid sinus
                for side in (-1.0, 1.0):
                    hu[_ell(x, y, side * 0.38 * a, -0.7 * b, 18.0, 16.0)] = -80.0  # orbital fat
                    hu[_ell(x, y, side * 0.38 * a, -0.72 * b, 11.5, 11.5)] = 12.0  # globe
            else:
                hu[(np.abs(x) < 6.0) & (y > -0.95 * b) & (y < -0.5 * b)] = -1000.0  # nasal cavity
                for side in (-1.0, 1.0):
                    hu[_ell(x, y, side * 0.3 * a, -0.6 * b, 17.0, 20.0)] = hu_cort
                    hu[_ell(x, y, side * 0.3 * a, -0.6 * b, 15.0, 18.0)] = -1000.0  # maxillary sinus
        return hu

    return fov, length, paint, "head"


def _abdomen(rng: np.random.Generator, lung_bases: bool | None) -> _Region:  # noqa: C901 - its painter, below
    u = rng.uniform
    a = u(135.0, 180.0)
    b = a * u(0.68, 0.82)
    fat, muscle = u(10.0, 40.0), u(8.0, 15.0)
    ac, bc = a - fat - muscle, b - fat - muscle
    spine_r, pitch = u(16.0, 22.0), u(28.0, 34.0)
    spine_y = bc - 1.2 * spine_r
    contrast = rng.random() < 0.5
    hu_fat, hu_mus = u(-120.0, -80.0), u(40.0, 60.0)
    hu_liver = u(50.0, 70.0) + (50.0 if contrast else 0.0)
    hu_spleen = u(40.0, 55.0) + (60.0 if contrast else 0.0)
    hu_kid = u(150.0, 200.0) if contrast else u(30.0, 40.0)
    hu_blood = u(150.0, 250.0) if contrast else u(35.0, 50.0)
    t_liver, t_kid = u(0.3, 0.5), u(0.15, 0.3)
    loops = [(u(-0.7, 0.7) * ac, u(-0.8, 0.2) * bc, u(0.0, 1.0), u(8.0, 18.0), rng.random()) for _ in range(int(rng.integers(15, 40)))]
    if lung_bases is None:
        lung_bases = bool(rng.random() < 0.6)
    fov = min(500.0, 2 * a + u(40.0, 110.0))
    length = u(200.0, 300.0)
    lb_height = u(20.0, 60.0)  # mm of lung bases at the top of the series
    hu_lung = u(-880.0, -830.0)
    u_stomach, u_bone, u_marrow = u(10.0, 30.0), u(900.0, 1300.0), u(180.0, 300.0)

    def paint(f: _Frame, t: float, z: float) -> np.ndarray:  # noqa: C901 - organ layers painted in order, each behind its own condition
        x, y = f.X, f.Y
        hu = np.full(x.shape, -1000.0, dtype=np.float32)
        _table(hu, f, b + 8.0, 250.0)
        hu[_ell(x, y, 0, 0, a, b, 2.2)] = hu_fat
        hu[_ell(x, y, 0, 0, a - fat, b - fat, 2.2)] = hu_mus
        cavity = _ell(x, y, 0, 0, ac, bc, 2.3)
        hu[cavity] = hu_fat + 10.0
        for side in (-1.0, 1.0):  # paraspinal muscles
            hu[_ell(x, y, side * 32.0, spine_y + 38.0, 26.0, 20.0)] = hu_mus
        if t > t_liver:
            g = math.sqrt((t - t_liver) / (1.0 - t_liver))
            hu[cavity & _ell(x, y, -0.35 * ac, -0.05 * bc, 0.65 * ac * g + 10, 0.85 * bc * g + 10)] = hu_liver
        if t > 0.55:
            hu[cavity & _ell(x, y, 0.6 * ac, 0.35 * bc, 40.0, 60.0)] = hu_spleen
            sx, sy = 0.3 * ac, -0.4 * bc
            hu[cavity & _ell(x, y, sx, sy, 50.0, 40.0)] = u_stomach
            hu[cavity & _ell(x, y, sx, sy, 46.0, 36.0) & (y < sy - 12.0)] = -1000.0  # gas above the fluid level
        if t_kid < t < t_kid + 0.45:
            for side in (-1.0, 1.0):
                kx = side * (spine_r + 42.0)
                hu[_rot_ell(x, y, kx, spine_y - 5.0, 28.0, 45.0, side * 20.0)] = hu_kid
                hu[_ell(x, y, kx - side * 8.0, spine_y - 8.0, 9.0, 14.0)] = -90.0  # renal sinus fat
        if t < 0.7:
            for side in (-1.0, 1.0):  # psoas
                r = 12.0 + 18.0 * (0.7 - t)
                hu[_ell(x, y, side * (spine_r + 12.0 + r * 0.5), spine_y - 4.0, r, r * 0.9)] = hu_mus
        for lx, ly, lt, lr, kind in loops:  # bowel loops: fluid, gas, or mottled stool with gas
            dz = (t - lt) * length
            if abs(dz) < lr:
                rr = math.sqrt(lr * lr - dz * dz)
                m = cavity & _ell(x, y, lx, ly, rr, rr)
                hu[m] = hu_mus
                inner = cavity & _ell(x, y, lx, ly, rr - 2.0, rr - 2.0)
                hu[inner] = 20.0 if kind < 0.45 else (-1000.0 if kind < 0.75 else 30.0)
                if kind >= 0.75:
                    hu[inner & (np.sin(x * 0.9) * np.sin(y * 0.8) > 0.6)] = -1000.0
        for side in (-1.0, 1.0):  # ascending / descending colon with gas
            m = cavity & _ell(x, y, side * 0.78 * ac, -0.1 * bc, 20.0, 20.0)
            hu[m] = hu_mus
            hu[cavity & _ell(x, y, side * 0.78 * ac, -0.1 * bc, 16.0, 16.0)] = -1000.0 if (z // 25) % 2 else 25.0
        hu[_ell(x, y, 0.12 * ac, spine_y - spine_r - 14.0, 11.0, 11.0)] = hu_blood  # aorta
        hu[_ell(x, y, -0.12 * ac, spine_y - spine_r - 16.0, 13.0, 9.0)] = hu_blood - 10.0  # IVC
        _spine(hu, f, spine_y, spine_r, z, pitch, u_bone, u_marrow, hu_mus)
        if lung_bases and (1.0 - t) * length < lb_height:
            fr = 1.0 - (1.0 - t) * length / lb_height  # 0 at the lowest lung slice, 1 at the top
            w = 8.0 + 45.0 * fr
            crescent = cavity & ~_ell(x, y, 0, -0.1 * bc, ac - w, bc - w, 2.3) & (y > -0.3 * bc)
            crescent &= np.abs(x) > spine_r + 12.0
            hu[crescent] = hu_lung
        return hu

    return fov, length, paint, "lung bases" if lung_bases else "abdomen"


def _pelvis(rng: np.random.Generator) -> _Region:
    u = rng.uniform
    a = u(150.0, 190.0)
    b = a * u(0.62, 0.75)
    fat, muscle = u(12.0, 40.0), u(10.0, 18.0)
    ac, bc = a - fat - muscle, b - fat - muscle
    hu_fat, hu_mus = u(-120.0, -80.0), u(40.0, 60.0)
    hu_cort, hu_trab, hu_yellow = u(1000.0, 1500.0), u(150.0, 300.0), u(-90.0, -30.0)
    hu_urine = u(0.0, 15.0)
    rect_gas = rng.random() < 0.6
    head_r = u(22.0, 26.0)
    fov = min(500.0, 2 * a + u(40.0, 100.0))
    length = u(150.0, 220.0)

    def paint(f: _Frame, t: float, z: float) -> np.ndarray:
        x, y = f.X, f.Y
        hu = np.full(x.shape, -1000.0, dtype=np.float32)
        _table(hu, f, b + 8.0, 250.0)
        hu[_ell(x, y, 0, 0, a, b, 2.2)] = hu_fat
        hu[_ell(x, y, 0, 0, a - fat, b - fat, 2.2)] = hu_mus
        cavity = _ell(x, y, 0, -0.15 * bc, 0.55 * ac, 0.6 * bc, 2.2)
        hu[cavity] = hu_fat + 15.0
        for side in (-1.0, 1.0):
            hu[_ell(x, y, side * 0.55 * ac, 0.55 * bc, 0.4 * ac, 0.35 * bc)] = hu_mus  # gluteal muscles
            if t > 0.55:  # iliac wing
                wing = _rot_ell(x, y, side * 0.55 * ac, 0.15 * bc, 9.0, 0.45 * bc, -side * 30.0)
                hu[wing] = hu_cort
                hu[_rot_ell(x, y, side * 0.55 * ac, 0.15 * bc, 5.0, 0.45 * bc - 4.0, -side * 30.0)] = hu_trab
            elif t > 0.15:  # acetabulum and femoral head
                cx = side * 0.62 * ac
                hu[_ell(x, y, cx, 0.0, head_r + 8.0, head_r + 8.0)] = hu_cort
                hu[_ell(x, y, cx, 0.0, head_r + 1.5, head_r + 1.5)] = 40.0  # joint space
                hu[_ell(x, y, cx, 0.0, head_r, head_r)] = hu_cort
                hu[_ell(x, y, cx, 0.0, head_r - 3.0, head_r - 3.0)] = hu_trab
            else:  # femoral shaft with the greater trochanter
                cx = side * 0.66 * ac
                hu[_ell(x, y, cx, 0.0, 16.0, 16.0)] = hu_cort
                hu[_ell(x, y, cx, 0.0, 10.0, 10.0)] = hu_yellow
                if t > 0.06:
                    hu[_ell(x, y, cx + side * 18.0, 4.0, 14.0, 16.0)] = hu_trab
        if t > 0.4:  # sacrum
            hu[_ell(x, y, 0, 0.6 * bc, 45.0, 22.0)] = hu_cort
            hu[_ell(x, y, 0, 0.6 * bc, 42.0, 19.0)] = hu_trab
            hu[_ell(x, y, 0, 0.6 * bc + 8.0, 10.0, 6.0)] = hu_mus
        if 0.15 < t < 0.55:  # bladder
            g = math.sin(math.pi * (t - 0.15) / 0.4)
            hu[_ell(x, y, 0, -0.4 * bc, 55.0 * g + 5, 40.0 * g + 5)] = hu_urine
        hu[_ell(x, y, 0, 0.3 * bc, 18.0, 16.0)] = hu_mus  # rectum
        if rect_gas:
            hu[_ell(x, y, 0, 0.3 * bc, 12.0, 10.0)] = -1000.0
        if t > 0.6:
            for k in range(4):  # small-bowel / sigmoid loops, one with gas
                lx, ly = (-0.3 + 0.2 * k) * ac, -0.45 * bc
                hu[_ell(x, y, lx, ly, 14.0, 14.0)] = hu_mus
                hu[_ell(x, y, lx, ly, 11.0, 11.0)] = -1000.0 if k == 1 else 20.0
        return hu

    return fov, length, paint, "pelvis"


def _knee(rng: np.random.Generator) -> _Region:
    u = rng.uniform
    two = rng.random() < 0.7
    R = u(55.0, 80.0)
    Rk = R * u(0.65, 0.8)
    sep = (2 * R + u(10.0, 60.0)) / 2 if two else 0.0
    fat = u(5.0, 20.0)
    hu_fat, hu_mus = u(-120.0, -80.0), u(40.0, 60.0)
    hu_cort, hu_trab, hu_yellow = u(1300.0, 1800.0), u(200.0, 400.0), u(-90.0, -30.0)
    fov = (4 * sep if two else 2 * R) + u(60.0, 120.0)
    length = u(200.0, 320.0)

    def paint(f: _Frame, t: float, z: float) -> np.ndarray:
        x, y = f.X, f.Y
        hu = np.full(x.shape, -1000.0, dtype=np.float32)
        _table(hu, f, R + 10.0, 250.0)
        r = Rk + (R - Rk) * max(0.0, (t - 0.35) / 0.65)
        for cx in ((-sep, sep) if two else (0.0,)):
            hu[_ell(x, y, cx, 0, r, 0.92 * r)] = hu_fat
            hu[_ell(x, y, cx, 0, r - fat, 0.92 * r - fat)] = hu_mus
            hu[_ell(x, y, cx, 0, r - fat, 0.92 * r - fat) & (np.abs(y + 0.4 * (x - cx)) < 1.0)] = hu_fat  # septum
            hu[_ell(x, y, cx, 0.55 * r, 5.0, 5.0)] = 45.0  # popliteal vessels
            if t > 0.35:  # femoral shaft
                hu[_ell(x, y, cx, -0.05 * r, 14.0, 14.0)] = hu_cort
                hu[_ell(x, y, cx, -0.05 * r, 9.0, 9.0)] = hu_yellow
            elif t > 0.17:  # condyles, patella in front
                w = 14.0 + (0.35 - t) / 0.18 * 26.0
                hu[_ell(x, y, cx, 0.0, w, 0.75 * w)] = hu_cort
                hu[_ell(x, y, cx, 0.0, w - 1.5, 0.75 * w - 1.5)] = hu_trab
                if t > 0.25:
                    hu[_ell(x, y, cx, -0.72 * r, 20.0, 10.0)] = hu_cort
                    hu[_ell(x, y, cx, -0.72 * r, 18.0, 8.0)] = hu_trab
            elif t < 0.15:  # tibial plateau, fibular head
                hu[_ell(x, y, cx, 0.0, 38.0, 28.0)] = hu_cort
                hu[_ell(x, y, cx, 0.0, 36.5, 26.5)] = hu_trab
                if t < 0.1:
                    hu[_ell(x, y, cx + (1 if cx >= 0 else -1) * 30.0, 15.0, 9.0, 9.0)] = hu_trab
        return hu

    return fov, length, paint, "two knees" if two else "one knee"


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    if mode == "uniform":
        return rng.uniform(-1024.0, 3071.0, shape).astype(np.float32)
    if mode == "gaussian":
        return rng.normal(rng.uniform(-500.0, 500.0), rng.uniform(200.0, 1000.0), shape).astype(np.float32)
    sigma = rng.uniform(1.5, 6.0)
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.5, sigma, sigma))
    return (n / (n.std() + 1e-6) * rng.uniform(400.0, 900.0) + rng.uniform(-300.0, 200.0)).astype(np.float32)


def render_region(region: str, seed: int, index: int = 0, *, size: int = 256, slices: int = 40,
                  noise_mode: str | None = None, lung_bases: bool | None = None) -> RegionCase:
    """Render case ``index`` of ``region`` (one of :data:`REGIONS`). ``noise_mode`` (noise only) and
    ``lung_bases`` (abdomen only) are drawn from the seed when None. Raises PhantomError for bad arguments."""
    if region not in REGIONS:
        raise PhantomError(f"region must be one of {REGIONS}, got {region!r}")
    if size < 32:
        raise PhantomError(f"size must be >= 32 px, got {size}")
    if slices < 2:
        raise PhantomError(f"slices must be >= 2, got {slices}")
    if noise_mode is not None and noise_mode not in NOISE_MODES:
        raise PhantomError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    rng = np.random.default_rng([seed, index, REGIONS.index(region), 0xA7A7])
    z_start = round(-float(rng.uniform(100.0, 900.0)), 2)
    if region == "noise":
        mode = noise_mode or str(rng.choice(NOISE_MODES))
        length = float(rng.uniform(150.0, 300.0))
        hu = _noise(rng, (slices, size, size), mode)
        np.clip(np.rint(hu), -1024, 3071, out=hu)
        return RegionCase(region, index, hu.astype(np.int16), round(float(rng.uniform(250.0, 500.0)) / size, 4),
                          round(length / slices, 3), z_start, mode)
    if region == "head":
        fov, length, paint, detail = _head(rng)
    elif region == "abdomen":
        fov, length, paint, detail = _abdomen(rng, lung_bases)
    elif region == "pelvis":
        fov, length, paint, detail = _pelvis(rng)
    else:
        fov, length, paint, detail = _knee(rng)
    pixel_spacing, slice_spacing = round(fov / size, 4), round(length / slices, 3)
    frame = _Frame(size, pixel_spacing * size, float(rng.uniform(-8.0, 8.0)),
                   (float(rng.uniform(-12.0, 12.0)), float(rng.uniform(-15.0, 15.0))))
    noise_hu, blur_px = float(rng.uniform(8.0, 30.0)), float(rng.uniform(0.4, 0.9))
    noise_scale = noise_hu / (0.5 / (math.sqrt(math.pi) * 0.6))  # sigma after the 0.6 px filter, as render.py
    out = np.empty((slices, size, size), dtype=np.int16)
    for k in range(slices):
        t = (k + 0.5) / slices
        img = paint(frame, t, z_start + k * slice_spacing)
        img = ndimage.gaussian_filter(img, blur_px, mode="nearest")
        img += ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), 0.6) * noise_scale
        np.clip(np.rint(img), -1024, 3071, out=img)
        out[k] = img.astype(np.int16)
    return RegionCase(region, index, out, pixel_spacing, slice_spacing, z_start, detail)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_region(case: RegionCase, seed: int, out_dir: str | Path, *, body_part: str | None = None) -> list[Path]:
    """Write ``case`` as CT Image Storage files ``IM0001.dcm`` … (instance 1 the most cranial); return the paths in
    ascending slice position. ``body_part`` None writes the truthful BodyPartExamined, any string (even "" or a
    lying "CHEST") is written as given. Raises PhantomError when the folder cannot be written."""
    out_dir = Path(out_dir)
    tag = (seed, "anatomy", case.region, case.index)
    study_uid, series_uid, for_uid = (_uid(*tag, kind) for kind in ("study", "series", "frame-of-reference"))
    da = (_BASE_DATE + _dt.timedelta(days=(case.index * 11 + seed) % 365)).strftime("%Y%m%d")
    origin = -(case.rows - 1) / 2.0 * case.pixel_spacing
    part = TRUE_BODY_PART[case.region] if body_part is None else body_part
    name = f"{case.region.upper()}{case.index + 1:04d}"
    n = case.slices
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            inst = n - k
            z = case.z_start + k * case.slice_spacing
            sop_uid = _uid(*tag, "sop", inst)
            ds = phantom_header(
                sop_uid, date=da, time="100000", accession=f"PA{seed % 10000:04d}{case.index + 1:04d}",
                study_description="SYNTHETIC CT PHANTOM - NOT FOR CLINICAL USE",
                model_name="training.phantom.anatomy", case_name=name, seed=seed,
            )
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.BodyPartExamined = part
            ds.SliceThickness = _ds_value(case.slice_spacing)
            ds.KVP = "120"
            ds.SoftwareVersions = f"training.phantom {GENERATOR_VERSION}"
            ds.ReconstructionDiameter = _ds_value(case.rows * case.pixel_spacing)
            ds.GantryDetectorTilt = "0"
            ds.PatientPosition = "FFS" if case.region == "knee" else "HFS"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = f"{case.index + 1}"
            ds.SeriesNumber = 3
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = inst
            ds.ImagePositionPatient = [_ds_value(origin), _ds_value(origin), _ds_value(z)]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds_value(z)
            ds.ImagesInAcquisition = n
            ds.ImageComments = f"{NOT_FOR_CLINICAL_USE}: generated by pacs-ai-node training.phantom.anatomy"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = case.rows
            ds.PixelSpacing = [_ds_value(case.pixel_spacing)] * 2
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.SpacingBetweenSlices = _ds_value(case.slice_spacing)
            ds.PixelData = case.hu[k].astype("<i2").tobytes()
            ds["PixelData"].VR = "OW"
            path = out_dir / f"IM{inst:04d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
    except OSError as exc:
        raise PhantomError(f"cannot write phantom series to {out_dir}: {exc.strerror or exc}") from exc
    return paths


def generate_region(out_dir: str | Path, region: str, seed: int, index: int = 0, *, size: int = 256,
                    slices: int = 40, body_part: str | None = None, noise_mode: str | None = None,
                    lung_bases: bool | None = None) -> list[Path]:
    """Render and write one non-chest series under ``out_dir``; return its files in ascending slice position."""
    case = render_region(region, seed, index, size=size, slices=slices, noise_mode=noise_mode, lung_bases=lung_bases)
    return write_region(case, seed, out_dir, body_part=body_part)
