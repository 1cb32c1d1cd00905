"""Review of the result builders' inputs (node.results): real CT headers from pydicom's test data (other vendors,
converters and de-identifiers than tests/ctgen), put into a series and read the way the worker reads it —
`models.preprocess.load_series` for a processed series, `dcmread(stop_before_pixels=True)` per file for a "not
processed" report — and odd but valid or malformed patient values on the ctgen series.

What failed before the fixes in node/results/attributes.py and content.py:
- explicit_VR-UN.dcm (a TCIA Pancreas-CT image, converted by CTP: its standard attributes are sent as explicit
  UN): every UN element was taken for a wrong VR and dropped, so the results lost Patient's Name, Patient ID,
  Study ID, Study Time and Study Description, and the "not processed" SR failed to build (Study Instance UID
  dropped too): no object at all, an unreported series.
- 693_UNCI.dcm (a CQ500 head CT, de-identified: Patient Identity Removed YES without a De-identification Method):
  every result copied the YES, so dciodvfy: "Error - Missing attribute Type 1C Conditional
  Element=<DeidentificationMethod> Module=<Patient>".
- A Person Name of six components (PS3.5 6.2.1.1 allows five) was copied: dciodvfy "Error - Value invalid for
  this VR - (0x0010,0x0010) PN Patient's Name ... Too many delimiters (^) in PersonName".
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.preprocess import load_series
from node.results import AlgorithmIdentity, Findings, SkipReason, build_results, build_skipped_sr
from tests.unit.results_support import cached_series, dciodvfy_errors, read_back_strictly, sent_as_spooled
from tests.unit.test_results import needs_dciodvfy  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALGORITHM = AlgorithmIdentity(name="review-model", version="0.0.1")
WHEN = dt.datetime(2026, 1, 1)
SLICES = 3
COPIED = ("PatientName", "PatientID", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "StudyInstanceUID")


def _real_series(name: str, tmp_path: Path) -> list[Path]:
    """``SLICES`` files carrying the header of pydicom's test file ``name`` as sent (raw elements and their VRs
    kept), each its own instance 2.5 mm apart, with native zero pixels (no decoder needed), in a frame of reference
    (the gate refuses a series without one)."""
    source = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    if "FrameOfReferenceUID" not in source:
        source.FrameOfReferenceUID = generate_uid(entropy_srcs=[name])
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(SLICES):
        ds = copy.deepcopy(source)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, str(i)])
        ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * i]
        ds.add_new(0x7FE00010, "OW", np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.int16).tobytes())
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _findings(rows: int, columns: int) -> Findings:
    lungs = np.zeros((SLICES, rows, columns), dtype=bool)
    lungs[:, rows // 5: rows * 4 // 5, columns // 10: columns * 4 // 10] = True
    lungs[:, rows // 5: rows * 4 // 5, columns * 6 // 10: columns * 9 // 10] = True
    lesion = np.zeros_like(lungs)
    lesion[1, rows // 2: rows // 2 + 20, columns // 5: columns // 5 + 20] = True
    return Findings(probability=0.8, threshold=0.5, attention=np.array([0.2, 0.5, 0.3]), lungs=lungs, lesion=lesion)


def _built_as_the_worker_does(paths: list[Path]) -> dict[str, Dataset]:
    volume = load_series([str(p) for p in paths])  # the processed path: headers from load_series
    results = build_results(volume.datasets, _findings(*volume.shape[1:]), ALGORITHM, fallback_datetime=WHEN)
    assert results.seg is not None and results.key_images is not None
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]  # the worker's _header, for _skip
    skipped = build_skipped_sr(headers, SkipReason.NOT_CT, "detail", ALGORITHM, fallback_datetime=WHEN)
    return {"sr": results.sr, "seg": results.seg, "kos": results.key_images, "skipped": skipped}


def _sent_values(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {keyword: str(ds[keyword].value).strip() for keyword in COPIED if keyword in ds}


def test_a_header_sent_as_explicit_un_reaches_every_result(tmp_path: Path) -> None:
    paths = _real_series("explicit_VR-UN.dcm", tmp_path)
    assert pydicom.dcmread(paths[0]).get_item(0x00100010).VR == "UN"  # as CTP wrote it
    sent = _sent_values(paths[0])
    assert sent["PatientName"] and sent["StudyID"] and sent["StudyDescription"]
    for kind, built in _built_as_the_worker_does(paths).items():
        back = read_back_strictly(built)
        wanted = sent if kind != "kos" else {k: v for k, v in sent.items() if k != "StudyDescription"}
        assert {k: str(back[k].value) for k in wanted if k in back} == wanted, kind
        assert back["PatientName"].VR == "PN" and back["StudyInstanceUID"].VR == "UI", kind


@pytest.mark.usefixtures("needs_dciodvfy")
@pytest.mark.parametrize("name", ["explicit_VR-UN.dcm", "693_UNCI.dcm", "CT_small.dcm"])
def test_results_of_real_ct_headers_are_dciodvfy_clean(name: str, tmp_path: Path) -> None:
    paths = _real_series(name, tmp_path / "in")
    for kind, built in _built_as_the_worker_does(paths).items():
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy_errors(path)  # warnings: the sources' own (a retired PN form, no Study ID)
        assert errors == [], (name, kind, errors)


def test_identity_removed_without_a_method_is_not_copied(tmp_path: Path) -> None:
    paths = _real_series("693_UNCI.dcm", tmp_path)
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert source.PatientIdentityRemoved == "YES" and "DeidentificationMethod" not in source
    for kind, built in _built_as_the_worker_does(paths).items():
        back = read_back_strictly(built)
        assert "PatientIdentityRemoved" not in back, kind
        assert str(back.PatientName) == str(source.PatientName), kind


def test_identity_removed_with_a_method_is_still_copied() -> None:
    def mutate(ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "DICOM PS3.15 Basic Profile"
    results = build_results(sent_as_spooled(mutate), cached_series()[1], ALGORITHM)
    back = read_back_strictly(results.sr)
    assert back.PatientIdentityRemoved == "YES" and back.DeidentificationMethod == "DICOM PS3.15 Basic Profile"


@pytest.mark.usefixtures("needs_dciodvfy")
def _every_result(sources: list[Dataset]) -> list[tuple[str, Dataset]]:
    """(kind, object) for each result built from ``sources``: the SR, SEG and key images, and a "not processed" SR."""
    results = build_results(sources, cached_series()[1], ALGORITHM)
    skipped = build_skipped_sr(sources, SkipReason.NOT_CT, "detail", ALGORITHM)
    built = [("sr", results.sr), ("seg", results.seg), ("kos", results.key_images), ("skipped", skipped)]
    assert all(ds is not None for _, ds in built)
    return [(kind, ds) for kind, ds in built if ds is not None]


def test_a_person_name_of_six_components_is_blanked_and_five_are_kept(tmp_path: Path) -> None:
    five = "Doe^John^Q^Dr.^Jr.=ドウ^ジョン=どう^じょん"  # three groups of at most five components: valid

    def mutate(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = five
        ds.ReferringPhysicianName = "Smith^Anne^B^C^D^E"  # six components

    sources = sent_as_spooled(mutate)
    for kind, built in _every_result(sources):
        back = read_back_strictly(built)
        assert str(back.PatientName) == five, kind
        assert str(back.ReferringPhysicianName) == "", kind
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy_errors(path)
        assert errors == [], (kind, errors)
        assert all("99PACSAI" in w for w in warnings), (kind, warnings)


def test_a_name_padded_with_empty_components_is_trimmed_not_blanked(tmp_path: Path) -> None:
    """Some systems pad a Person Name with component delimiters ("DOE^JOHN^^^^^": six components, the last five
    empty). Blanked as malformed, the results would carry an empty Patient's Name beside the source's, which a PACS
    that reconciles patients by name and ID may file as a conflict. Trailing empty components may be omitted
    (PS3.5 6.2.1.1), so the same name without them is copied; one with a sixth component that holds text is still
    blanked (the test above)."""
    def mutate(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "DOE^JOHN^^^^^=ドウ^ジョン^^^^^^"
        ds.ReferringPhysicianName = "SMITH^ANNE^^^^^"

    sources = sent_as_spooled(mutate)
    for kind, built in _every_result(sources):
        back = read_back_strictly(built)
        assert str(back.PatientName) == "DOE^JOHN=ドウ^ジョン", kind
        if "ReferringPhysicianName" in back:
            assert str(back.ReferringPhysicianName) == "SMITH^ANNE", kind
        path = tmp_path / f"{kind}.dcm"
        built.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy_errors(path)
        assert errors == [], (kind, errors)
    assert str(sources[0].PatientName) == "DOE^JOHN^^^^^=ドウ^ジョン^^^^^^"  # the sources are not modified
    # trimmed, still over 64 characters: blanked
    too_long = sent_as_spooled(lambda ds: setattr(ds, "PatientName", "D" * 65 + "^^^^^"))
    assert str(read_back_strictly(build_results(too_long, cached_series()[1], ALGORITHM).sr).PatientName) == ""


def test_an_error_quoting_a_trimmed_name_is_scrubbed_too() -> None:
    """The results carry a padded name trimmed ("DOE^JOHN^^^^^" → "DOE^JOHN"), and library errors are scrubbed of the
    sources' identifying values: the trimmed form must be scrubbed as well (found by the PHI review of the trim)."""
    from node.results.content import scrub

    ds = Dataset()
    ds.PatientName = "DOE^JOHN^^^^^"
    assert scrub("bad value 'DOE^JOHN' in PatientName", [ds]) == "bad value [removed] in PatientName"
    assert scrub("bad value 'DOE^JOHN^^^^^'", [ds]) == "bad value [removed]"
