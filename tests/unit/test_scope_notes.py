"""node.pipelines.base.scope_notes: a verdict's SR states its scope — what was checked on the series and, so that a
reader sees the gap, what was not (contrast from the header only, a [gate] check switched off, an age the header
lacks). Before, the SR said "not for clinical use" and nothing about which series a verdict can be trusted on."""

from __future__ import annotations

from types import SimpleNamespace

from pydicom.dataset import Dataset

from node.config import GateSection
from node.pipelines.base import scope_notes


def _volume(**header: str) -> SimpleNamespace:
    ds = Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    return SimpleNamespace(datasets=[ds])


def test_the_default_checks_are_named_and_contrast_is_said_to_come_from_the_header_and_the_image() -> None:
    lines = scope_notes(_volume(PatientAge="063Y"), 256, GateSection())  # type: ignore[arg-type]
    assert len(lines) == 3
    assert "adults (18 years or older)" in lines[0] and "at least 256 px" in lines[0] and "phantoms" in lines[0]
    assert "at least 16" in lines[1] and "the 256 px matrix" in lines[1] and "Hounsfield units" in lines[1]
    assert "Not checked" not in lines[1]
    assert lines[2].startswith("Contrast: checked in the header (Contrast/Bolus Agent empty or none) and in the image")
    assert "at most 30 mL between the lungs at 130 HU or more" in lines[2] and "cannot be recognised" in lines[2]


def test_without_the_image_check_contrast_comes_from_the_header_only() -> None:
    lines = scope_notes(_volume(PatientAge="063Y"), 256, GateSection(scope_check=False))  # type: ignore[arg-type]
    assert lines[2].startswith("Contrast: checked in the header only") and "needs [gate] scope_check" in lines[2]


def test_switched_off_checks_are_stated_as_not_made() -> None:
    settings = GateSection(scope_check=False, refuse_contrast=False, min_slices=24)
    lines = scope_notes(_volume(PatientBirthDate="19600101", StudyDate="20260101"), 256, settings)  # type: ignore[arg-type]
    assert "at least 24" in lines[1] and "Not checked ([gate] scope_check = false" in lines[1]
    assert "the 256 px matrix" not in lines[1]
    assert lines[2].startswith("Contrast: not checked ([gate] refuse_contrast = false")
    assert len(lines) == 3  # the age comes from the dates


def test_an_age_the_header_lacks_is_stated() -> None:
    for volume in (_volume(), _volume(PatientAge="000Y"), SimpleNamespace(datasets=[])):
        lines = scope_notes(volume, 0, GateSection())  # type: ignore[arg-type]
        assert lines[-1].startswith("Patient age: not in the header") and "not checked" in lines[-1]
        assert "no smallest matrix stated" in lines[0] and "px matrix" not in lines[1]
