"""Model pipelines: each is a named unit — its gate, its models, its result builder — that a route can name.

`PIPELINES[name]` gives the `Pipeline` for a `node.config.PipelineName`. The worker runs the common gate
(`node.gate`), loads the volume, then calls `Pipeline.analyse` (models + the pipeline's own scope check; it may
refuse with a `GateRefusal`) and `Pipeline.build` (the result objects). Adding a pipeline = a module here, a
`PipelineName` member, and an entry in `PIPELINES`.
"""

from node.config import PipelineName
from node.pipelines.base import Pipeline
from node.pipelines.lung_volume import LungVolumePipeline
from node.pipelines.pneumonia import PneumoniaPipeline
from node.pipelines.runner import Classification, ModelRunner, RegistryRunner, Segmentation

PIPELINES: dict[PipelineName, Pipeline] = {
    PipelineName.PNEUMONIA: PneumoniaPipeline(),
    PipelineName.LUNG_VOLUME: LungVolumePipeline(),
}

__all__ = [
    "PIPELINES",
    "Classification",
    "LungVolumePipeline",
    "ModelRunner",
    "Pipeline",
    "PneumoniaPipeline",
    "RegistryRunner",
    "Segmentation",
]
