"""models.clinical: the fusion vector's layout and missing indicators, and the conservative header mapping."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from models.clinical import (
    AGE_SEX,
    AGE_SEX_SYMPTOMS,
    ClinicalError,
    ClinicalInputs,
    encode,
    feature_count,
    from_header,
    header_text,
    symptoms_from_text,
)


def test_vector_layout_value_and_missing_indicator_per_input() -> None:
    v = encode(ClinicalInputs(age=75.0, sex="M", fever=1.0, cough=None, dyspnoea=0.0), AGE_SEX_SYMPTOMS)
    np.testing.assert_allclose(v, [1.0, 0, 1, 0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(encode(ClinicalInputs(), AGE_SEX_SYMPTOMS), [0, 1, 0, 0, 0, 1, 0, 1, 0, 1])
    assert feature_count(AGE_SEX) == 4 and feature_count(AGE_SEX_SYMPTOMS) == 10


def test_inputs_outside_used_are_missing_and_unknown_names_refused() -> None:
    full = ClinicalInputs(age=40.0, sex="F", fever=1.0, cough=1.0, dyspnoea=1.0)
    np.testing.assert_array_equal(encode(full, AGE_SEX_SYMPTOMS, ()), encode(ClinicalInputs(), AGE_SEX_SYMPTOMS))
    np.testing.assert_allclose(encode(full, AGE_SEX_SYMPTOMS, ("cough",)), [0, 1, 0, 0, 0, 1, 1, 0, 0, 1])
    with pytest.raises(ClinicalError, match="not in clinical schema"):
        encode(full, AGE_SEX, ("fever",))
    with pytest.raises(ClinicalError, match="unknown clinical schema"):
        encode(full, "age-only")


def test_table_rows_blank_and_unreadable_values_are_missing() -> None:
    c = ClinicalInputs.from_mapping({"age": "", "sex": "female", "fever": "1", "cough": "n/a", "dyspnea": "no"})
    assert (c.age, c.sex, c.fever, c.cough, c.dyspnoea) == (None, "F", 1.0, None, 0.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("Fever and productive cough for 3 days", (1.0, 1.0, None)),
    ("Shortness of breath; denies cough", (None, 0.0, 1.0)),
    ("no cough, febrile", (1.0, 0.0, None)),  # the negation stops at the comma
    ("afebrile, dyspnoea on exertion", (0.0, None, 1.0)),
    ("cough but no fever", (0.0, 1.0, None)),
    ("fever. no fever", (None, None, None)),  # contradictory: missing, never guessed
    ("R/O pneumonia", (None, None, None)),  # a suspected diagnosis is not a symptom
    ("CT THORAX", (None, None, None)),
    ("SOB", (None, None, None)),  # abbreviations are not mapped
    ("coughing, breathless, pyrexial", (1.0, 1.0, 1.0)),
    ("", (None, None, None)),
])
def test_symptom_keywords_are_conservative(text: str, expected: tuple) -> None:
    got = symptoms_from_text(text)
    assert (got["fever"], got["cough"], got["dyspnoea"]) == expected


def test_from_header_reads_request_text_and_leaves_absent_fields_missing() -> None:
    ds = Dataset()
    ds.ReasonForStudy = "Fever, cough"
    ds.AdmittingDiagnosesDescription = ["Community acquired pneumonia?", "Dyspnoea"]
    ds.RequestedProcedureDescription = "CT CHEST"
    c = from_header(ds, age=63.0, sex="m")
    assert (c.age, c.sex, c.fever, c.cough, c.dyspnoea) == (63.0, "M", 1.0, 1.0, 1.0)
    assert "Dyspnoea" in header_text(ds)
    bare = from_header(Dataset(), age=None, sex="O")
    assert bare.missing() == ["age", "sex", "fever", "cough", "dyspnoea"]
    assert from_header(None).present() == []


def test_describe_for_the_report() -> None:
    c = ClinicalInputs(age=62.6, sex="F", fever=0.0)
    assert [c.describe(n) for n in ("age", "sex", "fever", "cough")] == ["63 years", "F", "absent", "missing"]


def test_a_sex_with_a_leading_space_is_read(tmp_path) -> None:
    """PS3.5: a CS value's leading and trailing spaces are not significant, and pydicom strips only the trailing ones:
    a modality writing " F" had the classifier fuse sex as missing (found by the odd-headers review)."""
    from models.preprocess import load_series
    from tests.ctgen import write_ct_series

    series = write_ct_series(tmp_path / "ct", slices=4, size=16, seed=3)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PatientSex = " F"
        ds.save_as(path)
    volume = load_series(series.paths)
    assert volume.patient_sex == "F"
    assert from_header(None, age=None, sex=" m").sex == "M"
