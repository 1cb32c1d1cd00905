"""models.candidates: the U-Net's 3-D lesion candidates and their patches (synthetic probabilities, checked against
hand-placed blobs), a candidate model loaded through the registry and run over a series by the segmenter (both
paths), and a v3 lesion fusion that takes its scores (the shipped classifier 2.0.0 and U-Net 1.1.0, real weights)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from models.candidates import (
    CONTEXT,
    HALF,
    THRESHOLD,
    CandidateEvidence,
    build_model,
    extract,
    lesion_in_lungs,
    patch_channels,
)
from models.lesion_evidence import CLASSIFIER_TERM, FEATURES_V3, LesionFusion, LesionFusionError
from models.preprocess import load_series, volume_grid, window
from models.registry import DEFAULT_WEIGHTS_DIR, InferenceError, Registry, RegistryError

G = 64


def _volume(slices: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((slices, G, G, 2), dtype=np.float32)
    lp = np.zeros((slices, G, G), np.float32)
    lp[2:4, 30:34, 30:34] = 0.6  # a 2-slice blob, its peak at (3, 32, 31)
    lp[3, 32, 31] = 0.9
    lp[0, 58, 58] = 0.7  # one voxel on the first slice, near the grid's edge ...
    lp[1, 59, 59] = 0.55  # ... and one touching it only at a corner (26-connected): one candidate
    lp[5, 60:62, 30:33] = 0.45  # below the threshold: none
    return x, lp


def test_candidates_are_the_26_connected_components_with_a_patch_around_each_peak() -> None:
    x, lp = _volume()
    found = extract(x, lp)
    assert len(found) == 2
    order = np.argsort(found.voxels)
    small, blob = (int(i) for i in order)
    assert found.voxels[blob] == 32 and found.voxels[small] == 2
    assert tuple(found.centres[blob]) == (3, 32, 31) and found.peaks[blob] == pytest.approx(0.9)
    assert tuple(found.centres[small]) == (0, 58, 58) and found.peaks[small] == pytest.approx(0.7)
    np.testing.assert_allclose(found.scalars[:, 0], np.log1p(found.voxels))
    assert found.patches.shape == (2, 2 * HALF, 2 * HALF, patch_channels(2)) == (2, 32, 32, 9)
    # channel (slice j, channel c) = j·3 + c: the inputs then lp, slices peak−1 … peak+1
    p = found.patches[blob]
    for j, k in enumerate(range(3 - CONTEXT, 3 + CONTEXT + 1)):
        np.testing.assert_array_equal(p[..., 3 * j : 3 * j + 2], x[k, 32 - HALF : 32 + HALF, 31 - HALF : 31 + HALF])
        np.testing.assert_array_equal(p[..., 3 * j + 2], lp[k, 32 - HALF : 32 + HALF, 31 - HALF : 31 + HALF])
    # the first slice's candidate: nothing before the volume, zeros where the patch leaves the grid
    q = found.patches[small]
    assert not q[..., 0:3].any()
    inside = G - 58 + HALF
    np.testing.assert_array_equal(q[:inside, :inside, 3:5], x[0, 58 - HALF :, 58 - HALF :])
    assert not q[inside:, :, 3:6].any() and not q[:, inside:, 3:6].any()
    # the labelled volume maps voxels to candidates
    assert (found.labels == blob + 1).sum() == 32 and found.labels[5].max() == 0
    empty = extract(x, np.full_like(lp, THRESHOLD - 0.01))
    assert len(empty) == 0 and empty.patches.shape == (0, 32, 32, 9) and empty.scalars.shape == (0, 2)


def test_lesion_in_lungs_keeps_the_lesion_probability_inside_the_lungs_only() -> None:
    p = np.zeros((1, 2, 2, 3), np.float32)
    p[0, 0, 0] = (0.2, 0.3, 0.5)  # in the lungs (0.8)
    p[0, 0, 1] = (0.6, 0.0, 0.4)  # outside (0.4)
    p[0, 1, 0] = (0.5, 0.0, 0.5)  # exactly 0.5: inside
    np.testing.assert_allclose(lesion_in_lungs(p)[0], [[0.5, 0.0], [0.5, 0.0]])


def test_candidate_features_pool_the_scores() -> None:
    ev = CandidateEvidence(("m", "1"), np.array([0.2, 0.7, 0.5], np.float32), np.array([3, 4, 5]),
                           np.array([0.6, 0.8, 0.9], np.float32))
    np.testing.assert_allclose(ev.features(), [0.7, np.log1p(2)], rtol=1e-6)
    none = CandidateEvidence(("m", "1"), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    np.testing.assert_array_equal(none.features(), [0.0, 0.0])
    assert "3 lesion candidates, 2 scoring >= 0.5, best score 0.700" in ev.describe()


# -- a candidate model through the registry, the segmenter and a v3 fusion ----------------------------------------
SEG = "1.1.0"


def _weights(tmp_path, *, trained_over: str = SEG) -> tuple[object, dict]:
    """A weights folder: U-Net 1.1.0, candidate model 0.0.1 (untrained, fixed seed) over ``trained_over``, and
    classifier 9.3.0 = 2.0.0's weights + a v3 lesion fusion naming both."""
    import keras

    from training.common import write_model

    root = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "segmenter" / SEG, root / "segmenter" / SEG)
    seg_card = json.loads((root / "segmenter" / SEG / "model_card.json").read_text())
    keras.utils.set_random_seed(3)
    write_model(build_model(9), root / "candidates" / "0.0.1", {
        "name": "test-candidates", "version": "0.0.1", "kind": "candidates", "intended_use": "tests",
        "segmenter": {"name": seg_card["name"], "version": trained_over},
        "preprocessing": seg_card["preprocessing"], "training": {"data": []}})
    coefficients = dict.fromkeys((CLASSIFIER_TERM, *FEATURES_V3), 0.1) | {"max_candidate_score": 2.0}
    fusion = LesionFusion((seg_card["name"], SEG), coefficients, -1.0, "a test", ("test-candidates", "0.0.1"))
    folder = root / "classifier" / "9.3.0"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "classifier" / "2.0.0", folder)
    card = json.loads((folder / "model_card.json").read_text())
    card.update(version="9.3.0", threshold=0.5, lesion_fusion=fusion.to_card())
    (folder / "model_card.json").write_text(json.dumps(card))
    return root, card


