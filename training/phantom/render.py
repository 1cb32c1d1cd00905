"""Rendering a phantom case: anatomy slice by slice, the pulmonary vessel tree, nodules, lesions, scanner blur
and noise. ``render_case(spec, seed)`` is a pure function of its arguments (vectorised numpy)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from training.phantom.spec import CaseResult, CaseSpec, Lesion, Tissue

# ---------------------------------------------------------------------------------------------------------
# Geometry (vectorised; X, Y in mm in the body frame, t in 0..1 feet → head)
# ---------------------------------------------------------------------------------------------------------


def _superellipse(
    x: np.ndarray, y: np.ndarray, a: float | np.ndarray, b: float | np.ndarray, p: float,
    cx: float = 0.0, cy: float = 0.0, g: _Grid | None = None,
) -> np.ndarray:
    """|(x-cx)/a|^p + |(y-cy)/b|^p; with a grid, the t-invariant powers come from its cache (fractional
    powers dominate the rendering time otherwise)."""
    if g is not None:
        return g.abs_pow("X", cx, p) * np.float32(float(a) ** -p) + g.abs_pow("Y", cy, p) * np.float32(float(b) ** -p)
    return np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p


def _body_axes(s: CaseSpec, t: float) -> tuple[float, float]:
    taper = 1.0 - 0.16 * max(0.0, t - 0.72) / 0.28
    return s.body_a * taper, s.body_b * (1.0 - 0.05 * max(0.0, t - 0.72) / 0.28)


def _lung_scale(s: CaseSpec, t: np.ndarray | float) -> np.ndarray:
    t_mid = 0.5
    frac = np.clip((np.asarray(t) - t_mid) / (s.t_apex - t_mid), 0.0, None)
    return np.sqrt(np.clip(1.0 - frac**2, 0.0, 1.0))


def _heart(s: CaseSpec, x: np.ndarray, y: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    hx, hy, ht, hax, hay, hat = s.heart
    return (
        ((x - hx * s.body_a) / (hax * s.body_a)) ** 2
        + ((y - hy * s.body_b) / (hay * s.body_b)) ** 2
        + ((np.asarray(t) - ht) / hat) ** 2
    ) < 1.0


def _lung_field(
    s: CaseSpec, x: np.ndarray, y: np.ndarray, t: np.ndarray | float, g: _Grid | None = None
) -> np.ndarray:
    """Lung fields (parenchyma + intrapulmonary vessels) at body-frame points (``g``: x, y are its pixels)."""
    t_arr = np.asarray(t, dtype=np.float32)
    a, b = s.body_a, s.body_b
    inner_a = a - s.fat_mm - s.muscle_mm - 4.0
    inner_b = b - s.fat_mm - s.muscle_mm - 4.0
    inside_cage = _superellipse(x, y, inner_a, inner_b, 2.3, g=g) < 1.0
    sc = np.maximum(_lung_scale(s, t_arr), 1e-3)
    out = np.zeros(np.broadcast(x, y, t_arr).shape, dtype=bool)
    mediastinum = 0.10 * a + 0.05 * a * (t_arr < s.t_carina)
    for side, t_dia in ((-1.0, s.t_dia[0]), (1.0, s.t_dia[1])):
        cx, cy = side * s.lung_cx * a, s.lung_cy * b
        ax, ay = s.lung_ax * a, s.lung_ay * b
        r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        above_diaphragm = t_arr > t_dia - s.dome * np.clip(r2, 0.0, 1.5)
        shape = _superellipse(x, y, ax * sc, ay * sc, 2.4, cx, cy, g=g) < 1.0
        out |= shape & above_diaphragm & (side * x > mediastinum)
    out &= inside_cage & ~_heart(s, x, y, t_arr)
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


class _Grid:
    """Pixel ↔ body-frame transform of one case (rotation + offset of the patient in the field of view)."""

    def __init__(self, s: CaseSpec):
        n = s.rows
        self.ps = s.pixel_spacing
        self.origin = -(n - 1) / 2.0 * self.ps  # x and y of pixel (0, 0) in patient coordinates
        coords = (self.origin + np.arange(n, dtype=np.float32) * self.ps).astype(np.float32)
        px, py = np.meshgrid(coords, coords)  # px varies along columns, py along rows
        th = math.radians(s.rotation_deg)
        self.c, self.sn = math.cos(th), math.sin(th)
        self.ox, self.oy = s.offset_mm
        dx, dy = px - self.ox, py - self.oy
        self.X = (self.c * dx + self.sn * dy).astype(np.float32)
        self.Y = (-self.sn * dx + self.c * dy).astype(np.float32)
        self.z = s.z_start + np.arange(s.slices) * s.slice_spacing
        self.length = s.slices * s.slice_spacing
        self.t = (self.z - self.z[0] + 0.5 * s.slice_spacing) / self.length

        self._pow: dict[tuple[str, float, float], np.ndarray] = {}

    def abs_pow(self, axis: str, shift: float, p: float) -> np.ndarray:
        """|X - shift|^p (or Y), cached."""
        key = (axis, shift, p)
        if key not in self._pow:
            base = self.X if axis == "X" else self.Y
            self._pow[key] = np.abs(base - np.float32(shift)) ** np.float32(p)
        return self._pow[key]

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Body-frame mm → (row, col) in pixels (float)."""
        px = self.c * x - self.sn * y + self.ox
        py = self.sn * x + self.c * y + self.oy
        return (py - self.origin) / self.ps, (px - self.origin) / self.ps

    def z_of_t(self, t: float) -> float:
        return float(self.z[0] - 0.5 * (self.z[1] - self.z[0] if len(self.z) > 1 else 0.0) + t * self.length)


