"""Tests for node.results.attributes: valid source values of every VR and VM reach the SR and SEG as sent.

The series is written and read back as the node reads its spool, so the values are pydicom's converted types
(DSfloat, IS, MultiValue): a valid Patient's Weight was refused by type and several values where the dictionary
allows them (VM 1-n) were refused as "single-valued", so a de-identified source's SR and SEG lost the Type 1C
De-identification Method that dciodvfy requires. Malformed values are still dropped (see test_fuzz_results).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset

from node.results import AlgorithmIdentity, SkipReason, build_results, build_skipped_sr
from tests.unit.results_support import cached_series, dciodvfy_errors, read_back_strictly, sent_as_spooled
from tests.unit.test_results import needs_dciodvfy  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="attributes-model", version="0.0.1")
NUMBERS = {  # DS, as a sender writes them
    "PatientWeight": "72.5", "PatientSize": "1.78", "PatientBodyMassIndex": "22.9", "MeasuredAPDimension": "301.5",
    "MeasuredLateralDimension": "355",
}
MULTI = {  # VM 1-n
    "DeidentificationMethod": ["DICOM PS3.15 Basic Profile", "Retain Longitudinal Temporal Information"],
    "OtherPatientNames": ["Smith^Jane", "Doe^Jane"],
    "AdmittingDiagnosesDescription": ["Fever", "Cough"],
    "PhysiciansOfRecord": ["House^Gregory", "Wilson^James"],
    "NameOfPhysiciansReadingStudy": ["Cuddy^Lisa", "Foreman^Eric"],
    "ConsultingPhysicianName": ["Chase^Robert", "Cameron^Allison"],
    "Allergies": ["Penicillin", "Latex"],
    "MedicalAlerts": ["Pacemaker", "Diabetic"],
}


def _built(sources: list[Dataset]) -> dict[str, Dataset]:
    results = build_results(sources, cached_series()[1], ALGORITHM)
    assert results.seg is not None
    return {"sr": results.sr, "seg": results.seg,
            "skipped": build_skipped_sr(sources, SkipReason.NOT_CT, "detail", ALGORITHM)}


def _with(values: dict[str, object]) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return mutate


def test_valid_decimal_strings_reach_every_result() -> None:
    for kind, built in _built(sent_as_spooled(_with(NUMBERS))).items():
        back = read_back_strictly(built)
        assert {k: str(back[k].value) if k in back else None for k in NUMBERS} == NUMBERS, kind


def test_malformed_decimal_strings_are_still_dropped() -> None:
    def mutate(ds: Dataset) -> None:
        _with(NUMBERS)(ds)
        ds.PatientWeight = "72.500000000000001"  # a number, but more than a DS's 16 characters
    for kind, built in _built(sent_as_spooled(mutate)).items():
        back = read_back_strictly(built)
        assert "PatientWeight" not in back, kind
        assert str(back.PatientSize.original_string) == "1.78", kind


def test_valid_multiple_values_reach_every_result() -> None:
    for kind, built in _built(sent_as_spooled(_with({"PatientIdentityRemoved": "YES", **MULTI}))).items():
        back = read_back_strictly(built)
        assert {k: [str(v) for v in back[k].value] if k in back else None for k in MULTI} == MULTI, kind
        assert back.PatientIdentityRemoved == "YES"


def test_each_of_several_values_is_checked_and_one_value_attributes_keep_one() -> None:
    def mutate(ds: Dataset) -> None:
        _with(MULTI)(ds)
        ds.AdmittingDiagnosesDescription = ["Fever", "X" * 65]  # LO holds 64 characters
        ds.PatientSex = ["M", "F"]  # VM 1
    for kind, built in _built(sent_as_spooled(mutate)).items():
        back = read_back_strictly(built)
        assert "AdmittingDiagnosesDescription" not in back, kind
        assert back.PatientSex == "", kind  # Type 2: emptied
        assert [str(v) for v in back.OtherPatientNames] == MULTI["OtherPatientNames"], kind


@pytest.mark.usefixtures("needs_dciodvfy")
def test_dciodvfy_accepts_results_of_a_deidentified_source(tmp_path: Path) -> None:
    sources = sent_as_spooled(_with({"PatientIdentityRemoved": "YES", **MULTI}))
    for kind, built in _built(sources).items():
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy_errors(path)
        assert errors == [], (kind, errors)  # was: Type 1C DeidentificationMethod missing
        assert all("99PACSAI" in w for w in warnings), (kind, warnings)
