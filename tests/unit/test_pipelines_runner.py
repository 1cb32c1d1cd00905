"""node.pipelines.runner.model_notes: what the SR says about the fusion inputs, calibration and operating point."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.clinical import ClinicalInputs
from models.errors import ModelError
from models.registry import ClassifierOutput
from node.pipelines.runner import model_notes

CARD = {"name": "pacsnode-pneumonia-classifier", "version": "2.0.0",
        "threshold_rule": "Youden J on the validation set, mapped to the calibrated scale",
        "metrics": {"validation": {"sensitivity": 0.95, "specificity": 0.975}}}


def _out(clinical: ClinicalInputs | None, used: tuple[str, ...], calibration: dict | None) -> ClassifierOutput:
    return ClassifierOutput(probability=0.71, attention=np.ones(3) / 3, threshold=0.42, raw_probability=0.8,
                            clinical=clinical, clinical_used=used, calibration=calibration)


def test_fused_and_missing_inputs_calibration_and_operating_point() -> None:
    used = ("age", "sex", "fever", "cough", "dyspnoea")
    notes = model_notes(_out(ClinicalInputs(age=63.0, sex="M", cough=1.0), used,
                             {"method": "temperature", "temperature": 1.5, "fitted_on": "the validation split"}), CARD)
    assert notes.fusion_inputs == (("age", "63 years (from DICOM header)"), ("sex", "M (from DICOM header)"),
                                   ("cough", "present (from request text in the DICOM header)"))
    assert notes.missing_inputs == ("fever", "dyspnoea")
    assert notes.calibration is not None and "T = 1.500" in notes.calibration and "0.800" in notes.calibration
    assert notes.operating_point is not None and "0.420" in notes.operating_point
    assert "sensitivity 95 %" in notes.operating_point and "calibrated scale" in notes.operating_point


def test_an_uncalibrated_age_sex_version_says_so() -> None:
    notes = model_notes(_out(ClinicalInputs(sex="F"), ("age", "sex"), None), {**CARD, "version": "1.0.0"})
    assert notes.fusion_inputs == (("sex", "F (from DICOM header)"),) and notes.missing_inputs == ("age",)
    assert notes.calibration is not None and "uncalibrated" in notes.calibration and "1.0.0" in notes.calibration


def test_image_only_version_names_no_inputs() -> None:
    notes = model_notes(_out(ClinicalInputs(age=50.0), (), None), CARD)
    assert notes.fusion_inputs == () and notes.missing_inputs == ()


def test_the_configured_classifier_version_is_loaded() -> None:
    """`worker.classifier_version` reaches the registry: each version loads on request beside the default."""
    from tests.conftest import require_weights

    require_weights()
    from models.registry import Registry
    from node.pipelines.runner import RegistryRunner

    old = RegistryRunner(classifier_version="1.0.0")
    assert old.classifier.version == "1.0.0" and old.algorithm.version.startswith("cls-1.0.0+")
    assert RegistryRunner(classifier_version="2.0.0").classifier.version == "2.0.0"
    assert RegistryRunner().classifier.version == Registry().default_version("classifier")
    # the candidate 2.2.0 + U-Net 1.1.0 load together; 2.2.0 beside the U-Net its fusion was not fitted with does not
    pair = RegistryRunner(classifier_version="2.2.0", segmenter_version="1.1.0")
    assert (pair.classifier.version, pair.segmenter.version) == ("2.2.0", "1.1.0")
    # the former default 2.1.0 asked for alone runs beside the U-Net its fusion was fitted with, not the default
    old_default = RegistryRunner(classifier_version="2.1.0")
    assert old_default.segmenter.version == "1.0.0" != Registry().default_version("segmenter")
    assert old_default.algorithm.version == "cls-2.1.0+seg-1.0.0"
    with pytest.raises(ModelError, match="from pacsnode-lung-lesion-unet 1.1.0, not from pacsnode-lung-lesion-unet 1.0.0"):
        RegistryRunner(classifier_version="2.2.0", segmenter_version="1.0.0")


def test_the_pipeline_sr_names_what_the_header_offered(tmp_path) -> None:
    """Shipped classifier 2.0.0 on a phantom whose header asks "fever and cough": the SR names age, sex, fever and
    cough as fused, dyspnoea as missing, and states the calibration and the operating point."""
    import datetime as dt

    import pydicom

    from models.preprocess import load_series
    from node.config import GateSection
    from node.pipelines.pneumonia import PneumoniaPipeline
    from node.pipelines.runner import RegistryRunner
    from tests.conftest import require_weights
    from tests.unit.results_support import named
    from training.phantom import generate_dataset

    require_weights()
    generate_dataset(tmp_path, cases=1, seed=31, prevalence=1.0, size=64, slices=20)
    files = sorted((tmp_path / "CASE0001" / "dicom").glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ReasonForStudy = "Fever and cough for 3 days"
        ds.save_as(f)
    vol = load_series(files)
    runner, pipeline = RegistryRunner(classifier_version="2.0.0"), PneumoniaPipeline()
    findings = pipeline.analyse(vol, runner, GateSection(scope_check=False))
    objects = dict(pipeline.build(vol.datasets, findings, runner.algorithm, series_version=1, superseded=(),
                                  fallback_datetime=dt.datetime(2026, 1, 1)))
    sr = objects["sr"]
    fused = [str(i.TextValue) for i in named(sr, "AI-FUSION-IN", "99PACSAI")]
    assert [t.split(":")[0] for t in fused] == ["age", "sex", "fever", "cough"]
    assert "fever: present (from request text in the DICOM header)" in fused
    assert [str(i.TextValue) for i in named(sr, "AI-FUSION-MISS", "99PACSAI")] == ["dyspnoea"]
    (cal,) = named(sr, "AI-CALIBRATION", "99PACSAI")
    (op,) = named(sr, "AI-OPERATING-PT", "99PACSAI")
    assert "temperature scaling" in str(cal.TextValue) and f"{runner.classifier.threshold:.3f}" in str(op.TextValue)


def test_the_sr_says_how_a_thin_series_evidence_was_pooled() -> None:
    from models.lesion_evidence import (
        CLASSIFIER_TERM,
        FEATURES_V2,
        LesionEvidence,
        LesionFusion,
        map_evidence,
    )

    seg = ("pacsnode-lung-lesion-unet", "1.1.0")
    fusion = LesionFusion(seg, {CLASSIFIER_TERM: 1.0, **dict.fromkeys(FEATURES_V2, 0.1)}, 0.0, "a test",
                          pool_spacing_mm=5.0)

    def evidence_text(spacing: float, pool: LesionFusion) -> str:
        ev = LesionEvidence(map_evidence(np.zeros((40, 8, 8), np.float32)), seg, 8, slice_spacing_mm=spacing)
        out = ClassifierOutput(probability=0.2, attention=np.ones(40) / 40, threshold=0.5, classifier_probability=0.1,
                               lesion=ev, fusion=pool)
        return dict(model_notes(out, CARD).fused_evidence)["segmenter lesion evidence"]

    assert evidence_text(1.25, fusion).endswith("fused as the mean of 4 interleaved series of one slice in 4 (5.0 mm "
                                                "apart, the spacing the fusion was fitted at)")
    assert "interleaved" not in evidence_text(5.0, fusion)  # pooled as it is
    assert "interleaved" not in evidence_text(1.25, replace(fusion, pool_spacing_mm=None))  # a version fitted unpooled
