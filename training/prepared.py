"""A dataset's cases on the model grid, computed once and cached (:func:`prepare`).

:func:`prepare` turns the cases of a :class:`training.dataset.Dataset` into :class:`training.common.GridCase` arrays
on the model grid, through the node's own :func:`models.preprocess.load_series`, with per-case HU histograms for
the report. The result is cached as one ``.npz`` keyed by the dataset's files and the grid (:func:`cache_key`), so
cross-validation folds and reruns never re-read DICOM. Raises :class:`training.dataset.DatasetError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.clinical_table import age_sex
from training.common import GridCase
from training.dataset import Case, Dataset, DatasetError

CACHE_VERSION = 2  # 2: the cache holds the header's age and sex; the table's are applied on reading
HIST_EDGES = np.arange(-1024.0, 504.0, 8.0)  # HU histogram bins (within the body) for the report

# Slice "lesion area" for cases without masks: every slice of a pneumonia series counts as lesion (series
# label only), so the trainer's series target is the label; crossval turns slice supervision off for these.
NO_MASK_LESION = 1e6


@dataclass
class Prepared:
    """The dataset's cases on the model grid, with per-case HU histograms (within the body) for the report."""

    cases: list[GridCase]
    hist_edges: np.ndarray
    hist_counts: np.ndarray  # (cases, bins) voxel counts
    key: str
    path: Path
    from_cache: bool
    seconds: float
    age_sex_disagreements: int = 0  # series whose header age or sex disagrees with the table's (the table's used)


