"""The classifier's clinical inputs: what they are, how they are encoded, and how they are read from a DICOM header.

A classifier version fuses a fixed *clinical schema* with the image; its model card names it under
``clinical_inputs.schema`` (cards without it are ``age-sex``, the 1.x encoding):

- ``age-sex`` (4 features): age scaled, age missing, sex M, sex F (unknown sex: both 0).
- ``age-sex-symptoms`` (10 features): the four above, then value + missing indicator for fever, cough and
  dyspnoea (value 1 present, 0 absent; missing → value 0, indicator 1). Nothing missing is ever guessed.

A version may use only some of its schema's inputs (``clinical_inputs.used``; the image-only ablation uses
none): the others are always encoded as missing, in training and at inference alike.

:func:`from_header` reads age and sex (PatientAge, else PatientBirthDate against StudyDate; PatientSex) and maps the
free text of ReasonForStudy, AdmittingDiagnosesDescription, RequestedProcedureDescription and
ReasonForTheRequestedProcedure to symptoms with a conservative keyword list (:data:`SYMPTOM_TERMS`):

- a term found, not negated → present (1);
- a term found only negated (``no``/``denies``/``without``/``negative for`` up to three words before it, ``non``
  just before it, answered no as in ``Fever: No``, or a negated form such as ``afebrile``) → absent (0);
- both, or no term at all → missing: a request that does not mention fever says nothing about fever.

Raises :class:`ClinicalError` for an unknown schema or input name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import ModelError

SYMPTOMS = ("fever", "cough", "dyspnoea")
INPUTS = ("age", "sex", *SYMPTOMS)
AGE_SEX = "age-sex"
AGE_SEX_SYMPTOMS = "age-sex-symptoms"
SCHEMAS: dict[str, tuple[str, ...]] = {AGE_SEX: ("age", "sex"), AGE_SEX_SYMPTOMS: INPUTS}
FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    AGE_SEX: ("age_scaled", "age_missing", "sex_m", "sex_f"),
    AGE_SEX_SYMPTOMS: ("age_scaled", "age_missing", "sex_m", "sex_f", "fever", "fever_missing", "cough",
                       "cough_missing", "dyspnoea", "dyspnoea_missing"),
}
# Header attributes whose free text may name symptoms (all optional; the first four are the ones modalities and
# RIS commonly fill).
TEXT_ATTRIBUTES = ("ReasonForStudy", "AdmittingDiagnosesDescription", "RequestedProcedureDescription",
                   "ReasonForTheRequestedProcedure")
# Conservative: only words that name the symptom itself (no "SOB", no "infection", no "pneumonia" — a suspected
# diagnosis is not a symptom). Matched as whole words, case-insensitive.
SYMPTOM_TERMS: dict[str, tuple[str, ...]] = {
    "fever": ("fever", "fevers", "febrile", "pyrexia", "pyrexial", "pyrexic"),
    "cough": ("cough", "coughs", "coughing"),
    "dyspnoea": ("dyspnoea", "dyspnea", "dyspnoeic", "dyspneic", "breathless", "breathlessness",
                 "shortness of breath", "short of breath"),
}
# Words that state the symptom's absence on their own.
NEGATED_TERMS: dict[str, tuple[str, ...]] = {"fever": ("afebrile", "apyrexial"), "cough": (), "dyspnoea": ()}
NEGATIONS = ("no", "not", "denies", "denied", "without", "negative for", "free of", "absent")
_NEGATION_WINDOW = 3  # words between a negation and the term it negates


class ClinicalError(ModelError):
    """An unknown clinical schema or input name."""


@dataclass(frozen=True)
class ClinicalInputs:
    """One patient's clinical inputs; None = missing. Symptoms are 1.0 (present) or 0.0 (absent)."""

    age: float | None = None
    sex: str | None = None
    fever: float | None = None
    cough: float | None = None
    dyspnoea: float | None = None

    def value(self, name: str) -> Any:
        if name not in INPUTS:
            raise ClinicalError(f"unknown clinical input {name!r} (known: {INPUTS})")
        v = getattr(self, name)
        if name == "sex":
            return v if v in ("M", "F") else None
        if v is None or not math.isfinite(float(v)):
            return None
        return float(v)

    def only(self, names: Iterable[str]) -> ClinicalInputs:
        """These inputs with every input not in ``names`` set missing."""
        keep = set(names)
        return ClinicalInputs(**{n: (getattr(self, n) if n in keep else None) for n in INPUTS})

    def present(self, names: Sequence[str] = INPUTS) -> list[str]:
        return [n for n in names if self.value(n) is not None]

    def missing(self, names: Sequence[str] = INPUTS) -> list[str]:
        return [n for n in names if self.value(n) is None]

    def describe(self, name: str) -> str:
        """``name``'s value as text for a report ("63 years", "M", "present", "absent"; "missing")."""
        v = self.value(name)
        if v is None:
            return "missing"
        if name == "age":
            return f"{v:.0f} years"
        if name == "sex":
            return str(v)
        return "present" if v >= 0.5 else "absent"

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> ClinicalInputs:
        """From a table row (``age``, ``sex``, ``fever``, ``cough``, ``dyspnoea``/``dyspnea``; blanks, NaN and
        unreadable values are missing)."""
        def num(v: Any) -> float | None:
            try:
                f = float(v)
            except (TypeError, ValueError):
                return None
            return f if math.isfinite(f) else None

        def flag(v: Any) -> float | None:
            f = num(v)
            if f is None:
                text = str(v).strip().lower()
                f = {"yes": 1.0, "true": 1.0, "present": 1.0, "no": 0.0, "false": 0.0, "absent": 0.0}.get(text)
            return None if f is None else float(f >= 0.5)

        sex = str(row.get("sex") or "").strip().upper()[:1] or None
        return cls(age=num(row.get("age")), sex=sex if sex in ("M", "F") else None, fever=flag(row.get("fever")),
                   cough=flag(row.get("cough")), dyspnoea=flag(row.get("dyspnoea", row.get("dyspnea"))))


