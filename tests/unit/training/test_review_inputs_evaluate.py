"""Bad input to `pacsnode model-eval` and `pacsnode evaluate` beyond the dataset reader (test_review_inputs.py):
a blank reader label, an ``--out`` that cannot be a folder, and a fold count the labels cannot fill — each a clear
error or a correct answer, early, without a traceback."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import require_weights
from training import cli, crossval
from training.phantom import generate_dataset


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inputs-eval")
    generate_dataset(out, cases=6, seed=7, size=64, slices=16)
    return out


def test_model_eval_leaves_a_blank_reader_label_out_of_the_reader_statistics(base: Path, tmp_path: Path) -> None:
    """A blank reader_label crashed model-eval ("cannot convert float NaN to integer"), and a case without a reader
    label counted as a wrong reader answer."""
    require_weights()
    root = Path(shutil.copytree(base, tmp_path / "d"))
    table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    read = table["label"].astype(int)
    table["reader_label"] = read.astype(str)  # a perfect reader on every case …
    blank = int(read.idxmax())  # … but one positive case was never read
    table.loc[blank, "reader_label"] = ""
    table.to_csv(root / "clinical.csv", index=False)
    out = tmp_path / "eval.json"
    assert cli.main(["model-eval", "--data", str(root), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    found = [v for k, v in _flat(result) if k == "reader_sensitivity"]
    assert found and all(v == 1.0 for v in found), result  # the unread case is not a miss


def _flat(obj: object, key: str = "") -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flat(v, k)]
    if isinstance(obj, list):
        return [kv for v in obj for kv in _flat(v, key)]
    return [(key, obj)]


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_evaluate_names_an_out_that_cannot_be_a_folder(base: Path, tmp_path: Path, where: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """It raised FileExistsError / NotADirectoryError with a traceback."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "is-a-file" else tmp_path / "afile" / "report"
    rc = crossval.main(["evaluate", "--data", str(base), "--out", str(out), "--folds", "2", "--quick", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "--out" in err and "Traceback" not in err, err


def test_evaluate_refuses_more_folds_than_a_class_has_before_preprocessing(base: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The fold count was checked only after every case was preprocessed (~97 s on the 800-case set)."""
    started = time.monotonic()
    rc = crossval.main(["evaluate", "--data", str(base), "--out", str(tmp_path / "r"), "--folds", "5", "--quick",
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "5 folds need at least 5 patients of each class" in err, err
    assert not (tmp_path / "r" / "cache").exists() or not any((tmp_path / "r" / "cache").iterdir()), \
        "the cases were preprocessed before the fold count was checked"
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("command", ["classifier", "segmenter", "candidates", "train-final"])
def test_training_into_a_folder_that_holds_a_model_is_refused_without_overwrite(
        base: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --out` (and `train-final --out`) replaced whatever model was there without a word — a shipped version
    under models/weights included, which nodes load and whose card the evaluation report cites."""
    from models.registry import Registry

    shipped = Registry().folder("classifier")
    out = Path(shutil.copytree(shipped, tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    if command == "train-final":
        rc = crossval.main(["train-final", "--data", str(base), "--out", str(out), "--quick", "--quiet"])
    else:
        rc = cli.main(["train", command, "--data", str(base), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a model" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
