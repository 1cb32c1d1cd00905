"""A lesion-fusing classifier version, loaded and run as the node runs it: the shipped classifier 2.0.0 and U-Net
1.0.0 (real weights, CPU) under a temporary weights folder whose classifier card gains a ``lesion_fusion`` block.

The fused probability is the card's regression over what the real segmenter saw; the pneumonia pipeline hands the
evidence over; the streamed path agrees with the plain one; the SR notes name the evidence; another segmenter
version or no evidence is refused. `training.lesion_fusion` fits such a version on phantoms new to both models."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from models.errors import ModelError
from models.lesion_evidence import CLASSIFIER_TERM, FEATURES_V2, FEATURES_V3, LesionFusion
from models.preprocess import load_series
from models.registry import DEFAULT_WEIGHTS_DIR, InferenceError, Registry, RegistryError
from node.config import GateSection
from node.pipelines import RegistryRunner
from node.pipelines.pneumonia import PneumoniaPipeline
from tests.ctgen import write_ct_series

SLICES, SIZE = 16, 128
COEFFICIENTS = {CLASSIFIER_TERM: 0.8, "max_lesion_logit": 0.6, "log1p_lesion_px": 0.3, "log1p_max_slice_px": 0.2,
                "log1p_lesion_slices": 0.4}


def fused_weights(tmp_path, *, segmenter_version: str = "1.0.0", version: str = "9.0.0"):
    """A weights folder: segmenter 1.0.0 and classifier ``version`` = 2.0.0's weights + a lesion_fusion block."""
    root = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "segmenter" / "1.0.0", root / "segmenter" / "1.0.0")
    folder = root / "classifier" / version
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "classifier" / "2.0.0", folder)
    card = json.loads((folder / "model_card.json").read_text())
    seg = json.loads((root / "segmenter" / "1.0.0" / "model_card.json").read_text())
    card.update(version=version, threshold=0.5, lesion_fusion=LesionFusion(
        (seg["name"], segmenter_version), COEFFICIENTS, -2.0, "a test").to_card())
    (folder / "model_card.json").write_text(json.dumps(card))
    return root


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    s = write_ct_series(tmp_path_factory.mktemp("src"), slices=SLICES, size=SIZE, seed=12)
    return s


def test_the_fused_probability_is_the_cards_regression_over_the_real_segmenters_evidence(tmp_path, series):
    runner = RegistryRunner(classifier_version="9.0.0", weights_dir=fused_weights(tmp_path), device="cpu")
    fusion = runner.classifier.fusion
    assert fusion is not None
    volume = load_series(series.paths)
    seg = runner.segment(volume)
    assert seg.evidence is not None and len(seg.evidence.slices) == SLICES
    assert seg.evidence.segmenter == (runner.segmenter.name, "1.0.0")
    out = runner.classifier.predict(volume, lesion=seg.evidence)
    assert out.classifier_probability is not None and out.probability != out.classifier_probability
    assert out.probability == pytest.approx(fusion.probability_of(out.classifier_probability,
                                                                     seg.evidence.features(fusion.features)))
    # the image alone is the same as classifier 2.0.0 gives on this series
    plain = Registry().classifier("2.0.0").predict(volume)
    assert out.classifier_probability == pytest.approx(plain.probability, abs=1e-6)
    # more lesion evidence, higher probability (positive coefficients); no evidence: no verdict
    ev = seg.evidence.slices
    more = replace(seg.evidence, slices=replace(ev, max_probability=ev.max_probability + 0.05, pixels=ev.pixels + 50))
    assert runner.classifier.predict(volume, lesion=more).probability > out.probability
    with pytest.raises(InferenceError, match="none was given"):
        runner.classify(volume)
    short = replace(seg.evidence, slices=ev.take(slice(0, 3)))
    with pytest.raises(InferenceError, match="3 slices"):
        runner.classify(volume, short)

    # the pipeline hands the segmenter's evidence to the classifier; the SR notes say what was fused and how
    findings = PneumoniaPipeline().analyse(volume, runner, GateSection(scope_check=False, min_slices=8))
    direct = runner.classify(volume, seg.evidence)  # with the header's clinical inputs, as the pipeline
    assert findings.probability == pytest.approx(direct.probability, abs=1e-9) and findings.threshold == 0.5
    inputs = dict(findings.notes.fused_evidence)
    assert inputs["image classifier"].startswith("probability ") and "before the lesion fusion" in inputs["image classifier"]
    assert inputs["segmenter lesion evidence"] == seg.evidence.describe()
    assert "age" in dict(findings.notes.fusion_inputs) and "segmenter lesion evidence" not in dict(findings.notes.fusion_inputs)
    assert "lesion fusion" in findings.notes.calibration and "fuses the image classifier" in findings.notes.operating_point