def schema_inputs(schema: str) -> tuple[str, ...]:
    """The inputs a schema encodes. Raises ClinicalError."""
    if schema not in SCHEMAS:
        raise ClinicalError(f"unknown clinical schema {schema!r} (known: {sorted(SCHEMAS)})")
    return SCHEMAS[schema]


def feature_count(schema: str) -> int:
    schema_inputs(schema)
    return len(FEATURE_NAMES[schema])


def encode(inputs: ClinicalInputs, schema: str = AGE_SEX_SYMPTOMS, used: Sequence[str] | None = None) -> np.ndarray:
    """The (features,) float32 vector of ``inputs`` under ``schema``; inputs outside ``used`` (default: all of the
    schema's) are encoded as missing. Raises ClinicalError."""
    names = schema_inputs(schema)
    if used is not None:
        unknown = [n for n in used if n not in names]
        if unknown:
            raise ClinicalError(f"inputs {unknown} are not in clinical schema {schema!r} {names}")
        inputs = inputs.only(used)
    age, sex = inputs.value("age"), inputs.value("sex")
    out = [0.0 if age is None else float(np.clip((age - 55.0) / 20.0, -3.0, 3.0)), float(age is None),
           float(sex == "M"), float(sex == "F")]
    for name in names[2:]:
        v = inputs.value(name)
        out += [0.0 if v is None else v, float(v is None)]
    return np.asarray(out, dtype=np.float32)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _find(words: list[str], term: str) -> list[int]:
    t = term.split()
    return [i for i in range(len(words) - len(t) + 1) if words[i : i + len(t)] == t]


def _negated(words: list[str], at: int) -> bool:
    before = " ".join(words[max(0, at - _NEGATION_WINDOW - 1) : at])
    # "non-febrile" negates; "non-productive cough" (two words before) is a cough
    return (at > 0 and words[at - 1] == "non") or any(re.search(rf"\b{n}\b", before) for n in NEGATIONS)


# A finding answered no, as a request form's checklist writes it ("Fever: No", "cough - negative"): the answer ends
# its clause. Rewritten "no <finding>;" before the text is cut into clauses.
_ANSWERED_NO = re.compile(r"([a-z][a-z ]*?)\s*(?::|=|\s-)\s*(?:no|none|negative|neg|absent|nil|denied|denies)"
                          r"(?=\s*(?:[,;.:/()\n]|\band\b|$))")


