"""What both trainers (:mod:`training.train`'s classifier and :mod:`training.segmenter`'s U-Net) and the evaluation
share: the dataset's cases on the model grid (through the node's own :func:`models.preprocess.load_series`), the
card's data summary, Youden's threshold, and a run's files (``model.keras``, ``model_card.json`` with the weights'
sha256, ``history.json``, ``curves.png``). Raises :class:`TrainingError` for a missing or unusable dataset.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.clinical import ClinicalInputs
from models.preprocess import PreprocessError, load_series, masks_to_grid, resize_slices
from training.clinical_table import age_sex, clinical_values, disagreement_note, parse_label
from training.phi import folder_tag

NOT_FOR_CLINICAL_USE = "Not for clinical use: trained and evaluated on synthetic phantoms only."


class TrainingError(Exception):
    """The dataset is missing or unusable, or training could not write its outputs."""


@dataclass
class GridCase:
    """One phantom case on the model grid (float16 HU; segmentation targets when asked for)."""

    case_id: str
    label: int
    hu: np.ndarray  # (S, g, g) float16
    slice_lesion: np.ndarray  # (S,) lesion area on the grid, in grid pixels
    slice_lung: np.ndarray  # (S,) lung area on the grid, in grid pixels
    age: float | None
    sex: str | None
    target: np.ndarray | None = None  # (S, g, g) uint8 classes {0, 1 lung, 2 lesion}
    symptoms: dict[str, float | None] = field(default_factory=dict)  # fever, cough, dyspnoea: 1/0, None missing

    def clinical(self) -> ClinicalInputs:
        """Age, sex and symptoms as the fusion reads them (missing stays missing)."""
        return ClinicalInputs(age=self.age, sex=self.sex, **{k: self.symptoms.get(k) for k in ("fever", "cough",
                                                                                                "dyspnoea")})


def read_table(data: Path) -> pd.DataFrame:
    path = Path(data) / "clinical.csv"
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from exc
    missing = {"case_id", "dicom_dir", "masks", "label"} - set(table.columns)
    if missing:
        raise TrainingError(f"{path} lacks columns {sorted(missing)}")
    if table.empty:
        raise TrainingError(f"{path.name} has no rows below its header line: nothing is labelled")
    for col in ("case_id", "dicom_dir", "masks"):  # a spreadsheet's stray spaces name no other folder or case
        if not pd.api.types.is_numeric_dtype(table[col]):
            table[col] = table[col].str.strip()
    table["label"] = _checked_rows(table, path)
    return table


def _checked_rows(table: pd.DataFrame, path: Path) -> list[int]:
    """Every row's label as 0/1. Raises DatasetError naming each row with a missing or unreadable label or clinical
    value, and each case id on several rows."""
    from training.dataset import DatasetError

    labels, problems = [], []
    for i, row in enumerate(table.to_dict("records")):
        where = f"row {i + 2} of {path.name}"
        try:
            label = parse_label(row["label"])
        except ValueError as exc:
            label, why = None, str(exc)
        else:
            why = "no label"
        if label is None:
            problems.append(f"{where}: {why}")
        labels.append(label if label is not None else 0)
        problems += [f"{where}: {p}" for p in clinical_values(row)[1]]
    at: dict[str, list[int]] = {}
    for i, case in enumerate(table.case_id.astype(str)):  # ids differing only in case or spaces: one folder on
        at.setdefault(" ".join(case.split()).casefold(), []).append(i)  # a case-insensitive share, one lookup
    problems += [f"case_id {table.case_id.iloc[rows[0]]} is on {len(rows)} rows ({', '.join(str(i + 2) for i in rows)})"
                 for rows in at.values() if len(rows) > 1]
    if problems:
        raise DatasetError(f"{path}: {len(problems)} problems", problems)
    return labels


def series_files(data: Path, dicom_dir: str, case_id: str = "") -> list[Path]:
    """The ``.dcm`` files of a case's ``dicom_dir``. Raises TrainingError naming the case, not the folder (export
    folders are often named after the patient: training.phi)."""
    files = sorted((Path(data) / dicom_dir).glob("*.dcm"))
    if not files:
        raise TrainingError(f"case {case_id}: no .dcm files in the folder its dicom_dir names" if case_id else
                            f"no .dcm files in {folder_tag(Path(data), Path(data) / dicom_dir)}")
    return files


def load_grid_cases(
    data: Path, grid: int, *, with_targets: bool, limit: int | None = None, progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[GridCase]:
    """Load every case of a phantom dataset through load_series and resize to the model grid; age and sex are the
    table's where it gives them, else the header's (:func:`training.clinical_table.age_sex`), and ``log`` is told
    once how many series the two disagreed on."""
    from tqdm import tqdm

    table = read_table(data)
    if limit is not None:
        table = table.iloc[:limit]
    cases: list[GridCase] = []
    disagreements = 0
    for row in tqdm(table.itertuples(), total=len(table), desc=f"load {Path(data).name}", disable=not progress, leave=False):
        try:
            vol = load_series(series_files(data, str(row.dicom_dir), str(row.case_id)))
        except PreprocessError as exc:
            raise TrainingError(f"case {row.case_id}: {exc}") from exc
        age, sex, differs = age_sex(clinical_values(row._asdict())[0], vol.patient_age, vol.patient_sex)
        disagreements += differs
        masks = case_masks(data, row)
        if masks["lesion"].shape != vol.hu.shape:
            raise TrainingError(f"case {row.case_id}: masks {masks['lesion'].shape} do not match the series {vol.hu.shape}")
        lesion_frac = masks_to_grid(masks["lesion"], grid)
        lung_frac = masks_to_grid(masks["lungs"], grid)
        target = None
        if with_targets:
            from models.unet import targets_from_fractions

            target = targets_from_fractions(lung_frac, lesion_frac).astype(np.uint8)
        cases.append(
            GridCase(
                case_id=str(row.case_id),
                label=int(row.label),
                hu=resize_slices(vol.hu, grid).astype(np.float16),
                slice_lesion=lesion_frac.sum(axis=(1, 2)).astype(np.float32),
                slice_lung=lung_frac.sum(axis=(1, 2)).astype(np.float32),
                age=age,
                sex=sex,
                target=target,
                symptoms=_symptoms(row._asdict()),
            )
        )
    if not cases:
        raise TrainingError(f"dataset {data} has no cases")
    if log is not None and (note := disagreement_note(disagreements, len(cases), f"{Path(data).name}: ")):
        log(note)
    return cases


def case_masks(data: Path, row: Any) -> dict[str, np.ndarray]:
    """The masks file a table row names. Raises TrainingError naming the case (not the path: training.phi)."""
    from training.phantom import load_masks

    try:
        return load_masks(Path(data) / str(row.masks))
    except (OSError, ValueError, EOFError) as exc:
        raise TrainingError(f"case {row.case_id}: the masks file its masks column names cannot be read "
                            f"({type(exc).__name__})") from exc


def _symptoms(row: dict[str, Any]) -> dict[str, float | None]:
    c = ClinicalInputs.from_mapping(row)
    return {"fever": c.fever, "cough": c.cough, "dyspnoea": c.dyspnoea}


def describe_data(data: Path) -> dict[str, Any]:
    """Summary of a phantom dataset for the model card (seed, size, prevalence, matrix and slice ranges)."""
    table = read_table(data)
    first = json.loads((Path(data) / str(table.case_id.iloc[0]) / "case.json").read_text())
    return {
        "path": str(data),
        "generator": "training.phantom",
        "generator_version": first.get("generator_version"),
        "seed": first.get("seed"),
        "cases": int(len(table)),
        "pneumonia_cases": int(table.label.sum()),
        "rows_range": [int(table.rows.min()), int(table.rows.max())] if "rows" in table else None,
        "slices_range": [int(table.slices.min()), int(table.slices.max())] if "slices" in table else None,
        "pleural_lesions": float(first.get("pleural_lesions", 0.0)),  # the generator's training-data option
    }


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def seeds_of(card: dict[str, Any]) -> set[int]:
    """Every dataset seed a model card names (training data, validation and test metrics)."""
    out: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if x.get("generator") == "training.phantom" and isinstance(x.get("seed"), int):
                out.add(int(x["seed"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(card)
    return out


def roc_auc(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of scores ``p`` for labels ``y``; NaN when ``y`` holds one class only."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(np.asarray(y))) == 2 else float("nan")


def youden_threshold(y: Sequence[int], p: Sequence[float]) -> float:
    """The threshold maximising sensitivity + specificity on (y, p)."""
    from sklearn.metrics import roc_curve

    if len(set(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 1e-4, 1.0 - 1e-4))


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    """Loss and accuracy/metric curves per epoch as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, max(map(len, history.values()), default=0) + 1)  # keys need not be "loss" (ensembles)
    for key in history:
        ax = axes[0] if "loss" in key else axes[1]
        ax.plot(list(epochs)[: len(history[key])], history[key], marker="o", label=key)
    axes[0].set_title(f"{title}: loss")
    axes[1].set_title(f"{title}: accuracy / AUC / Dice")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def existing_model(out: str | Path) -> str:
    """Why ``out`` must not be trained into without ``--overwrite``: it already holds a model (a card or weights,
    such as a shipped version under models/weights, which nodes load and whose card the evaluation report cites);
    "" when it holds none."""
    from models.registry import CARD_FILE, MODEL_FILE

    out = Path(out)
    if not ((out / CARD_FILE).is_file() or (out / MODEL_FILE).is_file()):
        return ""
    try:
        card = json.loads((out / CARD_FILE).read_text())
        which = f" ({card['name']} {card['version']}, by its card)"
    except (OSError, ValueError, KeyError, TypeError):
        which = ""
    return f"--out {out} already holds a model{which}: choose a new folder, or pass --overwrite to replace it"


def write_model(model: Any, out: Path, card: dict[str, Any]) -> None:
    """Save model.keras and model_card.json (with the weights' sha256) into ``out``."""
    from models.registry import CARD_FILE, MODEL_FILE, sha256_file

    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save(out / MODEL_FILE)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot save the model to {out}: {exc}") from exc
    card["files"] = {MODEL_FILE: {"sha256": sha256_file(out / MODEL_FILE), "bytes": (out / MODEL_FILE).stat().st_size}}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def training_environment() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": "CPU",
    }


def epoch_bar(total: int, epoch: int, epochs: int, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress, leave=True)


# ---------------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------------


def save_run(model: Any, out: Path, card: dict[str, Any], history: dict[str, list[float]], title: str) -> None:
    """Write a training run into ``out``: the model and its card, ``history.json`` and ``curves.png``."""
    write_model(model, out, card)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_curves(history, out / "curves.png", title)
