"""training.cli: the subcommands registered on an argparse parser, run end to end on tiny phantoms."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from models.registry import CARD_FILE, Registry
from training import cli

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras saving TF variables under numpy 2


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_register_adds_the_subcommands() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    assert {"phantom", "train", "model-eval"} <= set(sub.choices)
    args = parser.parse_args(["phantom", "--out", "x", "--cases", "2", "--seed", "1"])
    assert callable(args.func) and args.size == "256-512" and args.slices == "40-160"


def test_phantom_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run(["phantom", "--out", str(tmp_path / "p"), "--cases", "2", "--seed", "4", "--size", "48",
               "--slices", "5-6", "--prevalence", "0.5", "--quiet"])
    assert rc == 0
    assert "wrote 2 phantom series (1 pneumonia)" in capsys.readouterr().out
    assert len(list((tmp_path / "p").glob("CASE000*/dicom/*.dcm"))) >= 10
    assert _run(["phantom", "--out", str(tmp_path / "q"), "--cases", "2", "--seed", "4", "--size", "big",
                 "--quiet"]) == 2


def test_train_classifier_writes_a_loadable_model(tiny_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights" / "classifier" / "0.0.1"
    rc = _run(["train", "classifier", "--data", str(tiny_set), "--val-data", str(tiny_set), "--out", str(out),
               "--epochs", "1", "--warmup-steps", "5", "--version", "0.0.1", "--quiet"])
    assert rc == 0
    for f in ("model.keras", CARD_FILE, "curves.png", "history.json"):
        assert (out / f).is_file(), f
    card = json.loads((out / CARD_FILE).read_text())
    assert card["version"] == "0.0.1" and card["training"]["train_seconds"] >= 0
    assert card["metrics"]["validation"]["roc_auc"] is not None
    clf = Registry(tmp_path / "weights").classifier()
    assert clf.version == "0.0.1"


def test_train_segmenter_writes_a_loadable_model(tiny_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights" / "segmenter" / "0.0.1"
    rc = _run(["train", "segmenter", "--data", str(tiny_set), "--out", str(out), "--epochs", "1", "--steps", "2",
               "--version", "0.0.1", "--lesion-sampling", "case", "--lesion-fraction", "0.3", "--quiet"])
    assert rc == 0
    seg = Registry(tmp_path / "weights").segmenter()
    assert seg.version == "0.0.1" and seg.card["training"]["settings"]["lesion_sampling"] == "case"
    assert seg.card["training"]["settings"]["lesion_fraction"] == 0.3


@pytest.mark.parametrize("bad", ["0", "1", "1.5"])
def test_a_lesion_fraction_outside_0_1_is_refused(tiny_set: Path, tmp_path: Path, bad: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run(["train", "segmenter", "--data", str(tiny_set), "--out", str(tmp_path / "o"), "--epochs", "1",
               "--lesion-fraction", bad, "--quiet"])
    assert rc == 1 and "lesion_fraction must lie strictly between 0 and 1" in capsys.readouterr().err


def test_train_on_missing_data_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run(["train", "classifier", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 1 and "clinical.csv" in capsys.readouterr().err


def test_model_eval_prints_auc_and_dice(tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(Registry().weights_dir, weights)
    rc = _run(["model-eval", "--data", str(tiny_set), "--weights-dir", str(weights), "--json",
               str(tmp_path / "r.json"), "--write-card", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "classifier ROC AUC" in out and "U-Net lesion Dice" in out and "U-Net lung Dice" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["cases"] == 4 and 0.0 <= res["classifier"]["roc_auc"] <= 1.0
    assert len(res["per_case"]) == 4
    card = json.loads((Registry(weights).folder("classifier") / CARD_FILE).read_text())
    assert card["metrics"]["test"]["cases"] == 4
    # the same models again on the first two cases, paired with that result's first two: nothing differs
    res["per_case"] = res["per_case"][:2]
    (tmp_path / "two.json").write_text(json.dumps(res))
    rc = _run(["model-eval", "--data", str(tiny_set), "--weights-dir", str(weights), "--limit", "2", "--compare-with",
               str(tmp_path / "two.json"), "--json", str(tmp_path / "again.json"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "on the same 2 cases" in out and "difference +0.000" in out
    assert json.loads((tmp_path / "again.json").read_text())["comparison"]["mcnemar"]["discordant"] == 0
    # an unreadable comparison file is refused before any evaluation
    assert _run(["model-eval", "--data", str(tiny_set), "--compare-with", str(tmp_path / "none.json")]) == 1
    assert "cannot read --compare-with" in capsys.readouterr().err


def test_train_segmenter_from_a_shipped_unet_with_hard_examples(tiny_set: Path, tmp_path: Path) -> None:
    """--init starts from the shipped U-Net's weights (a near-zero learning rate leaves them as they were, where
    random ones would differ everywhere) and the card names it; --hard-negatives and --hard-positives mine every
    epoch, and the card says so."""
    import keras
    import numpy as np

    shipped = Registry().weights_dir / "segmenter" / "1.1.0"
    out = tmp_path / "o"
    rc = _run(["train", "segmenter", "--data", str(tiny_set), "--out", str(out), "--epochs", "2", "--steps", "1",
               "--init", str(shipped), "--hard-negatives", "0.5", "--hard-positives", "0.25",
               "--hard-positive-kind", "background", "--learning-rate", "1e-9", "--quiet"])
    assert rc == 0
    card = json.loads((out / CARD_FILE).read_text())
    start = card["training"]["initialised_from"]
    assert (start["name"], start["version"]) == ("pacsnode-lung-lesion-unet", "1.1.0") and len(start["sha256"]) == 64
    assert card["training"]["settings"]["hard_negative_fraction"] == 0.5
    assert card["training"]["settings"]["hard_positive_fraction"] == 0.25
    assert card["training"]["settings"]["hard_positive_kind"] == "background"
    assert ("25% of the lesion ones are hard positives (slices where the model, at each epoch's start, finds less "
            "than half of the lesion, calling most of the rest background)") in card["training"]["augmentation"]
    history = json.loads((out / "history.json").read_text())
    assert len(history["hard_negatives"]) == 2 and len(history["hard_positives"]) == 2
    before = keras.models.load_model(shipped / "model.keras", compile=False).get_weights()
    after = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True)) < 1e-6


def test_init_from_a_unet_of_another_shape_is_refused(tiny_set: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(Registry().weights_dir / "segmenter" / "1.1.0", other)
    card = json.loads((other / CARD_FILE).read_text())
    card["architecture"]["depth"] = 4
    (other / CARD_FILE).write_text(json.dumps(card))
    rc = _run(["train", "segmenter", "--data", str(tiny_set), "--out", str(tmp_path / "o"), "--epochs", "1",
               "--init", str(other), "--quiet"])
    assert rc == 1 and "is not the one to train (base 12, depth 3, grid 128)" in capsys.readouterr().err
