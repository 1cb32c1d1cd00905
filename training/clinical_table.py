"""The label table's clinical values (age, sex, symptoms) and how they meet the DICOM header's age and sex.

:func:`clinical_values` reads one row: age in years — a number, a DICOM age string (``45Y``, ``045Y``, ``6M``,
``3W``, ``10D``) or the "90 or older" category of de-identified exports (``>89``, ``90+``), read as 90 — sex
M/F/O/U (male/female/other/unknown), a symptom 1/0, yes/no, true/false or present/absent; blank is missing. A
value that cannot be read is a problem naming its column; an age is never echoed.

:func:`age_sex` decides between the table and the header where both give age or sex: **the table wins**. It is the
curated source — research exports often pass a de-identifier that caps ages, shifts dates or blanks sex, while the
node reads the scanner's original header, which the curated table stands for — and the training README says the
classifier fuses the table's clinical values. The header fills in what the table leaves blank (or gives as sex
U). Disagreements (ages a year or more apart, unless both are 90 or older; another sex) are counted, never shown,
and said once per run. Symptoms come only from the table (a header's request text is read only by the node).
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_AGE = 125.0
OLDEST_CATEGORY = 90.0  # HIPAA Safe Harbor's "90 or older": de-identified exports write >89 or 90+
CLINICAL_COLUMNS = ("age", "sex", "fever", "cough", "dyspnoea")
SEXES = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O", "u": "U", "unknown": "U"}
FLAGS = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "yes": 1.0, "no": 0.0, "true": 1.0, "false": 0.0,
         "present": 1.0, "absent": 0.0}
_LABEL_WORDS = {
    "1": 1, "0": 0, "1.0": 1, "0.0": 0, "pneumonia": 1, "normal": 0, "positive": 1, "negative": 0,
    "yes": 1, "no": 0, "true": 1, "false": 0, "abnormal": 1,
}
_AGE_UNITS = {"d": 365.25, "w": 52.18, "m": 12.0, "y": 1.0}
_DICOM_AGE = re.compile(r"(\d{1,3})\s*([dwmy])")
_OLDEST = re.compile(r"(>\s*89|>=\s*90|90\s*\+)(\s*y(ears?)?)?")


def parse_label(value: Any) -> int | None:
    """0/1 from 0, 1, normal/pneumonia, negative/positive, no/yes, false/true; None when empty; else ValueError."""
    text = str(value).strip().lower()
    if text in ("", "nan", "na", "none"):
        return None
    if text not in _LABEL_WORDS:
        raise ValueError(f"cannot read {value!r} as a label (0/1, normal/pneumonia, negative/positive)")
    return _LABEL_WORDS[text]


def parse_age(text: str) -> float | None:
    """Years from a table's age cell (see the module docstring); None when blank. Raises ValueError (no value in
    its message: an age is not echoed)."""
    t = str(text).strip().lower()
    if t in ("", "nan"):
        return None
    if _OLDEST.fullmatch(t):
        return OLDEST_CATEGORY
    if m := _DICOM_AGE.fullmatch(t):
        age = int(m.group(1)) / _AGE_UNITS[m.group(2)]
    else:
        try:
            age = float(t)
        except ValueError:
            age = float("nan")
    if not 0.0 <= age <= MAX_AGE:  # NaN fails too
        raise ValueError(f"column 'age': not a number of years from 0 to {MAX_AGE:g} (or 45Y, >89)")
    return age


def clinical_values(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The row's clinical values (age in years, sex M/F/O/U, symptoms 1.0/0.0; blank or NaN left out) and a
    problem per value that cannot be read, naming the column (an age is not echoed)."""
    out: dict[str, Any] = {}
    problems = []
    for col in CLINICAL_COLUMNS:
        text = str(row.get(col, "")).strip()
        if text.lower() in ("", "nan"):
            continue
        if col == "age":
            try:
                out[col] = parse_age(text)
            except ValueError as exc:
                problems.append(str(exc))
        elif col == "sex":
            if text.lower() not in SEXES:
                problems.append(f"column 'sex': cannot read {text!r} (M/F/O/U, male/female/other/unknown)")
                continue
            out[col] = SEXES[text.lower()]
        elif text.lower() not in FLAGS:
            problems.append(f"column {col!r}: cannot read {text!r} (1/0, yes/no, true/false, present/absent; "
                            "blank when unknown)")
        else:
            out[col] = FLAGS[text.lower()]
    return out, problems


def _age(value: Any) -> float | None:
    if value is None:
        return None
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) else None


def _sex(value: Any) -> str | None:
    s = str(value or "").strip().upper()
    return s if s in ("M", "F", "O") else None


def age_sex(table: dict[str, Any], header_age: Any, header_sex: Any) -> tuple[float | None, str | None, bool]:
    """The age and sex training uses for a case — the table's, else the header's — and whether the two disagreed
    (see the module docstring)."""
    t_age, h_age = _age(table.get("age")), _age(header_age)
    t_sex, h_sex = _sex(table.get("sex")), _sex(header_sex)
    age_differs = (t_age is not None and h_age is not None and abs(t_age - h_age) >= 1.0
                   and not min(t_age, h_age) >= OLDEST_CATEGORY)
    sex_differs = t_sex is not None and h_sex is not None and t_sex != h_sex
    age = t_age if t_age is not None else h_age
    sex = t_sex if t_sex is not None else h_sex
    return age, sex, age_differs or sex_differs


def disagreement_note(n: int, total: int, where: str = "") -> str:
    """The run's one line about header/table disagreements ("" when none): a count, no values."""
    if not n:
        return ""
    return (f"{where}the DICOM header's age or sex disagrees with the table on {n} of {total} series; the table's "
            "values are used (the node reads only the header: check the table or the export)")
