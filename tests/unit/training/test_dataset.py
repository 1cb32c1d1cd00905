"""training.dataset: series found by headers in any layout, joined to a label table; every error named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from training.dataset import DatasetError, load_dataset, parse_label
from training.phantom import generate_dataset
from training.prepared import prepare


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds12")
    generate_dataset(out, cases=12, seed=31, size=48, slices=(12, 12))
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_phantom_dataset_loads_with_labels_patients_and_masks(phantoms: Path) -> None:
    ds = load_dataset(phantoms)
    table = pd.read_csv(phantoms / "clinical.csv")
    assert [c.case_id for c in ds.cases] == table.case_id.tolist()
    assert ds.labels.tolist() == table.label.tolist()
    assert [c.reader_label for c in ds.cases] == table.reader_label.tolist()
    assert [c.series_uid for c in ds.cases] == table.series_instance_uid.tolist()
    assert all(c.patient_id.startswith("PHANTOM-31-") for c in ds.cases)  # from the headers
    assert all(len(c.files) == 12 and c.masks is not None for c in ds.cases)
    assert ds.cases[0].clinical["age"] == table.age[0] and ds.cases[0].clinical["sex"] == table.sex[0]
    s = ds.summary()
    assert (s["cases"], s["pneumonia_cases"], s["patients"], s["unreadable_files"]) == (12, 6, 12, 0)


def test_any_layout_and_a_study_keyed_table(phantoms: Path, tmp_path: Path) -> None:
    """Files flattened into one folder under meaningless names, labels keyed by StudyInstanceUID only."""
    root = tmp_path / "flat"
    (root / "a" / "b").mkdir(parents=True)
    for i, f in enumerate(sorted(phantoms.glob("CASE*/dicom/*.dcm"))):
        shutil.copy(f, root / ("a/b" if i % 2 else "a") / f"x{i:05d}")
    src = pd.read_csv(phantoms / "clinical.csv")
    table = pd.DataFrame({"StudyInstanceUID": src.study_instance_uid, "Label": src.diagnosis,
                          "patient_id": [f"P{i // 2}" for i in range(len(src))]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    ds = load_dataset(root, tmp_path / "labels.csv")
    assert [c.series_uid for c in ds.cases] == src.series_instance_uid.tolist()
    assert ds.labels.tolist() == src.label.tolist()
    assert len(set(ds.groups)) == 6  # the table's patient_id wins over the header's
    assert not ds.has_reader and not ds.has_masks


def test_missing_series_for_a_row(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    shutil.rmtree(root / "CASE0003" / "dicom")
    with pytest.raises(DatasetError, match="missing series") as err:
        load_dataset(root)
    assert len(err.value.problems) == 1 and "row 4" in err.value.problems[0]


def test_unlabelled_series_is_an_error_unless_allowed(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    table = pd.read_csv(root / "clinical.csv")
    table.drop(index=[5]).to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError, match="1 problems") as err:
        load_dataset(root)
    assert "unlabelled series" in err.value.problems[0] and table.series_instance_uid[5] in err.value.problems[0]
    ds = load_dataset(root, allow_unlabelled=True)
    assert len(ds.cases) == 11 and ds.unlabelled == [table.series_instance_uid[5]]


def test_duplicate_and_conflicting_rows(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    table = pd.read_csv(root / "clinical.csv")
    dup = table.iloc[[0]].copy()
    conflict = table.iloc[[1]].copy()
    conflict["label"] = 1 - conflict["label"]
    pd.concat([table, dup, conflict]).to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    text = "\n".join(err.value.problems)
    assert f"duplicate: series_instance_uid {table.series_instance_uid[0]}" in text
    assert f"conflicting labels: series_instance_uid {table.series_instance_uid[1]}" in text


def test_duplicate_sop_instance_uid_in_two_files(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    shutil.copy(root / "CASE0001/dicom/IM0001.dcm", root / "CASE0001/copy-of-IM0001")
    with pytest.raises(DatasetError, match="duplicate instance UIDs") as err:
        load_dataset(root)
    assert "copy-of-IM0001" in err.value.problems[0]


def test_unreadable_files_are_listed_not_fatal_unless_all(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    (root / "CASE0002" / "dicom" / "junk.dcm").write_bytes(b"not dicom at all")
    ds = load_dataset(root)
    assert len(ds.cases) == 12
    assert ds.unreadable and ds.unreadable[0][0] == "CASE0002/dicom/junk.dcm"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.dcm").write_bytes(b"junk")
    shutil.copy(root / "clinical.csv", empty)
    with pytest.raises(DatasetError, match="no readable DICOM series") as err:
        load_dataset(empty)
    assert "a.dcm" in err.value.problems[0]


def test_bad_labels_and_tables(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    table = pd.read_csv(root / "clinical.csv").astype({"label": str})
    table.loc[2, "label"] = "maybe"
    table.loc[3, "label"] = ""
    table.to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert any("row 4" in p and "'maybe'" in p for p in err.value.problems)
    assert any("row 5 of clinical.csv: no label" in p for p in err.value.problems)
    table.drop(columns=["label"]).to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError, match="no 'label' column"):
        load_dataset(root)
    assert parse_label("Pneumonia") == 1 and parse_label(" 0 ") == 0 and parse_label("") is None


def test_study_mismatch_between_table_and_headers(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    table = pd.read_csv(root / "clinical.csv")
    table.loc[0, "study_instance_uid"] = table.study_instance_uid[1]
    table.to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError, match="belongs to study"):
        load_dataset(root)


def test_prepare_caches_grid_arrays(phantoms: Path, tmp_path: Path) -> None:
    ds = load_dataset(phantoms)
    first = prepare(ds, 32, tmp_path / "cache")
    again = prepare(ds, 32, tmp_path / "cache")
    assert not first.from_cache and again.from_cache and first.path == again.path
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for a, b in zip(first.cases, again.cases, strict=True):
        assert a.case_id == b.case_id and a.label == b.label and a.age == b.age and a.sex == b.sex
        assert a.hu.shape == (12, 32, 32) and a.hu.dtype == np.float16
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.slice_lesion, b.slice_lesion)
    assert first.hist_counts.shape == (12, len(first.hist_edges) - 1) and first.hist_counts.sum() > 0
    pos = [c for c in first.cases if c.label == 1]
    assert all(c.slice_lesion.max() > 0 for c in pos)
    assert all(c.slice_lesion.max() == 0 for c in first.cases if c.label == 0)
    assert prepare(ds, 48, tmp_path / "cache").from_cache is False  # another grid, another key


def test_prepare_names_the_case_whose_series_is_broken(phantoms: Path, tmp_path: Path) -> None:
    root = _copy(phantoms, tmp_path / "d")
    f = root / "CASE0004/dicom/IM0005.dcm"
    ds_ = pydicom.dcmread(f)
    ds_.ImagePositionPatient = [0, 0, 999]
    ds_.save_as(f)
    ds = load_dataset(root)
    with pytest.raises(DatasetError, match="case CASE0004: slice spacing"):
        prepare(ds, 32, tmp_path / "cache")
