"""models.registry: shipped weights load (once), predict on the source grid, version selection, integrity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.lesion_evidence import FEATURES_V1, FEATURES_V2, FEATURES_V3
from models.preprocess import dice, load_series
from models.registry import (
    CARD_FILE,
    DEFAULT_WEIGHTS_DIR,
    MODEL_FILE,
    Classifier,
    Registry,
    RegistryError,
    Segmenter,
    version_key,
)

from .util import case_files, case_masks


def test_shipped_cards_say_synthetic_and_not_for_clinical_use() -> None:
    reg = Registry()
    for name in ("classifier", "segmenter"):
        versions = reg.versions(name)
        assert versions, f"no shipped {name} weights under {DEFAULT_WEIGHTS_DIR}"
        card = json.loads((reg.folder(name) / CARD_FILE).read_text())
        assert card["not_for_clinical_use"] is True
        assert "not for clinical use" in card["intended_use"].lower()
        assert "synthetic" in card["intended_use"].lower()
        assert card["training"]["data"]["generator"] == "training.phantom"
        assert "test" in card["metrics"], "the model-eval results must be recorded in the card"
        size = (reg.folder(name) / MODEL_FILE).stat().st_size
        assert size < 4_000_000, f"{name} weights are {size} bytes"


def test_classifier_predicts_on_a_small_phantom(tiny_phantom: Path) -> None:
    reg = Registry()
    clf = reg.classifier()
    assert isinstance(clf, Classifier) and clf.name and clf.version == reg.default_version("classifier")
    vol = load_series(case_files(tiny_phantom, 0))
    # the default classifier fuses the U-Net's lesion evidence, with the candidate stage's scores
    evidence = reg.segmenter().predict(vol, reg.candidates_for(clf)).evidence
    out = clf.predict(vol, age=vol.patient_age, sex=vol.patient_sex, lesion=evidence)
    assert 0.0 <= out.probability <= 1.0 and 0.0 < out.threshold < 1.0
    assert out.attention.shape == (vol.shape[0],)
    assert out.attention.sum() == pytest.approx(1.0, abs=1e-4) and (out.attention >= 0).all()
    # Without age and sex the model still answers (missing-aware fusion).
    assert 0.0 <= clf.predict(vol, lesion=evidence).probability <= 1.0


def test_segmenter_masks_are_on_the_source_grid(small_phantom: Path) -> None:
    seg = Registry().segmenter()
    assert isinstance(seg, Segmenter)
    vol = load_series(case_files(small_phantom, 0))
    out = seg.predict(vol)
    assert out.lungs.shape == vol.hu.shape == out.lesion.shape
    assert out.lungs.dtype == bool and out.lesion.dtype == bool
    assert not (out.lesion & ~out.lungs).any()
    truth = case_masks(small_phantom, 0)
    assert dice(out.lungs, truth["lungs"]) > 0.8
    assert vol.hu[out.lungs].mean() < -500


def test_models_load_once_per_process() -> None:
    a, b = Registry(), Registry(DEFAULT_WEIGHTS_DIR)
    assert a.classifier() is b.classifier() and a.segmenter() is b.segmenter()


def _copy_version(src_kind: str, dst: Path, version: str) -> Path:
    src = Registry().folder(src_kind)
    folder = dst / src_kind / version
    shutil.copytree(src, folder)
    card = json.loads((folder / CARD_FILE).read_text())
    card["version"] = version
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def test_latest_version_and_explicit_versions(tmp_path: Path) -> None:
    for v in ("1.2.0", "1.10.0", "1.9.3"):
        _copy_version("classifier", tmp_path, v)
    reg = Registry(tmp_path)
    assert reg.versions("classifier") == ["1.2.0", "1.9.3", "1.10.0"]
    assert reg.classifier().version == "1.10.0"
    assert reg.classifier("1.2.0").version == "1.2.0"
    with pytest.raises(RegistryError, match="no version"):
        reg.classifier("2.0.0")
    with pytest.raises(RegistryError, match="no versions"):
        reg.segmenter()


def test_a_release_candidate_is_loaded_only_on_request(tmp_path: Path) -> None:
    _copy_version("classifier", tmp_path, "1.0.0")
    rc = _copy_version("classifier", tmp_path, "2.0.0")
    card = json.loads((rc / CARD_FILE).read_text())
    (rc / CARD_FILE).write_text(json.dumps({**card, "candidate": True}))
    reg = Registry(tmp_path)
    assert reg.default_version("classifier") == "1.0.0"
    assert reg.classifier().version == "1.0.0"
    assert reg.classifier("2.0.0").version == "2.0.0"
    (rc / CARD_FILE).write_text(json.dumps({**card, "candidate": False}))
    assert Registry(tmp_path).default_version("classifier") == "2.0.0"


def test_the_shipped_default_classifier_is_the_released_one() -> None:
    """2.0.0 (clinical fusion with symptoms) scored below 1.0.0 on the test phantoms: shipped as a candidate.
    2.1.0 (2.0.0's weights + U-Net 1.0.0's lesion evidence) was the default until 2.3.0 (the same weights + U-Net
    1.1.0's graded v2 evidence), 2.3.0 until 2.4.0 (v3: v2 + the candidate stage's scores), and 2.4.0 until 2.6.0
    (v3 pooled at 5 mm, fitted on thin slices too; 2.5.0, the same on fewer fit cases, failed its rule): each card
    records its paired comparison on a held-out test set with the default it replaced, and the default's fusion
    names the default segmenter and the candidate model trained over it."""
    reg = Registry()
    assert {"1.0.0", "2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0", "2.5.0", "2.6.0"} <= set(reg.versions("classifier"))
    assert reg.default_version("classifier") == "2.6.0" and reg.default_version("segmenter") == "1.1.0"
    for candidate in ("2.0.0", "2.2.0", "2.5.0"):
        assert json.loads((reg.folder("classifier", candidate) / CARD_FILE).read_text())["candidate"] is True
    clf, seg = reg.classifier(), reg.segmenter()
    assert clf.fusion is not None and clf.fusion.segmenter == (seg.name, seg.version)
    assert clf.fusion.features == FEATURES_V3 and "out-of-fold" in clf.card["threshold_rule"]
    cand = reg.candidates_for(clf)
    assert cand is not None and clf.fusion.candidates == (cand.name, cand.version) == (cand.name, "1.0.0")
    assert cand.segmenter == (seg.name, seg.version) and reg.candidates_over(seg) is cand
    assert reg.candidates_for(reg.classifier("2.3.0")) is None  # v2: no candidate stage
    assert clf.fusion.pool_spacing_mm == 5.0 and clf.min_matrix == 256  # pooled; the matrix its fusion was fitted on
    thin = clf.card["metrics"]["thin_slices"]  # judged on thin slices too, against the default it replaced
    assert thin["dataset"]["slices_range"][0] >= 200 and thin["comparison"]["old"]["classifier"] == "2.4.0"
    assert thin["comparison"]["mcnemar"]["b_only_correct"] <= thin["comparison"]["mcnemar"]["a_only_correct"]
    for version, old, key in (("2.1.0", "1.0.0", "comparison_with_default"), ("2.3.0", "2.1.0", "comparison"),
                              ("2.4.0", "2.3.0", "comparison"), ("2.6.0", "2.4.0", "comparison")):
        card = reg.classifier(version).card
        test = card["metrics"]["test"]
        assert test["dataset"]["seed"] not in (card["training"]["data"]["seed"],
                                               card["metrics"]["validation"]["dataset"]["seed"])
        compared = test[key]
        assert compared["old"]["classifier"] == old and compared["cases"] == test["cases"]
        assert compared["roc_auc"]["new"] == test["roc_auc"] >= compared["roc_auc"]["old"]
        # no more test cases that only the replaced default got right than the other way round
        assert compared["mcnemar"]["b_only_correct"] <= compared["mcnemar"]["a_only_correct"]
    assert reg.classifier("2.1.0").card["metrics"]["test"]["comparison_with_default"]["mcnemar"]["b_only_correct"] == 0
    # asking for an older fusing classifier alone loads the U-Net its fusion was fitted with
    assert reg.segmenter_for(reg.classifier("2.1.0")).version == "1.0.0"
    assert reg.segmenter_for(reg.classifier("2.2.0")).version == "1.1.0"
    assert reg.segmenter_for(reg.classifier("2.0.0")).version == "1.1.0"  # no fusion: the default
    assert reg.segmenter_for(reg.classifier("2.1.0"), "1.1.0").version == "1.1.0"  # asked for: given (runner refuses)


def test_segmenter_1_1_0_is_the_default_with_its_test_comparison() -> None:
    """U-Net 1.1.0 (faint lesions drawn as often as extensive disease) is the default beside classifier 2.4.0; its
    card records the held-out comparison with 1.0.0 (model-eval --compare-with --write-card). Classifier 2.2.0
    (v1 features with 1.1.0's evidence) stays a candidate."""
    reg = Registry()
    assert {"1.0.0", "1.1.0"} <= set(reg.versions("segmenter"))
    seg = reg.segmenter()
    assert seg.version == "1.1.0" and "candidate" not in seg.card and "release" in seg.card
    assert seg.card["training"]["settings"]["lesion_sampling"] == "case"
    test = seg.card["metrics"]["test"]
    assert test["dataset"]["seed"] not in (seg.card["training"]["data"]["seed"],
                                           seg.card["metrics"]["validation"]["dataset"]["seed"])
    compared = test["comparison"]  # recorded by model-eval --compare-with --write-card (training.evaluate.compare)
    old = reg.segmenter("1.0.0").card["metrics"]["test"]
    assert old["dataset"] == test["dataset"]  # the same held-out phantoms
    assert (compared["new"], compared["old"]) == ("1.1.0", "1.0.0") and compared["paired_cases"] == 50
    assert test["lesion_dice_mean"] > old["lesion_dice_mean"] and compared["lesion_dice_difference_ci95"][0] > 0
    assert compared["lesion_dice_mean"]["old"] == pytest.approx(old["lesion_dice_mean"])
    for version, features in (("2.2.0", FEATURES_V1), ("2.3.0", FEATURES_V2), ("2.4.0", FEATURES_V3)):
        fused = reg.classifier(version)
        assert fused.fusion is not None and fused.fusion.segmenter == (seg.name, "1.1.0")
        assert fused.fusion.features == features
    v22 = reg.classifier("2.2.0").card
    assert v22["candidate"] is True and v22["metrics"]["test"]["dataset"] == test["dataset"]


def test_corrupt_or_mismatched_weights_are_refused(tmp_path: Path) -> None:
    folder = _copy_version("classifier", tmp_path, "3.0.0")
    (folder / MODEL_FILE).write_bytes((folder / MODEL_FILE).read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="sha256"):
        Registry(tmp_path).classifier()
    seg_as_clf = _copy_version("segmenter", tmp_path / "x", "1.0.0")
    seg_as_clf.parent.rename(tmp_path / "x" / "classifier")
    with pytest.raises(RegistryError, match="expected 'classifier'"):
        Registry(tmp_path / "x").classifier()
    bad = tmp_path / "y" / "classifier" / "1.0.0"
    bad.mkdir(parents=True)
    (bad / CARD_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read model card"):
        Registry(tmp_path / "y").classifier()


def test_version_key_orders_numerically() -> None:
    assert sorted(["1.10.0", "1.2.0", "0.9"], key=version_key) == ["0.9", "1.2.0", "1.10.0"]


def test_attention_follows_the_lesion(small_phantom: Path) -> None:
    # On a pneumonia phantom the classifier should put more attention on lesion slices than on the rest.
    clf = Registry().classifier()
    hits = 0
    for i in range(4):
        vol = load_series(case_files(small_phantom, i))
        les = case_masks(small_phantom, i)["lesion"].any(axis=(1, 2))
        att = clf.predict(vol, lesion=Registry().segmenter().predict(vol, Registry().candidates_for(clf)).evidence).attention
        hits += int(att[les].mean() > att[~les].mean()) if les.any() and (~les).any() else 0
    assert hits >= 3


@pytest.mark.slow
def test_shipped_models_on_fresh_phantoms(tmp_path: Path) -> None:
    # A seed never used in training; the documented 100-case evaluation is `pacsnode model-eval` (see the cards).
    from training.evaluate import evaluate
    from training.phantom import generate_dataset

    generate_dataset(tmp_path, cases=30, seed=777, prevalence=0.5, size=256, slices="40-60")
    res = evaluate(tmp_path, Registry(), progress=False)
    assert res["classifier"]["roc_auc"] >= 0.85
    assert res["segmenter"]["lung_dice_mean"] >= 0.9
    assert res["segmenter"]["lesion_dice_mean"] >= 0.5


@pytest.mark.slow
def test_512px_120_slice_series_in_a_few_seconds(tmp_path: Path) -> None:
    import time

    from training.phantom import generate_dataset

    generate_dataset(tmp_path, cases=1, seed=778, prevalence=1.0, size=512, slices=120)
    vol = load_series(sorted(tmp_path.glob("CASE0001/dicom/*.dcm")))
    reg = Registry()
    clf, seg = reg.classifier(), reg.segmenter()
    cand = reg.candidates_for(clf)
    clf.predict(vol, lesion=seg.predict(vol, cand).evidence)  # warm-up (tracing)
    vol = load_series(sorted(tmp_path.glob("CASE0001/dicom/*.dcm")))  # fresh volume: no cached grid
    t = time.perf_counter()
    s = seg.predict(vol, cand)
    c = clf.predict(vol, lesion=s.evidence)
    elapsed = time.perf_counter() - t
    assert c.attention.shape == (120,) and s.lesion.shape == (120, 512, 512)
    assert elapsed < 10.0, f"classifier + U-Net took {elapsed:.1f} s"


def test_predict_on_a_real_single_slice_ct() -> None:
    from pydicom.data import get_testdata_file

    vol = load_series([get_testdata_file("CT_small.dcm")])
    reg = Registry()
    seg = reg.segmenter().predict(vol, reg.candidates_for(reg.classifier()))
    out = reg.classifier().predict(vol, age=vol.patient_age, sex=vol.patient_sex, lesion=seg.evidence)
    assert out.attention.shape == (1,) and out.attention[0] == pytest.approx(1.0)
    assert seg.lungs.shape == vol.hu.shape == seg.lesion.shape


def test_older_classifier_versions_load_on_request(tiny_phantom: Path) -> None:
    """1.0.0 (the default) fuses age and sex (4 features, no calibration); 2.0.0 fuses symptoms too and is
    calibrated; each loads by version."""
    from models.clinical import AGE_SEX, AGE_SEX_SYMPTOMS, ClinicalInputs

    reg = Registry()
    old, new = reg.classifier("1.0.0"), reg.classifier("2.0.0")
    assert (old.clinical_schema, old.clinical_used, old.temperature) == (AGE_SEX, ("age", "sex"), 1.0)
    assert new.version != "1.0.0" and new.clinical_schema == AGE_SEX_SYMPTOMS
    assert new.clinical_used == ("age", "sex", "fever", "cough", "dyspnoea")
    assert new.calibration is not None and new.calibration["method"] == "temperature"
    vol = load_series(case_files(tiny_phantom, 0))
    given = ClinicalInputs(age=60.0, sex="F", fever=1.0)
    out_old, out_new = old.predict(vol, clinical=given), new.predict(vol, clinical=given)
    assert out_old.clinical is not None and out_old.clinical.fever is None  # 1.0.0 does not read symptoms
    assert out_old.raw_probability == out_old.probability
    assert out_new.clinical is not None and out_new.clinical.fever == 1.0
    assert out_new.raw_probability is not None and 0.0 < out_new.probability < 1.0


def test_classifier_cards_score_each_stage_of_the_probability_apart() -> None:
    """Every 2.x card's test ECE in three stages: raw, temperature-scaled, fused. The fusing versions (2.1.0-2.4.0)
    share 2.0.0's weights and temperature, so their temperature-scaled ECE is 2.0.0's; on these test phantoms the
    temperature raised it and the fusion lowered it (the cards once read raw -> fused as "uncalibrated ->
    calibrated"). Every version still loads."""
    reg = Registry()
    base = reg.classifier("2.0.0").card["metrics"]["test"]
    assert base["ece_fused"] is None and base["ece"] == base["ece_temperature_scaled"] > base["ece_raw"]
    for version in ("2.1.0", "2.2.0", "2.3.0", "2.4.0"):
        clf = reg.classifier(version)
        assert clf.version == version and clf.fusion is not None
        test = clf.card["metrics"]["test"]
        assert "ece_uncalibrated" not in test
        assert test["ece_raw"] == pytest.approx(base["ece_raw"], abs=1e-6)
        assert test["ece_temperature_scaled"] == pytest.approx(base["ece_temperature_scaled"], abs=1e-6)
        assert test["ece_fused"] == test["ece"] < test["ece_raw"] < test["ece_temperature_scaled"]
