"""A labelled dataset: DICOM series found by their headers in any folder layout, joined to a label table.

:func:`load_dataset` walks every file under the root, reads headers only (``stop_before_pixels``), groups the
instances by SeriesInstanceUID, and joins a CSV whose rows name a series (``series_instance_uid``), a study
(``study_instance_uid``; its CT series with the most instances) or a case (``case_id`` with a ``dicom_dir``
folder, or a top-level folder of that name) to a ``label`` (0/1 or normal/pneumonia), an optional
``reader_label`` (the reader's diagnosis), an optional ``patient_id`` (else the header's PatientID) and optional
clinical columns (age, sex, fever, cough, dyspnoea, ...). A ``masks`` column (the phantom generator's
``masks.npz``) adds per-slice lesion labels for deep supervision; without it training uses the series labels alone.

It raises :class:`DatasetError` listing every problem at once: CSV rows whose series are missing, series without a
label row (unless ``allow_unlabelled``), duplicate UIDs (in the CSV or two files with one SOPInstanceUID),
conflicting labels, unparseable labels, clinical values that cannot be read (age not a number of years, sex not
M/F/O/U, a symptom not 0/1, yes/no, true/false or present/absent; blank is missing; values are not echoed for age),
a row naming a series the node's gate would refuse (not CT, not a CT image SOP class, a single slice), or no
readable DICOM file at all. Unreadable files are listed in ``Dataset.unreadable`` and are not fatal on their own;
their count, and with ``allow_unlabelled`` the count of series left out, lead ``Dataset.notes``. Messages name
rows by number and case id, files and folders only by base name and folder tag, never by a path below the root
(:mod:`training.phi`); blank rows are skipped; keys and case ids differing only in case or spaces are duplicates.

:func:`training.prepared.prepare` turns the cases into arrays on the model grid, once, and caches them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.clinical_table import CLINICAL_COLUMNS, MAX_AGE, clinical_values, parse_label  # noqa: F401 - read from here too
from training.common import TrainingError
from training.phi import file_ref, folder_tag, scrub

HEADER_TAGS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SOPClassUID")
IMAGE_MODALITIES = frozenset({"CT"})
# CT Image Storage (single-frame: a series needs at least two), Enhanced and Legacy Converted Enhanced CT.
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMAGE_SOP_CLASSES = frozenset({CT_IMAGE, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})
# Files that are never DICOM in a dataset folder: skipped without being listed as unreadable.
NON_DICOM_SUFFIXES = frozenset({
    ".csv", ".tsv", ".json", ".npz", ".npy", ".txt", ".md", ".png", ".jpg", ".jpeg", ".html", ".xml", ".zip",
    ".gz", ".py", ".log", ".xlsx", ".pdf", ".nii", ".mha", ".nrrd",
})
TABLE_NAMES = ("clinical.csv", "labels.csv")
MAX_LISTED = 20  # problems named one by one in an error message before "... and N more"

_ALIASES = {
    "series_instance_uid": ("series_instance_uid", "seriesinstanceuid", "series_uid"),
    "study_instance_uid": ("study_instance_uid", "studyinstanceuid", "study_uid"),
    "case_id": ("case_id", "case", "caseid"),
    "dicom_dir": ("dicom_dir", "dicom_folder", "folder", "path"),
    "label": ("label", "target", "y"),
    "reader_label": ("reader_label", "reader", "reader_diagnosis", "physician_label"),
    "patient_id": ("patient_id", "patientid"),
    "masks": ("masks", "mask", "masks_path"),
    "dyspnoea": ("dyspnoea", "dyspnea"),
}



class DatasetError(TrainingError):
    """The dataset cannot be used as given; ``problems`` lists each reason (the message names them too)."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        shown = [f"  - {p}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            shown.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        super().__init__("\n".join([summary, *shown]))


@dataclass(frozen=True)
class SeriesFiles:
    """One series found on disk: its UIDs, the PatientID and modality of its headers, its files (sorted)."""

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    files: tuple[Path, ...]
    sop_class: str = CT_IMAGE


