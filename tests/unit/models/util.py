"""Helpers for the models tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def case_files(data: Path, index: int = 0) -> list[Path]:
    """The DICOM files of case ``index`` of a phantom dataset, in file-name order."""
    table = pd.read_csv(data / "clinical.csv")
    return sorted((data / table.dicom_dir.iloc[index]).glob("*.dcm"))


def case_masks(data: Path, index: int = 0) -> dict:
    from training.phantom import load_masks

    table = pd.read_csv(data / "clinical.csv")
    return load_masks(data / table.masks.iloc[index])
