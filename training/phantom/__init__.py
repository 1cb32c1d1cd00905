"""Synthetic chest-CT phantoms written as real DICOM series, with ground-truth masks and a clinical table.

Contract: ``generate_dataset(out, cases=N, seed=S)`` writes, for each case ``CASE0001`` …

- ``out/CASE0001/dicom/IM0001.dcm`` … — one CT Image Storage instance per slice (Explicit VR Little Endian),
  instance 1 the most cranial slice;
- ``out/CASE0001/masks.npz`` — ``lungs`` (bool), ``lesion`` (bool), ``lesion_id`` (uint8, 0 = none),
  ``tissue`` (uint8, see :class:`Tissue`), all shaped (slices, rows, cols) in ascending order of position along
  the slice normal (feet → head), which is the order ``models.preprocess.load_series`` returns;
- ``out/CASE0001/case.json`` — the case's parameters and its lesions;
- ``out/clinical.csv`` — one row per case (see :data:`CLINICAL_COLUMNS`).

Same arguments → same bytes (UIDs derive from the seed, dates are fixed, no wall clock). Everything is
synthetic and labelled so: patient names ``PHANTOM^CASE0001``, "not for clinical use" in SeriesDescription and
ImageComments. Raises :class:`PhantomError` for bad arguments or an unwritable output folder.

Series the chest models must refuse: :mod:`training.phantom.anatomy` renders head, abdomen, pelvis, knee and noise
volumes (``generate_region``), :mod:`training.phantom.restack` turns one real CT slice into a series
(``restack_slice``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from training.phantom.anatomy import REGIONS, RegionCase, generate_region, render_region, write_region
from training.phantom.dicom import load_masks, write_masks, write_series
from training.phantom.render import render_case
from training.phantom.restack import restack_slice
from training.phantom.spec import (
    GENERATOR_VERSION,
    NOT_FOR_CLINICAL_USE,
    CaseResult,
    CaseSpec,
    Lesion,
    PhantomError,
    Tissue,
    draw_case,
    parse_range,
)

__all__ = [
    "CLINICAL_COLUMNS",
    "GENERATOR_VERSION",
    "NOT_FOR_CLINICAL_USE",
    "CaseResult",
    "CaseSpec",
    "Lesion",
    "PhantomError",
    "REGIONS",
    "RegionCase",
    "Tissue",
    "draw_case",
    "generate_case",
    "generate_dataset",
    "generate_region",
    "load_masks",
    "parse_range",
    "render_case",
    "render_region",
    "restack_slice",
    "write_masks",
    "write_region",
    "write_series",
]

CLINICAL_COLUMNS = (
    "case_id", "study_instance_uid", "series_instance_uid", "dicom_dir", "masks", "age", "sex",
    "fever", "cough", "dyspnoea", "label", "diagnosis", "reader_label", "n_lesions", "lesion_volume_ml",
    "subtle", "rows", "slices", "pixel_spacing_mm", "slice_spacing_mm", "noise_hu",
)


def _reader_label(rng: np.random.Generator, spec: CaseSpec) -> int:
    """Simulated radiologist: sensitivity ~0.85 (~0.55 for subtle cases), specificity ~0.92."""
    if spec.label:
        sens = 0.55 if all(les.subtle for les in spec.lesions) else 0.88
        return int(rng.random() < sens)
    return int(rng.random() < 0.08)


def generate_case(seed: int, index: int, label: int, out: Path, size: tuple[int, int], slices: tuple[int, int],
                  pleural_lesions: float = 0.0) -> dict[str, object]:
    """Generate, render and write case ``index``; return its clinical.csv row."""
    spec = draw_case(seed, index, label, size, slices)
    result = render_case(spec, seed, pleural_lesions=pleural_lesions)
    case_dir = out / spec.case_id
    study_uid, series_uid = write_series(result, seed, case_dir / "dicom")
    write_masks(result, case_dir / "masks.npz")
    spec.reader_label = _reader_label(np.random.default_rng([seed, index, 0xBEAD]), spec)
    voxel_ml = spec.pixel_spacing**2 * spec.slice_spacing / 1000.0
    info = asdict(spec)
    info["generator_version"] = GENERATOR_VERSION
    info["seed"] = seed
    if pleural_lesions:
        info["pleural_lesions"] = pleural_lesions
    (case_dir / "case.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return {
        "case_id": spec.case_id,
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "dicom_dir": f"{spec.case_id}/dicom",
        "masks": f"{spec.case_id}/masks.npz",
        "age": spec.age,
        "sex": spec.sex,
        **spec.symptoms,
        "label": spec.label,
        "diagnosis": "pneumonia" if spec.label else "normal",
        "reader_label": spec.reader_label,
        "n_lesions": len(spec.lesions),
        "lesion_volume_ml": round(float(result.lesion.sum()) * voxel_ml, 3),
        "subtle": int(bool(spec.lesions) and all(les.subtle for les in spec.lesions)),
        "rows": spec.rows,
        "slices": spec.slices,
        "pixel_spacing_mm": spec.pixel_spacing,
        "slice_spacing_mm": spec.slice_spacing,
        "noise_hu": round(spec.noise_hu, 2),
    }


def generate_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    *,
    prevalence: float = 0.5,
    size: str | int | tuple[int, int] = (256, 512),
    slices: str | int | tuple[int, int] = (40, 160),
    progress: bool = False,
    pleural_lesions: float = 0.0,
) -> pd.DataFrame:
    """Write ``cases`` phantom series under ``out`` and return the clinical table (also written as clinical.csv).

    Exactly ``round(prevalence * cases)`` cases are pneumonia, in an order drawn from the seed.
    ``pleural_lesions`` > 0 adds a small consolidation against the chest wall or mediastinum to that share of the
    non-subtle pneumonia cases (``render_case``), for training sets; evaluation sets keep the default 0.
    """
    if cases < 1:
        raise PhantomError(f"cases must be >= 1, got {cases}")
    if not 0.0 <= prevalence <= 1.0:
        raise PhantomError(f"prevalence must be in [0, 1], got {prevalence}")
    if not 0.0 <= pleural_lesions <= 1.0:
        raise PhantomError(f"pleural_lesions must be in [0, 1], got {pleural_lesions}")
    size_r = parse_range(size, "size")
    slices_r = parse_range(slices, "slices")
    if size_r[0] < 32:
        raise PhantomError(f"size must be >= 32 px, got {size}")
    if slices_r[0] < 2:
        raise PhantomError(f"slices must be >= 2, got {slices}")
    out = Path(out)
    n_pos = int(round(prevalence * cases))
    labels = np.zeros(cases, dtype=int)
    labels[:n_pos] = 1
    labels = np.random.default_rng([seed, 0x1ABE1]).permutation(labels)
    rows = []
    it: Iterable[int] = range(cases)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="phantoms", unit="case")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in it:
            rows.append(generate_case(seed, i, int(labels[i]), out, size_r, slices_r, pleural_lesions))
        table = pd.DataFrame(rows, columns=list(CLINICAL_COLUMNS))
        table.to_csv(out / "clinical.csv", index=False, lineterminator="\n")
    except OSError as exc:
        raise PhantomError(f"cannot write phantom dataset to {out}: {exc.strerror or exc}") from exc
    return table
