"""The pneumonia pipeline: validated-matrix check → U-Net → chest-scope check → classifier; a TID 1500 SR with the
verdict (and its scope: what was checked on the series, what not) and a SEG."""

from __future__ import annotations

from dataclasses import replace

from models.preprocess import Volume
from node.config import GateSection, PipelineName
from node.gate import GateRefusal
from node.pipelines.base import Pipeline, chest_scope_refusal, matrix_refusal, scope_notes
from node.pipelines.runner import ModelRunner
from node.results import AlgorithmIdentity, Findings, ModelNotes


class PneumoniaPipeline(Pipeline):
    name = PipelineName.PNEUMONIA

    def algorithm(self, runner: ModelRunner) -> AlgorithmIdentity:
        return runner.algorithm

    def analyse(self, volume: Volume, runner: ModelRunner, settings: GateSection) -> Findings | GateRefusal:
        small = matrix_refusal(volume, runner.min_matrix, settings)
        if small is not None:
            return small  # below the validated matrix: no model runs
        seg = runner.segment(volume)
        refusal = chest_scope_refusal(volume, seg.lungs, settings)
        if refusal is not None:
            return refusal  # no classifier call: a volume outside the scope never gets a probability
        cls = runner.classify(volume, lesion=seg.evidence)
        notes = replace(cls.notes or ModelNotes(), scope=scope_notes(volume, runner.min_matrix, settings))
        return Findings(probability=cls.probability, threshold=cls.threshold, attention=cls.attention,
                        lungs=seg.lungs, lesion=seg.lesion, notes=notes)
