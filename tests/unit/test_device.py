"""node.device and `[worker] device`: the keys validate; a worker whose config asks for a GPU loads the real
models, and without a usable GPU (this project's machines) it runs them on the CPU and says so — the
``gpu_unavailable_falling_back`` warning, the ``pacsnode_inference_gpu_fallback`` metric and the ``device`` entry
of ``/readyz`` — and still processes a series. On a machine with a GPU the same test checks that the GPU is used
and nothing warns."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from node.config import DEFAULT_CONFIG_PATH, NodeConfig, Priority, load_config
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.errors import ConfigError
from node.http import HealthProbe
from node.index import Index
from node.ingest import Ingestor, Origin
from node.metrics import Metrics
from node.pipelines import RegistryRunner
from node.queue import JobQueue
from node.spool import Spool
from node.states import InferenceDevice, JobState
from node.worker import Worker
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes


def test_worker_device_keys_default_validate_and_override(tmp_path):
    config = load_config(DEFAULT_CONFIG_PATH, environ={})
    assert (config.worker.device, config.worker.gpu_index, config.worker.mixed_precision) == (
        InferenceDevice.AUTO, None, False)
    config = load_config(DEFAULT_CONFIG_PATH, environ={"PACSNODE_WORKER__DEVICE": "gpu",
                                                       "PACSNODE_WORKER__GPU_INDEX": "1",
                                                       "PACSNODE_WORKER__MIXED_PRECISION": "true"})
    assert (config.worker.device, config.worker.gpu_index, config.worker.mixed_precision) == (
        InferenceDevice.GPU, 1, True)
    with pytest.raises(ConfigError, match="worker.device"):
        load_config(DEFAULT_CONFIG_PATH, environ={"PACSNODE_WORKER__DEVICE": "tpu"})
    with pytest.raises(ConfigError, match="worker.gpu_index"):
        load_config(DEFAULT_CONFIG_PATH, environ={"PACSNODE_WORKER__GPU_INDEX": "-1"})


def _gpu_usable() -> bool:
    import tensorflow as tf

    return bool(tf.test.is_built_with_cuda() and tf.config.list_physical_devices("GPU"))


@pytest.fixture
def stack(tmp_path):
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "worker": {"device": "gpu", "mixed_precision": True},
        "gate": {"min_slices": 8, "scope_check": False},  # the ctgen disc phantom is no chest
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    yield config, engine
    engine.dispose()


def test_gpu_requested_without_one_runs_on_the_cpu_and_says_so(stack, tmp_path):
    config, engine = stack
    queue = JobQueue(engine, config.queue)
    dispatcher = Dispatcher(config, engine, {})  # no destinations: the results stay in the node
    metrics = Metrics()
    w = config.worker
    worker = Worker(config, engine, queue, dispatcher, metrics=metrics, runner_factory=lambda: RegistryRunner(
        w.classifier_version, w.segmenter_version, w.weights_dir, device=w.device.value, gpu_index=w.gpu_index,
        mixed_precision=w.mixed_precision))
    probe = HealthProbe(engine, config.node.spool_dir, worker.ready.is_set, device=worker.device_report)
    assert worker.device_report() == {"requested": "gpu", "kind": None, "state": "models not loaded"}

    with capture_logs() as logs:
        worker.warm_up()
    events = {e["event"]: e for e in logs}
    report = probe.report()["device"]
    exposition = metrics.render()[0].decode()
    if _gpu_usable():
        assert "gpu_unavailable_falling_back" not in events
        assert report["kind"] == "gpu" and report["mixed_precision"] is True and not report["fell_back"]
        assert "pacsnode_inference_gpu_fallback 0.0" in exposition
    else:
        warning = events["gpu_unavailable_falling_back"]
        assert warning["log_level"] == "warning" and warning["device"] == "cpu" and warning["reason"]
        assert report["kind"] == "cpu" and report["fell_back"] is True and report["fallback_reason"] == warning["reason"]
        assert report["mixed_precision"] is False  # float16 is for GPUs; the CPU runs float32
        assert "pacsnode_inference_gpu_fallback 1.0" in exposition
        assert 'pacsnode_inference_device{device="cpu",mixed_precision="false",requested="gpu"} 1.0' in exposition
    assert events["inference_device_selected"]["device"] == report["kind"]

    # And the node still makes results: one series through the real models on the chosen device.
    index = Index(engine)
    ingestor = Ingestor(Spool(config.node.spool_dir), index)
    series = write_ct_series(tmp_path / "s", size=64, slices=10, seed=3)
    for path in series.paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    with queue.engine.begin() as conn:
        job_id = queue.enqueue(conn, series.series_uid, 1, Priority.ROUTINE)
    assert worker.run_pending() == 1
    assert queue.get(job_id).state == JobState.DONE
