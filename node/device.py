"""The inference device as the node reports it: the worker's events when its models load, the metrics, and the
``device`` entry of ``/readyz``.

The device is chosen by `models.device.select_device` from ``[worker] device`` when the worker loads its models
(`node.pipelines.RegistryRunner`). `announce` logs ``inference_device_selected`` and, when ``device = "gpu"`` was
asked for but no GPU can be used, the warning ``gpu_unavailable_falling_back`` with the reason, and sets
``pacsnode_inference_gpu_fallback`` to 1. The node does not refuse to start then: it keeps producing results on the
CPU (slower), because a node that stops when a GPU driver breaks leaves every scanner's series without a result;
the warning, the metric (with its alert rule) and ``/readyz`` make the fallback impossible to miss.
"""

from __future__ import annotations

from typing import Any

from models.device import DeviceChoice
from node.metrics import Metrics


def announce(choice: DeviceChoice | None, log: Any, metrics: Metrics) -> None:
    """Log and export the device the models run on (nothing for a runner that does not say, e.g. a fake)."""
    if choice is None:
        return
    metrics.inference_device(choice.kind, choice.requested, choice.mixed_precision, choice.fell_back)
    if choice.fell_back:
        log.warning("gpu_unavailable_falling_back", requested=choice.requested, device=choice.kind,
                    reason=choice.fallback_reason, cuda_build=choice.cuda_build, gpus_visible=choice.gpus_visible)
    log.info("inference_device_selected", requested=choice.requested, device=choice.kind, name=choice.name,
             mixed_precision=choice.mixed_precision, gpus_visible=choice.gpus_visible, note=choice.note)


def report(choice: DeviceChoice | None, requested: str) -> dict[str, Any]:
    """The ``device`` entry of ``/readyz``: the choice, or only what was asked for while the models load."""
    if choice is None:
        return {"requested": requested, "kind": None, "state": "models not loaded"}
    return {**choice.as_dict(), "fell_back": choice.fell_back}