def symptoms_from_text(text: str) -> dict[str, float | None]:
    """Each symptom present (1.0), absent (0.0) or missing (None) per the rules in the module docstring. A
    negation reaches only within its clause (up to a comma, semicolon, full stop, colon, slash or "but"); a
    finding answered no ("Fever: No", `_ANSWERED_NO`) is negated."""
    text = _ANSWERED_NO.sub(r"no \1;", (text or "").lower())  # the answer ended its clause: so does the rewrite
    clauses = [_words(c) for c in re.split(r"[,;.:/()\n]|\bbut\b", text)]
    out: dict[str, float | None] = {}
    for name in SYMPTOMS:
        hits = [_negated(w, i) for w in clauses for term in SYMPTOM_TERMS[name] for i in _find(w, term)]
        hits += [True for w in clauses for term in NEGATED_TERMS[name] for _ in _find(w, term)]
        positive, negative = any(not h for h in hits), any(hits)
        out[name] = 1.0 if positive and not negative else 0.0 if negative and not positive else None
    return out


def header_value(ds: Any, keyword: str) -> Any:
    """``ds``'s value for ``keyword``; None when absent or malformed (bytes that do not fit the VR: pydicom raises
    BytesLengthException, ValueError, … on reading it) — a header value the models cannot read is a missing input,
    never a failed series."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many types for one malformed value
        return None


def header_str(ds: Any, keyword: str) -> str:
    """`header_value` as text ("" when absent or malformed)."""
    value = header_value(ds, keyword)
    return str(value) if value is not None else ""


def header_text(ds: Any) -> str:
    """The header's free-text request fields (:data:`TEXT_ATTRIBUTES`), joined; empty when there are none."""
    parts = []
    for keyword in TEXT_ATTRIBUTES:
        value = header_value(ds, keyword)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        parts += [str(v) for v in values if str(v).strip()]
    return " ; ".join(parts)


# PatientAge as DICOM writes it (nnnD/W/M/Y) and as some senders do: without the zero padding, in lower case, with
# spaces ("45Y", "011y", "6 M"). A bare number has no unit and reads as no age.
_AGE = re.compile(r"\s*0*(\d{1,3})\s*([DWMY])\s*", re.IGNORECASE)
_SCAN_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def patient_age_years(ds: Any) -> float | None:
    """Age in years from PatientAge (nnnD/W/M/Y, or written loosely: `_AGE`), else PatientBirthDate against
    StudyDate (else the Series, Acquisition or Content Date); else None. An age of zero ("000Y": what some systems
    write for "unknown") falls back to the dates too. The one age reader: the gate's age check and the
    classifier's clinical input read the same age."""
    m = _AGE.fullmatch(header_str(ds, "PatientAge"))
    if m and int(m.group(1)):
        n = float(m.group(1))
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2).upper()]
    birth = header_str(ds, "PatientBirthDate")
    # StudyDate is Type 2 (empty for a scan without a worklist entry): the series, acquisition or image date the
    # scan as well.
    study = next((d for k in _SCAN_DATES if len(d := header_str(ds, k)) == 8 and d.isdigit()), "")
    if len(birth) == 8 and len(study) == 8 and birth.isdigit() and study.isdigit():
        years = int(study[:4]) - int(birth[:4]) - ((int(study[4:8]) < int(birth[4:8])) * 1)
        return float(years) if 0 <= years < 130 else None
    return None


def from_header(ds: Any, *, age: float | None = None, sex: str | None = None) -> ClinicalInputs:
    """The clinical inputs one DICOM header offers: ``age``/``sex`` as parsed by the caller (e.g. the
    :class:`models.preprocess.Volume`'s), symptoms from the request text (see the module docstring)."""
    symptoms = symptoms_from_text(header_text(ds)) if ds is not None else dict.fromkeys(SYMPTOMS)
    s = (sex or "").strip().upper()
    return ClinicalInputs(age=age, sex=s if s in ("M", "F") else None, **symptoms)