@dataclass(frozen=True)
class Case:
    """One labelled series. ``reader_label`` is None where the table has no reader diagnosis for it."""

    case_id: str
    series_uid: str
    study_uid: str
    patient_id: str
    label: int
    reader_label: int | None
    files: tuple[Path, ...]
    masks: Path | None
    clinical: dict[str, Any] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)  # the whole table row (subgroup columns, e.g. "subtle")


@dataclass
class Dataset:
    """Cases in table order, with what was skipped on the way (unreadable files, unlabelled series, notes)."""

    root: Path
    table_path: Path
    cases: list[Case]
    unreadable: list[tuple[str, str]]
    unlabelled: list[str]
    notes: list[str]

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.cases], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """Each case's patient, for grouped splits: ids that differ only in upper/lower case or spaces are one
        patient (a wrong merge costs a little balance, a wrong split leaks a patient across folds)."""
        first: dict[str, str] = {}
        return np.array([first.setdefault(" ".join(c.patient_id.split()).casefold(), c.patient_id)
                         for c in self.cases])

    @property
    def has_reader(self) -> bool:
        return any(c.reader_label is not None for c in self.cases)

    @property
    def has_masks(self) -> bool:
        return bool(self.cases) and all(c.masks is not None for c in self.cases)

    def summary(self) -> dict[str, Any]:
        """Counts for reports and model cards (no paths inside the dataset, no patient data)."""
        y = self.labels
        return {
            "root": str(self.root),
            "table": self.table_path.name,
            "cases": len(self.cases),
            "pneumonia_cases": int(y.sum()),
            "normal_cases": int(len(y) - y.sum()),
            "patients": len(set(self.groups.tolist())),
            "instances": int(sum(len(c.files) for c in self.cases)),
            "reader_labels": int(sum(c.reader_label is not None for c in self.cases)),
            "slice_labels": "lesion masks" if self.has_masks else "none (series labels only)",
            "unreadable_files": len(self.unreadable),
            "unlabelled_series": len(self.unlabelled),
        }


# ---------------------------------------------------------------------------------------------------------
# Finding series
# ---------------------------------------------------------------------------------------------------------


def scan_series(root: Path, *, progress: bool = False) -> tuple[dict[str, SeriesFiles], list[tuple[str, str]]]:
    """Every series under ``root`` by SeriesInstanceUID, and the unreadable files as (relative path, reason).

    Raises DatasetError when two files carry the same SOPInstanceUID.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    root = Path(root)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() in NON_DICOM_SUFFIXES or name.startswith(".") or name == "DICOMDIR":
                continue
            paths.append(p)
    unreadable: list[tuple[str, str]] = []
    groups: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    meta: dict[str, tuple[str, str, str, str]] = {}
    seen_sop: dict[str, Path] = {}
    duplicates: list[str] = []
    for p in tqdm(paths, desc="read headers", unit="file", disable=not progress, leave=False):
        rel = str(p.relative_to(root))
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # OSError names the path
            unreadable.append((rel, scrub(f"not a readable DICOM file ({type(exc).__name__}: {why})", root, p)[:200]))
            continue
        series = str(getattr(ds, "SeriesInstanceUID", "") or "")
        sop = str(getattr(ds, "SOPInstanceUID", "") or "")
        if not series:
            unreadable.append((rel, "no SeriesInstanceUID"))
            continue
        if sop and sop in seen_sop:
            duplicates.append(f"one SOPInstanceUID is in both {file_ref(root, seen_sop[sop])} and {file_ref(root, p)}")
            continue
        if sop:
            seen_sop[sop] = p
        groups[series].append((rel, p))
        meta.setdefault(
            series,
            (str(getattr(ds, "StudyInstanceUID", "") or ""), str(getattr(ds, "PatientID", "") or ""),
             str(getattr(ds, "Modality", "") or "").upper(), str(getattr(ds, "SOPClassUID", "") or "")),
        )
    if duplicates:
        raise DatasetError(f"{root}: {len(duplicates)} duplicate instance UIDs", duplicates)
    found = {
        uid: SeriesFiles(uid, meta[uid][0], meta[uid][1], meta[uid][2], tuple(p for _, p in sorted(files)),
                         meta[uid][3])
        for uid, files in groups.items()
    }
    return found, unreadable


# ---------------------------------------------------------------------------------------------------------
# The label table
# ---------------------------------------------------------------------------------------------------------


def find_table(root: Path) -> Path:
    """``clinical.csv`` or ``labels.csv`` in ``root``, else its only CSV file. Raises DatasetError."""
    for name in TABLE_NAMES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    csvs = sorted(Path(root).glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise DatasetError(f"{root}: no label table (clinical.csv or labels.csv); pass one explicitly",
                       [f"found {len(csvs)} CSV files at the top level"])


def read_labels(path: Path) -> pd.DataFrame:
    """The label table with canonical column names (see the module docstring); comma-, semicolon- (a European
    spreadsheet's CSV) or tab-separated, as its header line shows. Raises DatasetError."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = f.readline()
        sep = max((",", ";", "\t"), key=header.count)  # ties (none of them): a one-column table, read as CSV
        table = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"cannot read label table {path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at "
                           f"offset {exc.start}); save it as UTF-8 CSV") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read label table {path}: {exc}") from exc
    rename = {}
    lower = {c: c.strip().lower().replace(" ", "_") for c in table.columns}
    for canonical, aliases in _ALIASES.items():
        hits = [c for c, low in lower.items() if low in aliases]
        if len(hits) > 1:
            raise DatasetError(f"{path}: columns {hits} all mean {canonical!r}; keep one")
        if hits:
            rename[hits[0]] = canonical
    table = table.rename(columns={**{c: lower[c] for c in table.columns}, **rename})
    if "label" not in table.columns:
        raise DatasetError(f"{path}: no 'label' column (0/1 or normal/pneumonia)", [f"columns: {list(table.columns)}"])
    if not {"series_instance_uid", "study_instance_uid", "case_id"} & set(table.columns):
        raise DatasetError(f"{path}: no column naming the series: series_instance_uid, study_instance_uid or case_id")
    return table


