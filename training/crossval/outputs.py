"""Writing a run's files: JSON (atomic, numpy-aware), ``predictions.csv``, the log, and ``run.json``'s record."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset import Dataset


def json_default(o: Any) -> Any:
    """numpy scalars and arrays and tuples as plain JSON values."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, replacing ``path`` atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=json_default) + "\n")
    os.replace(tmp, path)


def write_predictions(path: Path, ds: Dataset, p: np.ndarray, thr: np.ndarray, fold_of: np.ndarray,
                      attention: list[np.ndarray | None]) -> None:
    """``predictions.csv``: one out-of-fold row per case, in table order. Which cases share a patient is the
    ``patient_group`` number (1, 2, ... in table order), not the patient id, which is the header's PatientID where
    the table has no ``patient_id`` column (training/phi.py)."""
    groups = ds.groups
    number = {g: n for n, g in enumerate(dict.fromkeys(groups.tolist()), start=1)}
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case_id", "patient_group", "fold", "label", "probability", "threshold", "prediction",
                    "reader_label", "top_attention_slice"])
        for i, c in enumerate(ds.cases):
            a = attention[i]
            w.writerow([c.case_id, number[groups[i]], int(fold_of[i]), c.label, f"{p[i]:.6f}", f"{thr[i]:.6f}",
                        int(p[i] >= thr[i]), "" if c.reader_label is None else c.reader_label,
                        "" if a is None else int(np.argmax(a))])


def logger(path: Path, progress: bool) -> Callable[[str], None]:
    """A log function appending to ``path`` and, with ``progress``, printing above the progress bars."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with path.open("a") as f:
            f.write(msg + "\n")
        if progress:
            tqdm.write(msg)

    return log


def environment() -> dict[str, Any]:
    """The trainer's record of the machine and library versions."""
    from training.common import training_environment

    return training_environment()