@pytest.fixture(scope="module")
def series(small_phantom):
    """The paths of a pneumonia phantom (128 px, 20 slices), where U-Net 1.1.0 marks candidates."""
    from training.common import read_table, series_files

    return series_files(small_phantom, str(read_table(small_phantom).dicom_dir.iloc[0]))


def test_a_v3_fusion_runs_the_candidate_stage_on_both_paths(tmp_path, series) -> None:
    from models.streaming import SliceModels
    from node.pipelines import RegistryRunner
    from node.prefetch import StreamingRunner

    weights, _ = _weights(tmp_path)
    runner = RegistryRunner(classifier_version="9.3.0", weights_dir=weights, device="cpu")
    assert runner.candidates is not None and runner.candidates.version == "0.0.1"
    assert runner.algorithm.version == f"cls-9.3.0+seg-{SEG}+cand-0.0.1"
    volume = load_series(series)
    seg = runner.segment(volume)
    cand = seg.evidence.candidates
    assert cand is not None and cand.model == ("test-candidates", "0.0.1")
    # the scores are the model's own over the extracted candidates
    s = runner.segmenter
    x = window(volume_grid(volume, s.preprocess.grid), s.preprocess)
    found = extract(x, lesion_in_lungs(s.grid_probabilities(x)))
    assert len(found) == len(cand.scores) > 0
    direct = runner.candidates._m.model.predict({"patch": found.patches, "scalars": found.scalars}, verbose=0)[:, 0]
    np.testing.assert_allclose(cand.scores, direct, atol=1e-5)
    # the fusion takes them: a higher best score, a higher probability
    out = runner.classifier.predict(volume, lesion=seg.evidence)
    fusion = runner.classifier.fusion
    assert out.probability == pytest.approx(fusion.probability_of(out.classifier_probability,
                                                                     seg.evidence.features(FEATURES_V3)))
    higher = replace(seg.evidence, candidates=replace(cand, scores=np.minimum(cand.scores + 0.2, 1.0)))
    assert runner.classifier.predict(volume, lesion=higher).probability > out.probability
    assert "test-candidates 0.0.1" in runner.classify(volume, seg.evidence).notes.fused_evidence[1][1]
    with pytest.raises(InferenceError, match="none were given"):
        runner.classifier.predict(volume, lesion=replace(seg.evidence, candidates=None))
    other = replace(seg.evidence, candidates=replace(cand, model=("test-candidates", "0.0.2")))
    with pytest.raises(InferenceError, match="not of test-candidates 0.0.2"):
        runner.classifier.predict(volume, lesion=other)
    # streamed (per slice while the series arrives, candidates at completion): the same candidates and scores
    models = SliceModels(runner.classifier, runner.segmenter, runner.candidates)
    streamed = StreamingRunner(runner, models, models.read(series))
    s_cand = streamed.segment(load_series(series)).evidence.candidates
    assert s_cand is not None and len(s_cand.scores) == len(cand.scores)
    np.testing.assert_allclose(np.sort(s_cand.scores), np.sort(cand.scores), atol=2e-3)


def test_a_candidate_model_over_another_segmenter_is_refused(tmp_path, series) -> None:
    from node.pipelines import RegistryRunner

    weights, _ = _weights(tmp_path, trained_over="0.9.0")
    with pytest.raises(RegistryError, match="9.3.0: candidate model 0.0.1 was trained on the outputs of "
                                            "pacsnode-lung-lesion-unet 0.9.0"):
        RegistryRunner(classifier_version="9.3.0", weights_dir=weights, device="cpu")  # refused at start
    reg = Registry(weights)
    cand = reg.candidates("0.0.1")
    with pytest.raises(InferenceError, match="trained on the outputs of pacsnode-lung-lesion-unet 0.9.0"):
        reg.segmenter(SEG).predict(load_series(series), cand)
    with pytest.raises(RegistryError, match="no version '0.0.9'"):
        reg.candidates("0.0.9")


def test_a_v3_fusion_block_must_name_its_candidate_model() -> None:
    coefficients = dict.fromkeys((CLASSIFIER_TERM, *FEATURES_V3), 0.1)
    block = LesionFusion(("u", "1"), coefficients, 0.0, "t", ("c", "1")).to_card()
    assert LesionFusion.from_card({"lesion_fusion": block}).candidates == ("c", "1")
    with pytest.raises(LesionFusionError, match="names a candidate model if and only if"):
        LesionFusion.from_card({"lesion_fusion": {k: v for k, v in block.items() if k != "candidates"}})
