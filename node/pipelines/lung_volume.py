"""The lung-volume pipeline: U-Net only → chest-scope check; an SR measuring lung and lesion volume, and a SEG.

No classifier runs and the SR carries no pneumonia verdict: a route can send series here (e.g. follow-up CTs) to
measure without diagnosing.
"""

from __future__ import annotations

from models.preprocess import Volume
from node.config import GateSection, PipelineName
from node.gate import GateRefusal
from node.pipelines.base import Pipeline, chest_scope_refusal
from node.pipelines.runner import ModelRunner
from node.results import AlgorithmIdentity, Findings


class LungVolumePipeline(Pipeline):
    name = PipelineName.LUNG_VOLUME

    def algorithm(self, runner: ModelRunner) -> AlgorithmIdentity:
        return AlgorithmIdentity(name="pacs-ai-node lung volume CT", version=f"seg-{runner.segmenter_version}",
                                 uid_root=runner.algorithm.uid_root)

    def analyse(self, volume: Volume, runner: ModelRunner, settings: GateSection) -> Findings | GateRefusal:
        seg = runner.segment(volume)
        refusal = chest_scope_refusal(volume, seg.lungs, settings)
        if refusal is not None:
            return refusal
        return Findings(probability=None, threshold=None, attention=None, lungs=seg.lungs, lesion=seg.lesion)