def _pick_series(candidates: list[SeriesFiles]) -> SeriesFiles:
    """The CT series with the most instances (then the smallest UID), else any with the most instances."""
    ct = [s for s in candidates if s.modality in IMAGE_MODALITIES] or candidates
    return sorted(ct, key=lambda s: (-len(s.files), s.series_uid))[0]


def _label_text(value: Any) -> str:
    """A label as duplicate rows are compared: 0/1 where it can be read ("Pneumonia" and 1.0 agree), else its text."""
    try:
        label = parse_label(value)
    except ValueError:
        return str(value).strip().lower()
    return "" if label is None else str(label)


def _duplicate_keys(df: pd.DataFrame, rows: list[dict[str, Any]]) -> tuple[list[str], set[int]]:
    """Keys on several table rows, one problem each naming the rows: a conflict when their labels differ, a
    duplicate otherwise; case ids that differ only in upper/lower case or spaces count as one (a spreadsheet's
    lookups do not tell them apart). Also the indices of the repeated rows (their join errors would say it again)."""
    problems, repeated = [], set()
    for key in ("series_instance_uid", "study_instance_uid", "case_id"):
        if key not in df.columns:
            continue
        at: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            value = str(r[key]).strip()
            if key == "study_instance_uid" and str(r.get("series_instance_uid", "")).strip():
                continue  # rows naming two series of one study are two cases
            if value:
                at[value.casefold() if key == "case_id" else value].append(i)
        for where in (w for w in at.values() if len(w) > 1):
            spelt = sorted({str(rows[i][key]).strip() for i in where})
            labels = sorted({_label_text(rows[i]["label"]) for i in where})
            kind = "conflicting labels" if len(labels) > 1 else "duplicate"
            value = spelt[0] if len(spelt) == 1 else " / ".join(spelt) + " (differing only in case or spaces)"
            problems.append(f"{kind}: {key} {value} is on rows {', '.join(str(i + 2) for i in where)} "
                            f"(labels {labels})")
            repeated.update(where[1:])
    return problems, repeated


class _RowError(Exception):
    """Why one table row gives no case (the message follows the row's position in the problem list)."""


class _RepeatedRowError(Exception):
    """A row repeating an earlier row's key: already reported with the duplicate key."""


