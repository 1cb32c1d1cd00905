"""training.candidates (`pacsnode train candidates`): the shipped U-Net 1.1.0's candidates on new phantoms, labelled
from the reference masks, a CNN trained for two epochs, written as a version the registry loads and the segmenter
runs; a dataset the U-Net trained on is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.candidates import LABEL_OVERLAP
from models.registry import DEFAULT_WEIGHTS_DIR, Registry
from training.candidates import CandidateSettings, collect, train_candidates
from training.common import TrainingError
from training.phantom import generate_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cand")
    generate_dataset(out, cases=8, seed=44, size=96, slices=(12, 12), prevalence=0.75)
    return out


def test_candidates_are_labelled_by_their_overlap_with_the_reference_lesion(tmp_path, data) -> None:

    from models.candidates import extract, lesion_in_lungs
    from models.preprocess import masks_to_grid, window
    from training.common import read_table
    from training.dataset import load_dataset
    from training.phantom import load_masks
    from training.prepared import prepare

    seg = Registry().segmenter("1.1.0")
    got = collect([data], seg, tmp_path / "cache", log=lambda _: None)
    assert got.n_cases == 8 and len(got.labels) == len(got.cases) == len(got.patches) > 0
    assert 0 < got.labels.sum() < len(got.labels)  # lesions and look-alikes
    # one case by hand: the share of each component's voxels inside the reference lesion
    ds = load_dataset(data)
    prep = prepare(ds, 128, tmp_path / "cache")
    case = int(got.cases[np.argmax(got.labels)])  # a case with a lesion candidate
    x = window(prep.cases[case].hu.astype(np.float32), seg.preprocess)
    found = extract(x, lesion_in_lungs(seg.grid_probabilities(x)))
    table = read_table(data)
    ref = masks_to_grid(load_masks(data / str(table.masks.iloc[case]))["lesion"], 128) >= 0.5
    share = np.array([ref[found.labels == k + 1].mean() for k in range(len(found))])
    np.testing.assert_array_equal(got.labels[got.cases == case], share >= LABEL_OVERLAP)


def test_train_candidates_writes_a_version_the_node_runs(tmp_path, data) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "segmenter" / "1.1.0", weights / "segmenter" / "1.1.0")
    reg = Registry(weights)
    out = weights / "candidates" / "0.1.0"
    card = train_candidates([data], out, registry=reg, segmenter_version="1.1.0", cache_dir=tmp_path / "cache",
                            settings=CandidateSettings(epochs=2, held_out_cases=0.5), version="0.1.0",
                            log=lambda _: None)
    t = card["training"]
    assert card["kind"] == "candidates" and card["segmenter"] == {"name": "pacsnode-lung-lesion-unet",
                                                                  "version": "1.1.0"}
    assert t["data"][0]["seed"] == 44 and t["cases"] == 8 and t["held_out_cases"] == 4
    assert 0 <= t["held_out_roc_auc"] <= 1 and t["best_epoch"] in (1, 2)
    assert "Not for clinical use" in card["intended_use"]
    assert json.loads((out / "model_card.json").read_text())["files"]["model.keras"]["sha256"]
    loaded = Registry(weights).candidates("0.1.0")
    assert loaded.segmenter == ("pacsnode-lung-lesion-unet", "1.1.0")
    assert Registry(weights).candidates_over(Registry(weights).segmenter("1.1.0")) is loaded
    from models.preprocess import load_series
    from training.common import read_table, series_files

    volume = load_series(series_files(data, str(read_table(data).dicom_dir.iloc[0])))
    scored = Registry(weights).segmenter("1.1.0").predict(volume, loaded).evidence.candidates
    assert scored is not None and ((scored.scores >= 0) & (scored.scores <= 1)).all()


def test_a_dataset_the_segmenter_trained_on_is_refused(tmp_path) -> None:
    known = tmp_path / "train"
    generate_dataset(known, cases=2, seed=1000, size=48, slices=4)  # U-Net 1.1.0's training seed
    with pytest.raises(TrainingError, match="seed the segmenter's card names"):
        train_candidates([known], tmp_path / "out", segmenter_version="1.1.0", cache_dir=tmp_path / "cache",
                         log=lambda _: None)


def test_an_ensemble_is_one_model_scoring_the_mean_of_its_members(tmp_path, data) -> None:
    """``--members 2``: two CNNs (seeds 7 and 8) on the same training and held-out cases, saved as one model whose
    score is their mean — the registry loads it and the node's candidate stage runs it like a single CNN."""
    from models.candidates import Candidates
    from models.registry import CARD_FILE

    weights = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "segmenter" / "1.1.0", weights / "segmenter" / "1.1.0")
    out = weights / "candidates" / "0.2.0"
    card = train_candidates([data], out, registry=Registry(weights), segmenter_version="1.1.0",
                            cache_dir=tmp_path / "cache",
                            settings=CandidateSettings(epochs=2, held_out_cases=0.5, seed=7, members=2),
                            version="0.2.0", log=lambda _: None)
    t = card["training"]
    assert [m["seed"] for m in t["members"]] == [7, 8] and "best_epoch" not in t
    assert all(m["best_epoch"] in (1, 2) and 0 <= m["held_out_roc_auc"] <= 1 for m in t["members"])
    assert "the mean of 2 such CNNs (seeds 7-8)" in card["architecture"]["type"]
    assert json.loads((out / CARD_FILE).read_text())["training"]["members"] == t["members"]
    loaded = Registry(weights).candidates("0.2.0")
    model = loaded._m.model
    members = [model.get_layer(f"candidates_{i}") for i in (1, 2)]
    rng = np.random.default_rng(0)
    x = {"patch": rng.random((5, 32, 32, loaded.channels), dtype=np.float32),
         "scalars": rng.random((5, 2), dtype=np.float32)}
    each = [np.asarray(m.predict(x, verbose=0)).reshape(-1) for m in members]
    assert not np.allclose(each[0], each[1])  # two different CNNs…
    found = Candidates(x["patch"], x["scalars"], np.ones(5, np.int64), x["scalars"][:, 1],
                       np.zeros((5, 3), np.int64), np.zeros((1, 1, 1), np.int32))
    np.testing.assert_allclose(loaded.scores(found), (each[0] + each[1]) / 2,
                               rtol=1e-5, atol=1e-6)  # …and the node's candidate stage scores their mean