def test_the_streamed_path_fuses_the_same_evidence(tmp_path, series):
    from models.streaming import SliceModels
    from node.prefetch import StreamingRunner

    runner = RegistryRunner(classifier_version="9.0.0", weights_dir=fused_weights(tmp_path), device="cpu")
    models = SliceModels(runner.classifier, runner.segmenter)
    streamed = StreamingRunner(runner, models, models.read(series.paths))
    volume = load_series(series.paths)
    s_seg, p_seg = streamed.segment(volume), runner.segment(load_series(series.paths))
    assert s_seg.evidence is not None and p_seg.evidence is not None
    # the U-Net's softmax agrees within 1e-3 between the two paths (models.streaming): so do the features
    s_ev, p_ev = s_seg.evidence.slices, p_seg.evidence.slices
    assert np.allclose(s_ev.max_probability, p_ev.max_probability, atol=1e-3)
    assert np.allclose(s_ev.top, p_ev.top, atol=1e-3)
    assert np.abs(s_ev.pixels - p_ev.pixels).max() <= 2 and np.abs(s_ev.pixels_p30 - p_ev.pixels_p30).max() <= 2
    assert np.allclose(s_seg.evidence.features(FEATURES_V2), p_seg.evidence.features(FEATURES_V2), atol=0.05)
    s_cls, p_cls = streamed.classify(volume, s_seg.evidence), runner.classify(volume, p_seg.evidence)
    assert s_cls.probability == pytest.approx(p_cls.probability, abs=2e-3)
    assert dict(s_cls.notes.fused_evidence).keys() == dict(p_cls.notes.fused_evidence).keys() == {
        "image classifier", "segmenter lesion evidence"}


def test_a_fusion_fitted_with_another_segmenter_version_is_refused_at_load(tmp_path):
    weights = fused_weights(tmp_path, segmenter_version="0.9.0", version="9.0.1")
    with pytest.raises(RegistryError, match="not from pacsnode-lung-lesion-unet 1.0.0"):
        RegistryRunner(classifier_version="9.0.1", segmenter_version="1.0.0", weights_dir=weights, device="cpu")
    # without a segmenter version the runner loads the fusion's own, which is not installed here: said so
    with pytest.raises(RegistryError, match=r"9\.0\.1 fuses the lesion evidence of pacsnode-lung-lesion-unet 0\.9\.0, "
                                            r"which cannot be loaded: .*no version '0\.9\.0'"):
        RegistryRunner(classifier_version="9.0.1", weights_dir=weights, device="cpu")
    card = weights / "classifier" / "9.0.1" / "model_card.json"
    broken = json.loads(card.read_text())
    broken["lesion_fusion"]["coefficients"].pop("log1p_lesion_px")
    broken["version"] = "9.0.2"
    shutil.copytree(card.parent, weights / "classifier" / "9.0.2")
    (weights / "classifier" / "9.0.2" / "model_card.json").write_text(json.dumps(broken))
    with pytest.raises(ModelError, match="lesion_fusion coefficients must be exactly"):
        Registry(weights).classifier("9.0.2")


