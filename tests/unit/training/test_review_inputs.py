"""Bad input as a hospital research engineer feeds it to the training CLI: a clear error naming the row, column or
file (exit code, no traceback) and no patient-identifying value in it; skips counted in the CLI output.

Inputs are a tiny phantom (6 cases, 64 px, 16 slices) edited as a hospital export would differ, and pydicom's own
test files (CT_small.dcm: one CT slice; MR_small.dcm: an MR image)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from training import cli, crossval
from training.common import read_table
from training.dataset import DatasetError, load_dataset
from training.phantom import generate_dataset

PHI = ("PHANTOM",)  # the phantom's PatientName (PHANTOM^CASE…) and PatientID (PHANTOM-5-CASE…) both start so


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inputs")
    generate_dataset(out, cases=6, seed=5, size=64, slices=16)
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "d"))


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)


def _no_phi(text: str) -> None:
    assert not any(p in text for p in PHI), text


def test_clinical_values_that_cannot_be_read_are_named_by_row_and_column(base: Path, tmp_path: Path) -> None:
    """"Y" for fever and "0" for sex were silently read as missing, an age "forty" or -5 was kept as given."""
    root = _copy(base, tmp_path)
    t = _table(root)
    t["fever"] = ["Y", "yes", "TRUE", "", "1", "0"]
    t["sex"] = ["m", "0", "F ", "O", "", "female"]
    t["age"] = ["55", "40", "forty", "-5", "", "130"]
    t.to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    problems = err.value.problems
    assert any(p.startswith("row 2 of clinical.csv: column 'fever': cannot read 'Y'") for p in problems), problems
    assert any(p.startswith("row 3 of clinical.csv: column 'sex': cannot read '0'") for p in problems), problems
    for row in (4, 5, 7):
        assert any(p.startswith(f"row {row} of clinical.csv: column 'age': not a number") for p in problems), problems
    assert len(problems) == 5, problems
    assert not [p for p in problems if "forty" in p or "-5" in p]  # an age is not echoed (the message's folder,
    # a temporary path such as .../pytest-598/..., may hold "-5" by chance: the problems name no folder)
    _no_phi(str(err.value))
    t["fever"], t["sex"], t["age"] = t["fever"].replace("Y", "no"), t["sex"].replace("0", "U"), "60"
    t.to_csv(root / "clinical.csv", index=False)
    ds = load_dataset(root)
    assert [c.clinical.get("fever") for c in ds.cases] == [0.0, 1.0, 1.0, None, 1.0, 0.0]
    assert [c.clinical.get("sex") for c in ds.cases] == ["M", "U", "F", "O", None, "F"]


def test_evaluate_names_the_row_of_an_unreadable_age(base: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Headers without PatientAge (as anonymisers leave them) take the table's age: "forty" ended the run with
    "could not convert string to float: 'forty'", naming no row or column."""
    root = _copy(base, tmp_path)
    for f in root.glob("CASE*/dicom/*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.PatientAge, ds.PatientBirthDate
        ds.save_as(f)
    t = _table(root)
    t.loc[0, "age"] = "forty"
    t.to_csv(root / "clinical.csv", index=False)
    rc = crossval.main(["evaluate", "--data", str(root), "--out", str(tmp_path / "r"), "--folds", "2", "--quick",
                        "--quiet", "--no-ablation", "--no-lesion-evidence"])
    err = capsys.readouterr().err
    assert rc == 1 and "row 2 of clinical.csv: column 'age'" in err and "Traceback" not in err, err
    _no_phi(err)


@pytest.mark.parametrize("command", ["train", "model-eval"])
def test_train_and_model_eval_name_labels_they_cannot_use(base: Path, tmp_path: Path, command: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The phantom-table commands ended in a ValueError traceback for a label "pneumonia" or a blank one, and took
    a label 2 or -1 (or two rows of one case) as given."""
    root = _copy(base, tmp_path)
    t = _table(root)
    t["label"] = ["pneumonia", "2", "", "-1", "normal", "1"]
    t.loc[5, "case_id"] = t.loc[4, "case_id"]
    t.to_csv(root / "clinical.csv", index=False)
    args = ["train", "classifier", "--out", str(tmp_path / "m")] if command == "train" else ["model-eval"]
    assert cli.main([*args, "--data", str(root), "--quiet"]) == 1
    err = capsys.readouterr().err
    for expected in ("row 3 of clinical.csv: cannot read '2'", "row 4 of clinical.csv: no label",
                     "row 5 of clinical.csv: cannot read '-1'", "case_id CASE0005 is on 2 rows"):
        assert expected in err, err
    assert "row 2 " not in err and "Traceback" not in err
    _no_phi(err)
    with pytest.raises(DatasetError, match="cannot read '2'"):
        read_table(root)


def test_train_refuses_an_out_it_cannot_write_before_training(base: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--out under a file: the model was trained first, then NotADirectoryError's traceback lost it."""
    (tmp_path / "afile").write_text("x")
    rc = cli.main(["train", "classifier", "--data", str(base), "--out", str(tmp_path / "afile" / "model"),
                   "--epochs", "1", "--warmup-steps", "0", "--limit", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "is a file" in err, err
    assert cli.main(["model-eval", "--data", str(base), "--json", str(tmp_path / "afile" / "x.json")]) == 2
    assert "--json" in capsys.readouterr().err


def test_series_the_gate_would_refuse_are_named(base: Path, tmp_path: Path) -> None:
    """An MR-headed series (here with CT pixels and a rescale, as Philips MR carries one), pydicom's one-slice
    CT_small.dcm and its MR_small.dcm were taken as chest CT cases (or failed only at preprocessing)."""
    root = _copy(base, tmp_path)
    for f in (root / "CASE0003" / "dicom").iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(f)
    for case, name in (("CASE0004", "CT_small.dcm"), ("CASE0005", "MR_small.dcm")):
        shutil.rmtree(root / case / "dicom")
        (root / case / "dicom").mkdir()
        shutil.copy(str(get_testdata_file(name)), root / case / "dicom" / name)
    _table(root)[["case_id", "label", "age", "sex"]].to_csv(root / "clinical.csv", index=False)  # keyed by folder
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("row 4 of clinical.csv: series ") and "is MR" in problems[0]
    assert problems[1].startswith("row 5 of clinical.csv: ") and "has one slice (CT_small.dcm)" in problems[1]
    assert problems[2].startswith("row 6 of clinical.csv: ") and "is MR" in problems[2]
    _no_phi(str(err.value))


def test_skipped_files_and_unlabelled_series_are_counted_in_the_cli_output(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--allow-unlabelled left a series out without a word in the CLI output (only a count in metrics.json)."""
    root = _copy(base, tmp_path)
    (root / "CASE0002" / "dicom" / "IM0099.dcm").write_bytes(b"not DICOM")
    _table(root).iloc[1:].to_csv(root / "clinical.csv", index=False)
    rc = crossval.main(["evaluate", "--data", str(root), "--out", str(tmp_path / "r"), "--folds", "7", "--quick",
                        "--allow-unlabelled", "--no-ablation", "--no-lesion-evidence"])
    out = capsys.readouterr()
    assert rc == 1 and "7 folds need at least 7 patients" in out.err  # stops after loading, before training
    assert f"1 files under {root} are not readable DICOM and were skipped" in out.out, out.out
    assert "1 CT series the table does not label were left out (--allow-unlabelled)" in out.out, out.out
    _no_phi(out.out + out.err)


def test_a_semicolon_separated_table_is_read_and_a_latin1_one_named(base: Path, tmp_path: Path) -> None:
    """A spreadsheet's semicolon CSV was refused as having "no 'label' column" (the whole header one column)."""
    root = _copy(base, tmp_path)
    t = _table(root)
    t.to_csv(root / "clinical.csv", index=False, sep=";")
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == t.case_id.tolist() and ds.labels.tolist() == t.label.astype(int).tolist()
    (root / "clinical.csv").write_bytes(t.assign(comment="fièvre").to_csv(index=False).encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8 .*save it as UTF-8 CSV"):
        load_dataset(root)


def test_preprocessing_names_every_broken_series_at_once(base: Path, tmp_path: Path) -> None:
    """Preprocessing stopped at the first series it could not read: a hospital set with several needed a run (all
    the preprocessing before it) per broken series."""
    from training.prepared import prepare

    root = _copy(base, tmp_path)
    for case in ("CASE0002", "CASE0005"):
        for f in (root / case / "dicom").iterdir():
            ds = pydicom.dcmread(f)
            del ds.RescaleIntercept
            ds.save_as(f)
    with pytest.raises(DatasetError, match="2 of 6 series cannot be used") as err:
        prepare(load_dataset(root), 32, tmp_path / "cache")
    assert [p.split(":")[0] for p in err.value.problems] == ["case CASE0002", "case CASE0005"]
    assert all("no RescaleIntercept" in p for p in err.value.problems)