def test_members_below_one_is_refused_before_any_work(tmp_path, capsys) -> None:
    from training.cli import main

    rc = main(["train", "candidates", "--data", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "out"), "--members", "0"])
    assert rc == 2 and "--members must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_size_weighting_gives_each_lesion_size_band_the_same_total_and_keeps_the_class_totals() -> None:
    from training.candidates import MAX_BAND_BOOST, SIZE_BANDS, sample_weights

    rng = np.random.default_rng(0)
    # 900 lesion candidates, most of them large (as extensive disease makes them), 200 small; 4000 non-lesion
    sizes = np.concatenate([rng.uniform(5.0, 8.0, 700), rng.uniform(2.0, 4.0, 200), rng.uniform(0.5, 2.5, 4000)])
    labels = np.concatenate([np.ones(900), np.zeros(4000)]).astype(np.float32)
    scalars = np.column_stack([sizes, rng.uniform(0.5, 1.0, len(sizes))]).astype(np.float32)
    by_class = sample_weights(labels, scalars, "class")
    by_size = sample_weights(labels, scalars, "size")
    lesion = labels == 1
    for w in (by_class, by_size):
        assert np.all(w[~lesion] == 1.0) and w[lesion].sum() == pytest.approx(4000)
    assert np.unique(by_class[lesion]).size == 1
    band = np.digitize(sizes[lesion], SIZE_BANDS)
    totals = [by_size[lesion][band == b].sum() for b in np.unique(band)]
    assert max(totals) == pytest.approx(min(totals))
    small = sizes[lesion] < 4.0
    assert by_size[lesion][small].mean() > 1.5 * by_class[lesion][0] > by_size[lesion][~small].mean()
    # a band of 20 small lesions would weigh 36 times the class weight each: capped
    few = np.concatenate([labels[:700], labels[880:]]), np.concatenate([scalars[:700], scalars[880:]])
    capped = sample_weights(*few, "size")
    assert capped.max() == pytest.approx(MAX_BAND_BOOST * sample_weights(*few, "class").max())
    with pytest.raises(TrainingError):
        sample_weights(labels, scalars, "balanced")