def _render_slice(s: CaseSpec, g: _Grid, t: float, z: float) -> np.ndarray:
    x, y = g.X, g.Y
    a_t, b_t = _body_axes(s, t)
    lab = np.zeros(x.shape, dtype=np.uint8)
    body = _superellipse(x, y, a_t, b_t, 2.2, g=g) < 1.0
    lab[body] = Tissue.FAT
    ma, mb = a_t - s.fat_mm, b_t - s.fat_mm
    lab[_superellipse(x, y, ma, mb, 2.2, g=g) < 1.0] = Tissue.SOFT
    ca, cb = ma - s.muscle_mm, mb - s.muscle_mm
    cavity = _superellipse(x, y, ca, cb, 2.3, g=g) < 1.0
    lab[cavity] = Tissue.FAT
    # Below the diaphragm: liver on the right, soft tissue (spleen, stomach) on the left.
    dia = max(s.t_dia) + 0.02
    if t < dia:
        abdomen = cavity  # the lungs, drawn next, take the part above the domes
        lab[abdomen & (x < 0.25 * s.body_a)] = Tissue.LIVER
        lab[abdomen & (x >= 0.25 * s.body_a)] = Tissue.SOFT
        if s.stomach_gas:
            gas = ((x - 0.45 * s.body_a) / 35.0) ** 2 + ((y + 0.35 * s.body_b) / 20.0) ** 2 + (
                (t - (s.t_dia[1] - 0.08)) / 0.04
            ) ** 2 < 1.0
            lab[gas & cavity] = Tissue.AIRWAY
    # Mediastinal soft tissue band in front of the spine.
    lab[cavity & (np.abs(x) < 0.14 * s.body_a) & (y > -0.5 * s.body_b)] = Tissue.SOFT
    lungs = _lung_field(s, x, y, t, g)
    lab[lungs] = Tissue.LUNG
    lab[_heart(s, x, y, t) & cavity] = Tissue.VESSEL
    # Aorta: descending left of the spine, ascending anterior, the arch joining them.
    spine_y = cb - 0.5 * s.spine_r  # vertebral body bulges into the posterior chest wall
    t_arch = s.t_carina + 0.08
    desc = ((x - 0.22 * s.body_a) ** 2 + (y - spine_y + 0.5 * s.spine_r) ** 2) < s.aorta_r**2
    if t < t_arch:
        lab[desc] = Tissue.VESSEL
    if s.heart[2] < t < t_arch:
        lab[((x + 0.02 * s.body_a) ** 2 + (y + 0.18 * s.body_b) ** 2) < (s.aorta_r * 1.15) ** 2] = Tissue.VESSEL
    if abs(t - t_arch) < 0.025:
        arch = (np.abs(y - 0.5 * (spine_y - 0.18 * s.body_b)) < 0.5 * (spine_y + 0.18 * s.body_b)) & (
            np.abs(x - 0.1 * s.body_a) < s.aorta_r
        )
        lab[arch & cavity] = Tissue.VESSEL
    # Trachea above the carina, main bronchi below it (walls are soft tissue).
    ty = spine_y - s.spine_r - s.trachea_r - 12.0
    centres: list[tuple[float, float, float]] = []
    if t >= s.t_carina:
        centres.append((0.0, ty, s.trachea_r))
    elif t > s.t_carina - 0.12:
        f = (s.t_carina - t) / 0.12
        for side in (-1.0, 1.0):
            centres.append((side * (0.06 + 0.22 * f) * s.body_a, ty + 4.0 * f, s.trachea_r * 0.72))
    for cx, cy, r in centres:
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        lab[(d2 < (r + 2.0) ** 2) & cavity] = Tissue.SOFT
        lab[(d2 < r**2) & cavity] = Tissue.AIRWAY
    # Spine: vertebral body (cortical shell, marrow; discs between bodies), canal, posterior elements.
    r_v = s.spine_r
    d_v = np.sqrt(x**2 + (y - spine_y) ** 2)
    in_disc = ((z - s.rib_phase) % s.disc_pitch) < 5.0
    if in_disc:
        lab[d_v < r_v] = Tissue.SOFT
    else:
        lab[d_v < r_v] = Tissue.BONE
        lab[d_v < r_v - 2.5] = Tissue.MARROW
    canal_y = spine_y + r_v + 9.0
    d_c = np.sqrt(x**2 + (y - canal_y) ** 2)
    lab[(d_c < 13.0) & (d_c >= 8.0) & body] = Tissue.BONE
    lab[d_c < 8.0] = Tissue.SOFT
    lab[(np.abs(x) < 3.5) & (y > canal_y + 12.0) & (y < canal_y + 32.0) & body] = Tissue.BONE
    # Ribs: a ring just inside the muscle, present in oblique bands (posterior end higher than anterior).
    ra, rb = ca + 3.0, cb + 3.0
    rho = np.sqrt((x / ra) ** 2 + (y / rb) ** 2)
    ring = np.abs(rho - 1.0) * 0.5 * (ra + rb) < 4.5
    phase = (z + s.rib_slope * (y / rb) - s.rib_phase) % s.rib_pitch
    ribs = ring & (phase < 11.0) & ~((y < -0.55 * rb) & (np.abs(x) < 0.35 * ra)) & (t > 0.05)
    lab[ribs] = Tissue.BONE
    # Sternum: anterior midline.
    if s.heart[2] - 0.1 < t < 0.9:
        sternum = ((x / 16.0) ** 2 + ((y + cb - 2.0) / 7.0) ** 2) < 1.0
        lab[sternum] = Tissue.BONE
        lab[((x / 12.0) ** 2 + ((y + cb - 2.0) / 4.0) ** 2) < 1.0] = Tissue.MARROW
    return lab


