"""A hospital export fed to training: folders named after the patient never reach an output, the table's age and
sex win over the header's (disagreements counted once, no values), and the table's odd rows get one clear error
naming the row, or are read as training/README.md documents.

Inputs: a tiny phantom (6 cases, 64 px, 16 slices) re-laid as a hospital export names it — one folder per
patient, ``MARKERDOE_JOHN_195N/CT_CHEST`` — with the marker in PatientName too, run through the real CLIs
(``pacsnode evaluate`` via training.crossval, ``train classifier`` via training.cli) and the real loaders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from training import cli, crossval
from training.common import load_grid_cases, read_table
from training.dataset import DatasetError, load_dataset
from training.phantom import generate_dataset
from training.phi import locate
from training.prepared import prepare

MARKER = "MARKERDOE"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phi")
    generate_dataset(out, cases=6, seed=5, size=64, slices=16)
    return out


def _export(base: Path, tmp_path: Path) -> Path:
    """The phantom laid out as a hospital export: ``MARKERDOE_JOHN_195N/CT_CHEST/IM….dcm`` and the masks beside
    the series, PatientName ``MARKERDOE^JOHN``, PatientID ``MARKERDOE-MRN-N``; the table keeps the pseudonymous
    case ids."""
    root = tmp_path / "export"
    root.mkdir()
    t = pd.read_csv(base / "clinical.csv", dtype=str, keep_default_na=False)
    for i, case in enumerate(t.case_id):
        folder = root / f"{MARKER}_JOHN_195{i}" / "CT_CHEST"
        shutil.copytree(base / case / "dicom", folder)
        shutil.copy(base / case / "masks.npz", folder.parent / "masks.npz")
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            ds.PatientName = f"{MARKER}^JOHN{i}"
            ds.PatientID = f"{MARKER}-MRN-{i}"  # the table has no patient_id column: the header's groups the cases
            ds.save_as(f)
        t.loc[i, "dicom_dir"] = f"{MARKER}_JOHN_195{i}/CT_CHEST"
        t.loc[i, "masks"] = f"{MARKER}_JOHN_195{i}/masks.npz"
    t.to_csv(root / "clinical.csv", index=False)
    return root


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)


def _no_marker_in_files(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes(), f.relative_to(folder)


def test_a_failing_run_names_no_patient_folder(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Messages named series and files by their path below the dataset folder ("unlabelled series … e.g.
    DOE_JOHN_1957/CT_CHEST/IM0001.dcm", "no DICOM series under /data/DOE_JOHN_1957", "masks file
    DOE_JOHN_1957/masks.npz does not exist", "SOPInstanceUID … is in both DOE_JOHN/… and …")."""
    root = _export(base, tmp_path)
    t = _table(root)
    t.loc[1, "masks"] = f"{MARKER}_JOHN_1951/gone.npz"
    t.loc[2, ["series_instance_uid", "study_instance_uid"]] = ""  # found by its folder, which is empty
    t.loc[2, "dicom_dir"] = f"{MARKER}_JOHN_1952/EMPTY"
    (root / f"{MARKER}_JOHN_1952" / "EMPTY").mkdir()
    t.drop(index=[3]).to_csv(root / "clinical.csv", index=False)  # case 4's series: unlabelled
    (root / f"{MARKER}_JOHN_1954" / "CT_CHEST" / "junk.dcm").write_bytes(b"not DICOM")
    args = ["evaluate", "--data", str(root), "--out", str(tmp_path / "r"), "--folds", "3", "--quick"]
    assert crossval.main(args) == 1
    out = capsys.readouterr()
    assert "row 3 of clinical.csv" in out.err and "row 4 of clinical.csv" in out.err and "unlabelled" in out.err
    assert MARKER not in out.out + out.err, out.out + out.err
    tags = re.findall(r"folder #([0-9a-f]{8})", out.err)  # for the user who holds the data: python -m training.phi
    assert {d for tag in tags for d in locate(root, tag)} == {root / f"{MARKER}_JOHN_195{i}" / "CT_CHEST" for i in (2, 3)}

    shutil.copy(next((root / f"{MARKER}_JOHN_1950" / "CT_CHEST").iterdir()), root / f"{MARKER}_JOHN_1951" / "x.dcm")
    assert crossval.main(args) == 1
    out = capsys.readouterr()
    assert "duplicate instance UIDs" in out.err and "x.dcm in folder #" in out.err
    assert MARKER not in out.out + out.err, out.out + out.err

    data = Path(shutil.copytree(base, tmp_path / "train"))  # the train CLI's phantom layout
    t = _table(data)
    t.loc[0, "dicom_dir"] = f"{MARKER}_JOHN_1950/EMPTY"  # a case whose folder holds no .dcm file
    (data / f"{MARKER}_JOHN_1950" / "EMPTY").mkdir(parents=True)
    t.to_csv(data / "clinical.csv", index=False)
    rc = cli.main(["train", "classifier", "--data", str(data), "--out", str(tmp_path / "m"), "--quiet"])
    out = capsys.readouterr()
    assert rc == 1 and "case CASE0001: no .dcm files" in out.err, out.err
    assert MARKER not in out.out + out.err, out.out + out.err