def test_fuse_lesion_fits_a_candidate_version_on_new_phantoms_and_refuses_known_seeds(tmp_path):
    from training.common import TrainingError
    from training.lesion_fusion import fit_lesion_fusion
    from training.phantom import generate_dataset

    root = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR, root)
    data = tmp_path / "fit"
    generate_dataset(data, cases=24, seed=77, size=96, slices=(10, 12))
    reg = Registry(root)
    default = reg.default_version("classifier")
    card = fit_lesion_fusion(data, reg, base_version="2.0.0", segmenter_version="1.0.0", version="2.1.0-test",
                             progress=False)
    assert card["candidate"] is True and card["derived_from"]["classifier"] == "2.0.0"
    v = card["metrics"]["validation"]
    assert v["dataset"]["seed"] == 77 and v["dataset"]["cases"] == 24 and 0 <= v["roc_auc"] <= 1
    # new fits take the newest set the models allow: no candidate model was trained over U-Net 1.0.0, so v2
    assert set(card["lesion_fusion"]["coefficients"]) == {CLASSIFIER_TERM, *FEATURES_V2}
    folder = root / "classifier" / "2.1.0-test"
    assert (folder / "model.keras").read_bytes() == (root / "classifier" / "2.0.0" / "model.keras").read_bytes()
    loaded = reg.classifier("2.1.0-test")
    assert loaded.fusion is not None and loaded.threshold == card["threshold"]
    assert reg.default_version("classifier") == default  # a candidate is never the default by itself
    with pytest.raises(TrainingError, match="already exists"):
        fit_lesion_fusion(data, reg, base_version="2.0.0", segmenter_version="1.0.0", version="2.1.0-test",
                          progress=False)
    known = tmp_path / "val"
    generate_dataset(known, cases=2, seed=2000, size=48, slices=4)  # the classifiers' validation seed
    with pytest.raises(TrainingError, match="seed 2000"):
        fit_lesion_fusion(known, reg, base_version="2.0.0", segmenter_version="1.0.0", version="2.1.1",
                          progress=False)
    with pytest.raises(TrainingError, match="already fuses"):
        fit_lesion_fusion(data, reg, base_version="2.1.0-test", segmenter_version="1.0.0", version="2.1.2",
                          progress=False)
    # over U-Net 1.1.0 the shipped candidate model 1.0.0 applies: a v3 fit naming it
    v3 = fit_lesion_fusion(data, reg, base_version="2.0.0", segmenter_version="1.1.0", version="2.4.0-test",
                           progress=False)
    assert set(v3["lesion_fusion"]["coefficients"]) == {CLASSIFIER_TERM, *FEATURES_V3}
    assert v3["lesion_fusion"]["candidates"] == {"name": "pacsnode-lesion-candidates", "version": "1.0.0"}
    assert v3["derived_from"]["candidates"]["version"] == "1.0.0"
    # new fits pool the evidence at 5 mm, and the card states the smallest matrix fitted on (the node refuses below)
    assert v3["lesion_fusion"]["pool_spacing_mm"] == 5.0 and reg.classifier("2.4.0-test").fusion.pool_spacing_mm == 5.0
    assert v3["validated_acquisition"]["min_matrix"] == 96 == reg.classifier("2.4.0-test").min_matrix
    assert "10-12 point-sampled slices; lesion evidence pooled at 5 mm" in v3["validated_acquisition"]["slices"]
    assert reg.candidates_for(reg.classifier("2.4.0-test")) is reg.candidates("1.0.0")
    trained_on = tmp_path / "cand-train"
    generate_dataset(trained_on, cases=2, seed=9000, size=48, slices=4)  # a set the candidate model trained on
    with pytest.raises(TrainingError, match="seed 9000"):
        fit_lesion_fusion(trained_on, reg, base_version="2.0.0", segmenter_version="1.1.0", version="2.4.1",
                          progress=False)


def test_the_shipped_v2_fusion_runs_on_both_paths(series):
    """Classifier 2.3.0 (v2 graded features) beside U-Net 1.1.0, the shipped weights: the fused probability is its
    card's regression over the v2 features on the plain path, and the streamed path agrees."""
    from models.streaming import SliceModels
    from node.prefetch import StreamingRunner

    runner = RegistryRunner(classifier_version="2.3.0", segmenter_version="1.1.0", device="cpu")
    fusion = runner.classifier.fusion
    assert fusion is not None and fusion.features == FEATURES_V2
    volume = load_series(series.paths)
    seg = runner.segment(volume)
    assert seg.evidence is not None
    out = runner.classify(volume, seg.evidence)
    base = runner.classifier.predict(volume, lesion=seg.evidence)
    assert base.classifier_probability is not None
    assert base.probability == pytest.approx(fusion.probability_of(base.classifier_probability,
                                                                   seg.evidence.features(FEATURES_V2)))
    assert "at p >= 0.3" in dict(out.notes.fused_evidence)["segmenter lesion evidence"]
    models = SliceModels(runner.classifier, runner.segmenter)
    streamed = StreamingRunner(runner, models, models.read(series.paths))
    s_seg = streamed.segment(volume)
    assert streamed.classify(volume, s_seg.evidence).probability == pytest.approx(out.probability, abs=2e-3)