def _segments_to_lung(s: CaseSpec, rng: np.random.Generator, g: _Grid) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A branching pulmonary vessel tree per lung: (start, end, r_start, r_end) in body-frame mm."""
    segs: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    z_of_t = g.z_of_t
    t_hilum = s.t_carina - 0.1
    # Candidate points inside the lungs for branch targets.
    n_cand = 3000
    cx = rng.uniform(-s.body_a, s.body_a, n_cand).astype(np.float32)
    cy = rng.uniform(-s.body_b, s.body_b, n_cand).astype(np.float32)
    ct = rng.uniform(0.0, 1.0, n_cand).astype(np.float32)
    inside = _lung_field(s, cx, cy, ct)
    pts = np.stack([cx[inside], cy[inside], np.array([z_of_t(float(v)) for v in ct[inside]])], axis=1)
    if len(pts) < 10:
        return segs
    for side in (-1.0, 1.0):
        side_pts = pts[np.sign(pts[:, 0]) == side]
        if len(side_pts) < 5:
            continue
        hilum = np.array([side * 0.2 * s.body_a, 0.08 * s.body_b, z_of_t(t_hilum)])

        def grow(start: np.ndarray, direction: np.ndarray, radius: float, depth: int, pool: np.ndarray) -> None:
            vecs = pool - start
            dist = np.linalg.norm(vecs, axis=1) + 1e-6
            score = (vecs @ direction) / dist
            ok = np.flatnonzero((score > 0.55) & (dist > 15.0))
            if len(ok) == 0:
                return
            target = pool[rng.choice(ok)]
            frac = 0.45 if depth > 0 else 1.0
            end = start + frac * (target - start)
            r_end = radius * 0.7
            segs.append((start, end, radius, r_end))
            if depth > 0:
                d = (end - start) / (np.linalg.norm(end - start) + 1e-6)
                for _ in range(2):
                    jitter = rng.normal(0.0, 0.45, 3)
                    nd = d + jitter
                    grow(end, nd / np.linalg.norm(nd), r_end, depth - 1, pool)

        for direction in ((side * 0.3, 0.0, 1.0), (side * 1.0, -0.2, 0.0), (side * 0.5, 0.3, -1.0), (side, 0.6, -0.4)):
            dv = np.asarray(direction, dtype=float)
            grow(hilum, dv / np.linalg.norm(dv), rng.uniform(4.0, 6.0), 3, side_pts)
    return segs


def _paint_capsules(
    tissue: np.ndarray, lungs: np.ndarray, g: _Grid, segs: Iterable[tuple[np.ndarray, np.ndarray, float, float]]
) -> None:
    """Paint vessel segments (capsules) as VESSEL where they run inside the lung fields."""
    n = tissue.shape[1]
    dz = g.z[1] - g.z[0] if len(g.z) > 1 else 1.0
    for a, b, ra, rb in segs:
        rmax = max(ra, rb)
        zlo, zhi = min(a[2], b[2]) - rmax, max(a[2], b[2]) + rmax
        k0 = max(0, int(math.floor((zlo - g.z[0]) / dz)))
        k1 = min(len(g.z) - 1, int(math.ceil((zhi - g.z[0]) / dz)))
        if k1 < k0:
            continue
        (r0, c0), (r1, c1) = g.to_pixel(a[0], a[1]), g.to_pixel(b[0], b[1])
        pad = rmax / g.ps + 2
        i0, i1 = max(0, int(min(r0, r1) - pad)), min(n, int(max(r0, r1) + pad) + 1)
        j0, j1 = max(0, int(min(c0, c1) - pad)), min(n, int(max(c0, c1) + pad) + 1)
        if i1 <= i0 or j1 <= j0:
            continue
        X = g.X[i0:i1, j0:j1]
        Y = g.Y[i0:i1, j0:j1]
        ab = b - a
        denom = float(ab @ ab) + 1e-9
        for k in range(k0, k1 + 1):
            z = g.z[k]
            u = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom, 0.0, 1.0)
            d2 = (X - a[0] - u * ab[0]) ** 2 + (Y - a[1] - u * ab[1]) ** 2 + (z - a[2] - u * ab[2]) ** 2
            r = ra + (rb - ra) * u
            hit = (d2 < r * r) & lungs[k, i0:i1, j0:j1]
            tissue[k, i0:i1, j0:j1][hit] = Tissue.VESSEL


def _draw_lesions(s: CaseSpec, rng: np.random.Generator, g: _Grid, lungs: np.ndarray) -> list[Lesion]:
    idx = np.flatnonzero(lungs)
    if len(idx) == 0:
        return []
    subtle_case = rng.random() < 0.2
    n = 1 if subtle_case else int(min(6, 1 + rng.poisson(1.3)))
    lesions = []
    for _ in range(n):
        # Pneumonia favours dependent (posterior) lung: take the most posterior of a few candidates half the time.
        cand = rng.choice(idx, size=4)
        ks, is_, js = np.unravel_index(cand, lungs.shape)
        pick = int(np.argmax(g.Y[is_, js])) if rng.random() < 0.5 else 0
        k, i, j = int(ks[pick]), int(is_[pick]), int(js[pick])
        centre = (float(g.X[i, j]), float(g.Y[i, j]), float(g.z[k]))
        if subtle_case:
            kind, hu, radius, subtle = "ggo", rng.uniform(-700.0, -600.0), rng.uniform(7.0, 13.0), True
        else:
            kind = "ggo" if rng.random() < 0.55 else "consolidation"
            hu = rng.uniform(-700.0, -300.0) if kind == "ggo" else rng.uniform(-100.0, 50.0)
            radius = float(np.exp(rng.uniform(math.log(8.0), math.log(45.0))))
            subtle = kind == "ggo" and hu < -600.0 and radius < 15.0
        lesions.append(_lesion(rng, kind, float(hu), centre, float(radius), bool(subtle)))
    return lesions


def _lesion(rng: np.random.Generator, kind: str, hu: float, centre: tuple[float, float, float], radius: float,
            subtle: bool) -> Lesion:
    """A lesion of 1-4 sub-ellipsoids around ``centre``: the first one on it, the others scattered about it."""
    blobs = []
    for b in range(int(rng.integers(1, 5))):
        off = np.zeros(3) if b == 0 else rng.normal(0.0, 0.55 * radius, 3)
        rad = radius * (rng.uniform(0.7, 1.2, 3) if b == 0 else rng.uniform(0.35, 0.7, 3))
        blobs.append((centre[0] + off[0], centre[1] + off[1], centre[2] + off[2], *rad))
    return Lesion(
        kind=kind,
        hu=hu,
        centre_mm=centre,
        radius_mm=radius,
        subtle=subtle,
        blobs=tuple(tuple(float(v) for v in bl) for bl in blobs),  # type: ignore[misc]
    )


def _pleural_lesion(rng: np.random.Generator, g: _Grid, lungs: np.ndarray, parenchyma: np.ndarray) -> Lesion | None:
    """A small consolidation centred on the lung's surface, so that it abuts the chest wall or mediastinum.

    The centre is a parenchyma voxel with an in-plane neighbour outside the lung fields (vessels inside the lung
    count as lung, so a vessel's edge is not a surface); about half of the lesion is then clipped away by the
    lung boundary, as a pleural-based consolidation is.
    """
    surface = parenchyma & ndimage.binary_dilation(~lungs, structure=np.ones((1, 3, 3), dtype=bool))
    idx = np.flatnonzero(surface)
    if len(idx) == 0:
        return None
    k, i, j = np.unravel_index(int(rng.choice(idx)), lungs.shape)
    centre = (float(g.X[i, j]), float(g.Y[i, j]), float(g.z[k]))
    radius = float(np.exp(rng.uniform(math.log(8.0), math.log(20.0))))
    return _lesion(rng, "consolidation", float(rng.uniform(-100.0, 50.0)), centre, radius, False)


def _paint_lesions(
    hu: np.ndarray, tissue: np.ndarray, lungs: np.ndarray, lesion_id: np.ndarray, g: _Grid, lesions: list[Lesion]
) -> None:
    n = hu.shape[1]
    for li, les in enumerate(lesions, start=1):
        b = np.asarray(les.blobs)
        zlo = (b[:, 2] - b[:, 5]).min()
        zhi = (b[:, 2] + b[:, 5]).max()
        rad_xy = float(np.max(np.abs(b[:, :2] - b[0, :2]).max(axis=1) + b[:, 3:5].max(axis=1))) * 1.5
        k0 = max(0, int(np.searchsorted(g.z, zlo)) - 1)
        k1 = min(len(g.z), int(np.searchsorted(g.z, zhi)) + 1)
        rc, cc = g.to_pixel(b[0, 0], b[0, 1])
        pad = rad_xy / g.ps + 2
        i0, i1 = max(0, int(rc - pad)), min(n, int(rc + pad) + 1)
        j0, j1 = max(0, int(cc - pad)), min(n, int(cc + pad) + 1)
        if k1 <= k0 or i1 <= i0 or j1 <= j0:
            continue
        X = g.X[i0:i1, j0:j1][None]
        Y = g.Y[i0:i1, j0:j1][None]
        Z = g.z[k0:k1, None, None].astype(np.float32)
        d = np.full((k1 - k0, i1 - i0, j1 - j0), np.inf, dtype=np.float32)
        for cx, cy, cz, rx, ry, rz in les.blobs:
            d = np.minimum(d, np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2))
        # Soft edge: full density inside 0.8, fading out to 1.2; the mask is where the weight passes one half.
        w = np.clip((1.2 - d) / 0.4, 0.0, 1.0)
        sl = (slice(k0, k1), slice(i0, i1), slice(j0, j1))
        in_lung = lungs[sl]
        t = tissue[sl]
        target = np.float32(les.hu)
        # Vessels stay visible through ground glass; consolidation swallows them.
        paintable = in_lung & (t == Tissue.LUNG) if les.kind == "ggo" else in_lung
        h = hu[sl]
        h[paintable] += (w * (target - h))[paintable]
        lesion_id[sl][(w >= 0.5) & in_lung] = li


def render_case(spec: CaseSpec, seed: int, *, pleural_lesions: float = 0.0) -> CaseResult:
    """Render one case: anatomy, vessels, lesions, blur, correlated noise, quantisation.

    ``pleural_lesions``: the probability that a pneumonia case without a subtle lesion gets one more lesion, a
    small consolidation against the chest wall or mediastinum (``_pleural_lesion``) — a training-data option for
    a kind the default mix holds few of. It is drawn from a random stream of its own, so every other choice of
    the case, its noise included, is the same as without it; at 0 the case is byte for byte the default one.
    """
    rng = np.random.default_rng([seed, spec.index, 0x5EED])
    g = _Grid(spec)
    tissue = np.empty((spec.slices, spec.rows, spec.rows), dtype=np.uint8)
    for k in range(spec.slices):
        tissue[k] = _render_slice(spec, g, float(g.t[k]), float(g.z[k]))
    lungs = (tissue == Tissue.LUNG).copy()
    _paint_capsules(tissue, lungs, g, _segments_to_lung(spec, rng, g))
    # Benign nodules in a fifth of all cases (confounders, not labelled as lesion).
    if rng.random() < 0.2:
        idx = np.flatnonzero(tissue == Tissue.LUNG)
        for c in rng.choice(idx, size=int(rng.integers(1, 4))):
            k, i, j = np.unravel_index(c, tissue.shape)
            spec.nodules.append((float(g.X[i, j]), float(g.Y[i, j]), float(g.z[k]), float(rng.uniform(2.0, 4.5))))
        for x, y, z, r in spec.nodules:
            for kk in np.flatnonzero(np.abs(g.z - z) < r):
                rk2 = r * r - (g.z[kk] - z) ** 2
                tissue[kk][(((g.X - x) ** 2 + (g.Y - y) ** 2) < rk2) & lungs[kk]] = Tissue.NODULE
    lut = np.zeros(len(Tissue), dtype=np.float32)
    for k_, v in spec.lut.items():
        lut[k_] = v
    hu = lut[tissue]
    # Gravity-dependent lung density: posterior lung slightly denser.
    grad = (spec.lung_gradient * np.clip((g.Y / spec.body_b + 1.0) / 2.0, 0.0, 1.0)).astype(np.float32)
    lung_now = tissue == Tissue.LUNG
    hu += np.where(lung_now, grad[None], np.float32(0.0))
    lesion_id = np.zeros(tissue.shape, dtype=np.uint8)
    if spec.label:
        spec.lesions = _draw_lesions(spec, rng, g, lung_now)
        if pleural_lesions > 0 and not all(les.subtle for les in spec.lesions):
            extra = np.random.default_rng([seed, spec.index, 0x91E0A1])
            if extra.random() < pleural_lesions and (les := _pleural_lesion(extra, g, lungs, lung_now)) is not None:
                spec.lesions.append(les)
        _paint_lesions(hu, tissue, lungs, lesion_id, g, spec.lesions)
    # Scanner: in-plane blur (point-spread), then spatially correlated Gaussian noise of the case's sigma.
    noise_scale = spec.noise_hu / (0.5 / (math.sqrt(math.pi) * 0.6))  # sigma after a 0.6 px Gaussian filter
    out = np.empty(tissue.shape, dtype=np.int16)
    for k in range(spec.slices):
        img = ndimage.gaussian_filter(hu[k], spec.blur_px, mode="nearest")
        noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), 0.6) * noise_scale
        img += noise
        np.clip(np.rint(img), -1024, 3071, out=img)
        out[k] = img.astype(np.int16)
    return CaseResult(spec=spec, hu=out, tissue=tissue, lungs=lungs, lesion_id=lesion_id)