def cache_key(dataset: Dataset, grid: int) -> str:
    """sha256 over the grid, the cache format and every case's series, files (path, size, mtime) and masks."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "grid": grid, "hist": HIST_EDGES.tolist()}).encode())
    for c in dataset.cases:
        h.update(f"\n{c.case_id}|{c.series_uid}|{c.label}".encode())
        for p in [*c.files, *([c.masks] if c.masks else [])]:
            st = p.stat()
            h.update(f"|{p.relative_to(dataset.root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Voxels inside the body: above ``threshold`` HU with in-plane holes (the lungs, airways) filled."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # fill slice by slice, never across slices
    return np.asarray(ndimage.binary_fill_holes(hu > threshold, structure=structure))


def _grid_case(case: Case, grid: int) -> tuple[GridCase, np.ndarray]:
    from models.preprocess import PreprocessError, load_series, masks_to_grid, resize_slices
    from training.phantom import load_masks

    try:
        vol = load_series(list(case.files))
    except PreprocessError as exc:
        raise DatasetError(f"case {case.case_id}: {exc}") from exc
    hu_grid = resize_slices(vol.hu, grid)
    if case.masks is not None:
        try:
            m = load_masks(case.masks)
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"case {case.case_id}: its masks file cannot be read ({type(exc).__name__})") from exc
        if m["lesion"].shape != vol.hu.shape:
            raise DatasetError(f"case {case.case_id}: masks {m['lesion'].shape} do not match the series {vol.hu.shape}")
        lesion = masks_to_grid(m["lesion"], grid).sum(axis=(1, 2)).astype(np.float32)
        lung = masks_to_grid(m["lungs"], grid).sum(axis=(1, 2)).astype(np.float32)
    else:
        lesion = np.full(len(hu_grid), NO_MASK_LESION if case.label else 0.0, np.float32)
        lung = np.ones(len(hu_grid), np.float32)
    age, sex = vol.patient_age, vol.patient_sex  # the header's: the table's are applied by _with_table
    counts = np.histogram(vol.hu[body_mask(vol.hu)], bins=HIST_EDGES)[0]
    gc = GridCase(case_id=case.case_id, label=case.label, hu=hu_grid.astype(np.float16), slice_lesion=lesion,
                  slice_lung=lung, age=None if age is None or not math.isfinite(float(age)) else float(age),
                  sex=sex if sex in ("M", "F", "O") else None, symptoms=case_symptoms(case))
    return gc, counts


def _with_table(cases: list[GridCase], dataset: Dataset) -> tuple[list[GridCase], int]:
    """The cases (header age and sex) with the table's age and sex where it gives them
    (:func:`training.clinical_table.age_sex`), and how many disagreed with the header."""
    out, disagreements = [], 0
    for gc, case in zip(cases, dataset.cases, strict=True):
        gc.age, gc.sex, differs = age_sex(case.clinical, gc.age, gc.sex)
        out.append(gc)
        disagreements += differs
    return out, disagreements


def case_symptoms(case: Case) -> dict[str, float | None]:
    """The table's fever, cough and dyspnoea for a case: 1/0, None where blank or unreadable (not cached: the
    table is re-read on every run, so editing it needs no new cache)."""
    from models.clinical import SYMPTOMS, ClinicalInputs

    c = ClinicalInputs.from_mapping(case.clinical)
    return {k: c.value(k) for k in SYMPTOMS}


def prepare(dataset: Dataset, grid: int, cache_dir: str | Path, *, progress: bool = False) -> Prepared:
    """The cases on a ``grid``² model grid, read from the cache or computed once and cached (atomically).

    Raises DatasetError naming every series that cannot be read (load_series' reason, by case id).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    key = cache_key(dataset, grid)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"grid{grid}-{key[:20]}.npz"
    if path.is_file():
        try:
            cases, counts = _read_cache(path, dataset)
            cases, differ = _with_table(cases, dataset)
            return Prepared(cases, HIST_EDGES.copy(), counts, key, path, True, time.perf_counter() - t0, differ)
        except (OSError, ValueError, KeyError) as exc:
            if progress:
                tqdm.write(f"cache {path.name} unusable ({exc}); rebuilding")
    cases, hists, broken = [], [], []
    for c in tqdm(dataset.cases, desc="preprocess", unit="series", disable=not progress):
        try:
            gc, counts = _grid_case(c, grid)
        except DatasetError as exc:  # every broken series named at once, not one per run
            broken.append(str(exc))
            continue
        cases.append(gc)
        hists.append(counts)
    if broken:
        raise DatasetError(f"{len(broken)} of {len(dataset.cases)} series cannot be used", broken)
    counts_arr = np.stack(hists).astype(np.int64)
    _write_cache(path, cases, counts_arr)
    cases, differ = _with_table(cases, dataset)
    return Prepared(cases, HIST_EDGES.copy(), counts_arr, key, path, False, time.perf_counter() - t0, differ)


def _write_cache(path: Path, cases: list[GridCase], counts: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(c.hu) for c in cases], np.int64)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        case_ids=np.array([c.case_id for c in cases]),
        lengths=lengths,
        hu=np.concatenate([c.hu for c in cases]),
        slice_lesion=np.concatenate([c.slice_lesion for c in cases]),
        slice_lung=np.concatenate([c.slice_lung for c in cases]),
        age=np.array([np.nan if c.age is None else c.age for c in cases], np.float64),
        sex=np.array([c.sex or "" for c in cases]),
        hist_counts=counts,
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_cache(path: Path, dataset: Dataset) -> tuple[list[GridCase], np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        ids = [str(x) for x in z["case_ids"]]
        if ids != [c.case_id for c in dataset.cases]:
            raise ValueError("case ids differ from the dataset's")
        bounds = np.r_[0, np.cumsum(z["lengths"])]
        hu, les, lung = z["hu"], z["slice_lesion"], z["slice_lung"]
        ages, sexes, counts = z["age"], z["sex"], z["hist_counts"]
    cases = [
        GridCase(case_id=c.case_id, label=c.label, hu=hu[a:b], slice_lesion=les[a:b], slice_lung=lung[a:b],
                 age=None if np.isnan(ages[i]) else float(ages[i]), sex=str(sexes[i]) or None,
                 symptoms=case_symptoms(c))
        for i, (c, a, b) in enumerate(zip(dataset.cases, bounds[:-1], bounds[1:], strict=True))
    ]
    return cases, counts