@dataclass
class _Join:
    """Table rows joined to the series found, one row at a time, collecting problems and notes in table order."""

    root: Path
    table_name: str
    series: dict[str, SeriesFiles]
    problems: list[str]
    notes: list[str] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)  # series UID -> the row index that labels it
    repeated: set[int] = field(default_factory=set)  # rows whose key an earlier row has (reported once, as such)
    used_studies: set[str] = field(default_factory=set)
    by_study: dict[str, list[SeriesFiles]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_study: dict[str, list[SeriesFiles]] = defaultdict(list)
        for s in self.series.values():
            by_study[s.study_uid].append(s)
        self.by_study = dict(by_study)

    def row(self, i: int, r: dict[str, Any]) -> Case | None:
        """Row ``i``'s case, or None with the reason added to ``problems``."""
        where = f"row {i + 2} of {self.table_name}"  # 1-based, after the header line
        try:
            return self._case(i, r, where)
        except _RowError as exc:
            self.problems.append(f"{where}: {exc}")
            return None
        except _RepeatedRowError:
            return None

    def _case(self, i: int, r: dict[str, Any], where: str) -> Case:
        sid, stid, cid = (str(r.get(k, "")).strip() for k in ("series_instance_uid", "study_instance_uid", "case_id"))
        found = self._find(r, where, sid, stid, cid)
        if found.series_uid in self.used:
            if i in self.repeated:  # the duplicate key's problem names this row already
                raise _RepeatedRowError
            raise _RowError(f"series {found.series_uid} is already labelled by row {self.used[found.series_uid] + 2}")
        self.used[found.series_uid] = i  # a row refused below still claims its series (not "unlabelled" too)
        self.used_studies.add(found.study_uid)
        if refused := _not_ct(found):
            raise _RowError(f"series {found.series_uid} {refused}; only CT series can be used")
        label, reader = _row_labels(r)
        clinical, unreadable = clinical_values(r)
        if unreadable:
            raise _RowError("; ".join(unreadable))
        masks = self._masks(r)
        if "patient_id" in r and not str(r["patient_id"]).strip():  # the header's PatientID is another namespace
            raise _RowError("blank patient_id (fill it, or drop the column to group by the headers' PatientID)")
        patient = str(r.get("patient_id", "")).strip() or found.patient_id
        case_id = cid or sid or found.series_uid
        if not patient:
            patient = case_id
            self.notes.append(f"{where}: no patient id in the table or headers; the case is its own group")
        return Case(case_id=case_id, series_uid=found.series_uid, study_uid=found.study_uid, patient_id=patient,
                    label=label, reader_label=reader, files=found.files, masks=masks, clinical=clinical,
                    row=dict(r))

    def _find(self, r: dict[str, Any], where: str, sid: str, stid: str, cid: str) -> SeriesFiles:
        """The series a row names: by series UID, else by study UID, else by case folder."""
        if sid:
            return self._by_series(sid, stid)
        if stid:
            return self._by_study(where, stid)
        if cid:
            return self._by_case(r, cid)
        raise _RowError("names no series, study or case")

    def _by_series(self, sid: str, stid: str) -> SeriesFiles:
        found = self.series.get(sid)
        if found is None:
            raise _RowError(f"missing series {sid} (no DICOM file under the dataset folder has it)")
        if stid and found.study_uid != stid:
            raise _RowError(f"series {sid} belongs to study {found.study_uid}, not {stid}")
        return found

    def _by_study(self, where: str, stid: str) -> SeriesFiles:
        if stid not in self.by_study:
            raise _RowError(f"missing study {stid} (no DICOM file under the dataset folder has it)")
        found = _pick_series(self.by_study[stid])
        if len(self.by_study[stid]) > 1:
            self.notes.append(f"{where}: its study has {len(self.by_study[stid])} series; used the CT series with "
                              f"the most instances ({len(found.files)})")
        return found

    def _by_case(self, r: dict[str, Any], cid: str) -> SeriesFiles:
        folder = (self.root / (str(r.get("dicom_dir", "") or "").strip() or cid)).resolve()
        inside = [s for s in self.series.values() if s.files[0].resolve().is_relative_to(folder)]
        if not inside:
            what = "its dicom_dir" if str(r.get("dicom_dir", "") or "").strip() else "its case_id"
            raise _RowError(f"missing series for case {cid} (no DICOM series in the folder {what} names)")
        return _pick_series(inside)

    def _masks(self, r: dict[str, Any]) -> Path | None:
        if not str(r.get("masks", "")).strip():
            return None
        masks = self.root / str(r["masks"]).strip()
        if not masks.is_file():
            raise _RowError("the masks file its masks column names does not exist")
        return masks

    def unlabelled(self) -> list[str]:
        """CT series no row labels, outside the labelled studies (the others are noted as not used)."""
        out = []
        for s in sorted(self.series.values(), key=lambda s: s.series_uid):
            if s.series_uid in self.used:
                continue
            if s.study_uid in self.used_studies or s.modality not in IMAGE_MODALITIES:
                self.notes.append(f"a series ({s.modality or 'no modality'}, {len(s.files)} files in "
                                  f"{folder_tag(self.root, s.files[0].parent)}) not used")
                continue
            out.append(s.series_uid)
        return out


def _not_ct(s: SeriesFiles) -> str:
    """Why the node's gate would refuse series ``s`` (another modality or SOP class, one slice); "" if it would not."""
    if s.modality not in IMAGE_MODALITIES:
        return f"is {s.modality or 'without a modality'}"
    if s.sop_class not in IMAGE_SOP_CLASSES:
        return f"has SOP class {s.sop_class or 'none'}, not a CT image"
    if s.sop_class == CT_IMAGE and len(s.files) < 2:
        return f"has one slice ({s.files[0].name})"
    return ""


def _row_labels(r: dict[str, Any]) -> tuple[int, int | None]:
    """The row's label and reader label. Raises _RowError (unreadable or missing label)."""
    try:
        label = parse_label(r["label"])
        reader = parse_label(r.get("reader_label", ""))
    except ValueError as exc:
        raise _RowError(str(exc)) from exc
    if label is None:
        raise _RowError("no label")
    return label, reader


def load_dataset(
    root: str | Path,
    table: str | Path | None = None,
    *,
    allow_unlabelled: bool = False,
    progress: bool = False,
) -> Dataset:
    """Find the series under ``root`` and join them to the label table (default: :func:`find_table`).

    Raises DatasetError naming every problem (see the module docstring).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    table_path = Path(table) if table is not None else find_table(root)
    df = read_labels(table_path)
    rows = df.to_dict("records")
    blank = {i for i, r in enumerate(rows) if not any(str(v).strip() for v in r.values())}  # a spreadsheet's ",,,"
    if len(blank) == len(rows):
        raise DatasetError(f"{table_path.name} has no rows below its header line: nothing is labelled")
    series, unreadable = scan_series(root, progress=progress)
    if not series:
        raise DatasetError(f"{root}: no readable DICOM series", [f"{file_ref(root, p)}: {why}" for p, why in unreadable])
    problems, repeated = _duplicate_keys(df, rows)
    join = _Join(root, table_path.name, series, problems=problems, repeated=repeated)
    cases = [c for c in (join.row(i, r) for i, r in enumerate(rows) if i not in blank) if c is not None]
    unlabelled = join.unlabelled()
    skipped = [f"{len(unreadable)} files under {root} are not readable DICOM and were skipped"] if unreadable else []
    if unlabelled and allow_unlabelled:
        skipped.append(f"{len(unlabelled)} CT series the table does not label were left out (--allow-unlabelled)")
    if unlabelled and not allow_unlabelled:
        join.problems.extend(
            f"unlabelled series {u} ({len(series[u].files)} files in {folder_tag(root, series[u].files[0].parent)})"
            for u in unlabelled)
    if join.problems:
        raise DatasetError(f"dataset {root} with {table_path.name}: {len(join.problems)} problems", join.problems)
    if not cases:
        raise DatasetError(f"dataset {root}: the table labels no series")
    if len(set(c.label for c in cases)) < 2:
        join.notes.append("only one class is labelled")
    if blank:
        join.notes.append(f"{len(blank)} blank rows of {table_path.name} skipped")
    return Dataset(root=root, table_path=table_path, cases=cases, unreadable=unreadable, unlabelled=unlabelled,
                   notes=[*skipped, *join.notes])