def test_a_succeeding_run_writes_no_patient_folder_and_says_the_disagreements_once(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run's log and run.json listed each skipped file by its path below the dataset folder; and a table age
    the header contradicted was silently replaced by the header's."""
    root = _export(base, tmp_path)
    (root / f"{MARKER}_JOHN_1952" / "CT_CHEST" / "junk.dcm").write_bytes(b"not DICOM")
    t = _table(root)
    t.loc[0, "age"] = str(int(t.loc[0, "age"]) + 20)  # the header says otherwise: PatientAge is the generator's
    t.loc[1, "sex"] = "F" if t.loc[1, "sex"] == "M" else "M"
    t.to_csv(root / "clinical.csv", index=False)
    out_dir = tmp_path / "r"
    rc = crossval.main(["evaluate", "--data", str(root), "--out", str(out_dir), "--folds", "3", "--quick",
                        "--no-ablation", "--no-lesion-evidence", "--bootstrap", "50"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.count("the DICOM header's age or sex disagrees with the table on 2 of 6 series") == 1, out.out
    assert "unreadable: junk.dcm in folder #" in out.out, out.out
    assert MARKER not in out.out + out.err
    _no_marker_in_files(out_dir)


def test_the_table_s_age_and_sex_are_used_where_the_header_disagrees(base: Path, tmp_path: Path) -> None:
    """Both loaders (cross-validation's and `train`'s) took the header's age and sex over the table's, and
    `train`'s ignored the table's even where the header had none."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    header_age = [float(a) for a in t.age]  # the generator writes the table's age into PatientAge
    t.loc[0, "age"] = str(header_age[0] + 20)
    t.loc[1, "sex"] = flipped = "F" if t.loc[1, "sex"] == "M" else "M"
    t.loc[2, "age"] = ""  # the header fills a blank
    for f in (root / t.loc[3, "dicom_dir"]).iterdir():  # an anonymised header: the table's age is the only one
        ds = pydicom.dcmread(f)
        del ds.PatientAge, ds.PatientBirthDate
        ds.save_as(f)
    t.to_csv(root / "clinical.csv", index=False)
    want = [header_age[0] + 20, *header_age[1:]]
    prep = prepare(load_dataset(root), 32, tmp_path / "cache")
    assert prep.age_sex_disagreements == 2
    assert [c.age for c in prep.cases] == want and prep.cases[1].sex == flipped
    again = prepare(load_dataset(root), 32, tmp_path / "cache")  # from the cache: the same
    assert again.from_cache and [c.age for c in again.cases] == want and again.cases[1].sex == flipped
    said: list[str] = []
    cases = load_grid_cases(root, 32, with_targets=False, progress=False, log=said.append)
    assert [c.age for c in cases] == want and cases[1].sex == flipped
    assert len(said) == 1 and "on 2 of 6 series" in said[0], said
    assert not any(str(int(a)) in said[0] for a in header_age), said  # a count, no values


def test_case_ids_differing_only_in_case_and_a_series_named_twice_give_one_error_each(base: Path,
                                                                                      tmp_path: Path) -> None:
    """'CASE0001' and ' case0001 ' on two rows were two cases (a spreadsheet's lookup takes them for one); a
    series on two rows gave two problems, the first naming no row."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t.loc[1, "case_id"] = " case0001 "
    t = pd.concat([t, t.iloc[[3]].assign(case_id="CASE0007")])
    t.to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("duplicate: series_instance_uid ") and "is on rows 5, 8" in problems[0], problems
    assert problems[1].startswith("conflicting labels: case_id CASE0001 / case0001 (differing only in case or "
                                  "spaces) is on rows 2, 3"), problems
    with pytest.raises(DatasetError) as err:  # the train and model-eval commands' phantom table: the same
        read_table(root)
    assert err.value.problems == ["case_id CASE0001 is on 2 rows (2, 3)"]


def test_two_series_of_one_study_on_two_rows_are_two_cases(base: Path, tmp_path: Path) -> None:
    """Rows naming two series of one study (two reconstructions, say) were refused as a duplicate study."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    second = pydicom.uid.generate_uid()
    (root / "CASE0001" / "soft").mkdir()
    for f in sorted((root / "CASE0001" / "dicom").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = second, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(root / "CASE0001" / "soft" / f.name)
    t = pd.concat([t, t.iloc[[0]].assign(case_id="CASE0001-soft", series_instance_uid=second, masks="")])
    t.to_csv(root / "clinical.csv", index=False)
    ds = load_dataset(root)
    assert [c.series_uid for c in ds.cases][-1] == second and ds.cases[-1].study_uid == ds.cases[0].study_uid


def test_odd_but_readable_cells_are_read_as_documented(base: Path, tmp_path: Path) -> None:
    """Ages as DICOM writes them ('45Y') and as de-identified exports do ('>89') were refused; a label column
    mixing 'Pneumonia', 'yes' and 1.0 and an Excel CSV with a byte-order mark are read; blank rows (a
    spreadsheet's trailing ',,,') were each an error."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t["age"] = ["45Y", ">89", "061y", "90+", "", "33"]
    words = iter(["Pneumonia", "yes", "1.0", "normal", "no", "0.0"])
    t["label"] = [next(words) if x == "1" else "" for x in t.label]
    t["label"] = [x or next(words) for x in t.label]  # the three negatives after the three positives
    text = t.to_csv(index=False) + "," * (len(t.columns) - 1) + "\n"
    (root / "clinical.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = load_dataset(root)
    assert [c.clinical.get("age") for c in ds.cases] == [45.0, 90.0, 61.0, 90.0, None, 33.0]
    assert [c.label for c in ds.cases] == [int(x) for x in _table(base).label]
    assert "1 blank rows of clinical.csv skipped" in ds.notes


def test_a_table_with_no_rows_is_one_error(base: Path, tmp_path: Path) -> None:
    """A table holding only its header line gave one 'unlabelled series' problem per series found."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    _table(root).iloc[:0].to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert err.value.problems == [] and "clinical.csv has no rows below its header line" in str(err.value)


def test_patient_ids_differing_only_in_case_or_spaces_are_one_patient(base: Path, tmp_path: Path) -> None:
    """'P1' and 'p1 ' were two patients: their series could sit on both sides of a fold."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t["patient_id"] = ["P1", "p1 ", "P2", "P3", "P4", "P 5"]
    t.to_csv(root / "clinical.csv", index=False)
    groups = load_dataset(root).groups.tolist()
    assert groups[0] == groups[1] and len(set(groups)) == 5


@pytest.mark.parametrize("command", ["train", "model-eval"])
def test_a_masks_file_that_cannot_be_read_is_named_by_its_case(base: Path, tmp_path: Path, command: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The phantom-table commands ended in a FileNotFoundError traceback naming the masks file's full path."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t.loc[1, "masks"] = f"{MARKER}_JOHN_1951/masks.npz"
    t.to_csv(root / "clinical.csv", index=False)
    args = ["train", "classifier", "--out", str(tmp_path / "m")] if command == "train" else ["model-eval"]
    assert cli.main([*args, "--data", str(root), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "case CASE0002: the masks file its masks column names cannot be read" in out.err, out.err
    assert MARKER not in out.out + out.err


def test_a_table_with_no_rows_or_stray_spaces_on_the_phantom_commands(base: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """model-eval on a header-only table ended in an IndexError traceback; a dicom_dir with a trailing space (as
    spreadsheets leave them) named no folder, in both loaders."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t.iloc[:0].to_csv(root / "clinical.csv", index=False)
    assert cli.main(["model-eval", "--data", str(root), "--quiet"]) == 1
    assert "clinical.csv has no rows below its header line" in capsys.readouterr().err
    t["dicom_dir"] = t["dicom_dir"] + " "
    t[["case_id", "dicom_dir", "label", "age", "sex"]].to_csv(root / "clinical.csv", index=False)  # keyed by folder
    assert len(load_dataset(root).cases) == 6
    t.to_csv(root / "clinical.csv", index=False)
    assert len(load_grid_cases(root, 32, with_targets=False, progress=False)) == 6


def test_a_blank_patient_id_in_a_table_that_has_them_is_named(base: Path, tmp_path: Path) -> None:
    """A blank cell took the header's PatientID: another namespace than the table's pseudonyms, so one patient's
    series could be two groups (and sit on both sides of a fold), and the PatientID went into predictions.csv."""
    root = Path(shutil.copytree(base, tmp_path / "d"))
    t = _table(root)
    t["patient_id"] = ["P1", "P2", "", "P3", "P4", "P5"]
    t.to_csv(root / "clinical.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert [p.split(":")[0] for p in err.value.problems] == ["row 4 of clinical.csv"]
    assert "blank patient_id" in err.value.problems[0]


def test_a_folder_tag_is_the_same_whether_the_data_folder_was_given_relative_or_absolute(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tag hashed whatever path the files were found by: --data given relative gave another tag than
    `python -m training.phi` with the absolute folder finds (and the reverse)."""
    root = _export(base, tmp_path)
    _table(root).drop(index=[3]).to_csv(root / "clinical.csv", index=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset(Path("export"))
    tag = re.findall(r"folder #([0-9a-f]{8})", str(err.value))
    assert len(tag) == 1 and MARKER not in str(err.value)
    want = root / f"{MARKER}_JOHN_1953" / "CT_CHEST"
    assert locate(root, tag[0]) == [want] and locate(Path("export"), tag[0]) == [Path("export") / want.relative_to(root)]
