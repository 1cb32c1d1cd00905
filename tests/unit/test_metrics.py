"""Metrics: counters, histograms and scrape-time gauges render as Prometheus text; each Metrics has its own registry."""

from __future__ import annotations

import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

from node.metrics import Metrics, uid_label


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, frozenset(labels.items())))


def test_instances_and_bytes_by_class_syntax_and_source():
    m = Metrics()
    m.instance_received(CTImageStorage, ExplicitVRLittleEndian, 1000, "dimse")
    m.instance_received(CTImageStorage, ExplicitVRLittleEndian, 500, "dimse")
    m.instance_received(CTImageStorage, JPEG2000Lossless, 200, "stow")
    m.instance_received("1.2.826.0.1.3680043.99.1", ExplicitVRLittleEndian, 1, "stow")  # a private SOP class
    name = "pacsnode_instances_received_total"
    ct = {"sop_class": "CTImageStorage", "transfer_syntax": "ExplicitVRLittleEndian"}
    assert value(m, name, **ct, source="dimse") == 2
    assert value(m, name, sop_class="CTImageStorage", transfer_syntax="JPEG2000Lossless", source="stow") == 1
    assert value(m, name, sop_class="other", transfer_syntax="ExplicitVRLittleEndian", source="stow") == 1
    assert value(m, "pacsnode_received_bytes_total", source="dimse") == 1500
    assert value(m, "pacsnode_received_bytes_total", source="stow") == 201


def test_rejections_associations_and_stow_requests():
    m = Metrics()
    m.rejected("InvalidDatasetError", "dimse")
    m.rejected("InvalidDatasetError", "dimse")
    m.rejected("SpoolFullError", "stow")
    for event in ("accepted", "accepted", "released", "rejected", "aborted"):
        m.association(event)
    m.stow_request(200)
    m.stow_request(415)
    assert value(m, "pacsnode_rejections_total", reason="InvalidDatasetError", source="dimse") == 2
    assert value(m, "pacsnode_rejections_total", reason="SpoolFullError", source="stow") == 1
    assert value(m, "pacsnode_associations_total", event="accepted") == 2
    assert value(m, "pacsnode_associations_total", event="aborted") == 1
    assert value(m, "pacsnode_stow_requests_total", status="415") == 1


def test_histograms_bucket_observations():
    m = Metrics()
    for s in (0.3, 4.0, 4.5, 700.0):
        m.inference(s)
    m.end_to_end(42.0)
    m.observe_end_to_end(50.0)
    assert value(m, "pacsnode_inference_seconds_count") == 4
    assert value(m, "pacsnode_inference_seconds_sum") == pytest.approx(708.8)
    assert value(m, "pacsnode_inference_seconds_bucket", le="0.5") == 1
    assert value(m, "pacsnode_inference_seconds_bucket", le="5.0") == 3
    assert value(m, "pacsnode_inference_seconds_bucket", le="600.0") == 3
    assert value(m, "pacsnode_inference_seconds_bucket", le="+Inf") == 4
    assert value(m, "pacsnode_end_to_end_seconds_bucket", le="45.0") == 1
    assert value(m, "pacsnode_end_to_end_seconds_bucket", le="60.0") == 2


def test_gauges_are_read_at_scrape_time():
    m = Metrics()
    assert value(m, "pacsnode_queue_depth") is None  # nothing bound: no gauge rather than a false zero
    depth = [3]
    m.bind(
        queue_depth=lambda: depth[0],
        jobs=lambda: {"queued": 2, "running": 1},
        deliveries=lambda: {("pacs", "delivered"): 5, ("pacs", "pending"): 1, ("archive", "dead"): 2},
    )
    assert value(m, "pacsnode_queue_depth") == 3
    depth[0] = 7
    assert value(m, "pacsnode_queue_depth") == 7
    assert value(m, "pacsnode_jobs", state="running") == 1
    assert value(m, "pacsnode_deliveries", destination="pacs", state="delivered") == 5
    assert value(m, "pacsnode_deliveries", destination="archive", state="dead") == 2
    m.bind(series=lambda: {"receiving": 4})  # later bindings add, earlier ones stay
    assert value(m, "pacsnode_series", state="receiving") == 4
    assert value(m, "pacsnode_queue_depth") == 7
    m.bind(disk=lambda: {"/data/spool": (900, 1000), "/data": (10, 2000)})  # one per file system (node.disks)
    assert (value(m, "pacsnode_disk_used_bytes", path="/data/spool"),
            value(m, "pacsnode_disk_total_bytes", path="/data/spool")) == (900, 1000)
    assert value(m, "pacsnode_disk_used_bytes", path="/data") == 10
    up = {"pacs": True, "archive": False}
    m.bind(destination_up=lambda: up, uncommitted=lambda: {"pacs": 2})
    assert value(m, "pacsnode_destination_up", destination="pacs") == 1
    assert value(m, "pacsnode_destination_up", destination="archive") == 0
    assert value(m, "pacsnode_deliveries_uncommitted", destination="pacs") == 2
    up["pacs"] = False
    assert value(m, "pacsnode_destination_up", destination="pacs") == 0


def test_a_failing_gauge_source_leaves_the_rest_and_is_counted():
    m = Metrics()

    def database_down() -> dict[tuple[str, str], int]:
        raise RuntimeError("database is down")

    m.bind(queue_depth=lambda: 1, deliveries=database_down)
    m.instance_received(CTImageStorage, ExplicitVRLittleEndian, 10, "dimse")
    got = samples(m)
    assert got[("pacsnode_queue_depth", frozenset())] == 1
    assert not any(name == "pacsnode_deliveries" for name, _ in got)
    assert got[("pacsnode_metrics_source_errors_total", frozenset({("source", "deliveries")}))] == 1


def test_each_metrics_object_has_its_own_registry():
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.stow_request(200)
    assert value(a, "pacsnode_stow_requests_total", status="200") == 1
    assert value(b, "pacsnode_stow_requests_total", status="200") is None


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.instance_received(CTImageStorage, ExplicitVRLittleEndian, 1, "ftp"),
        lambda m: m.instance_received(CTImageStorage, ExplicitVRLittleEndian, -1, "dimse"),
        lambda m: m.rejected("", "dimse"),
        lambda m: m.association("opened"),
        lambda m: m.stow_request(42),
        lambda m: m.inference(-1.0),
        lambda m: m.end_to_end(float("nan")),
    ],
)
def test_bad_values_fail_fast(call):
    with pytest.raises(ValueError):
        call(Metrics())


def test_bind_refuses_non_callables():
    with pytest.raises(TypeError, match="queue_depth"):
        Metrics().bind(queue_depth=3)  # type: ignore[arg-type]


def test_uid_label_is_bounded():
    assert uid_label(CTImageStorage) == "CTImageStorage"
    assert uid_label("1.2.3.4.5") == "other"
    assert uid_label("") == "other"


_CHILD = """
import sys
from node.metrics import Metrics
m = Metrics()
for _ in range(int(sys.argv[1])):
    m.association("accepted")
m.inference_device("cpu", "auto", False, False)
if sys.argv[2] == "gpu":
    m.inference_device("gpu", "gpu", False, False)
m.bind(queue_depth=lambda: 7)
sys.stdout.write(m.render()[0].decode())
"""


def test_under_the_processes_model_each_process_renders_every_processes_counters(tmp_path):
    """PROMETHEUS_MULTIPROC_DIR (set by the supervisor before a child starts): a process's /metrics sums what
    every process counted, keeps the scrape-time gauges, and a device switched away from reads 0 - without a
    warning on stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def child(n: int, device: str) -> tuple[int, dict]:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(n), device], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        # every role logged prometheus_client's "Clearing labels has not been implemented in multi-process mode"
        # as a warning at start, though the device gauge was right: noise an administrator reads as a fault
        assert "Warning" not in err, err
        return proc.pid, {(s.name, tuple(sorted(s.labels.items()))): s.value
                          for f in text_string_to_metric_families(out) for s in f.samples}

    first, _ = child(3, "cpu")
    mark_process_dead(first, str(tmp_path))  # as the supervisor does when a child exits
    _, seen = child(4, "gpu")  # the second process renders the first one's counts too
    assert seen[("pacsnode_associations_total", (("event", "accepted"),))] == 7
    assert seen[("pacsnode_queue_depth", ())] == 7
    device = {dict(k[1])["device"]: v for k, v in seen.items() if k[0] == "pacsnode_inference_device"}
    assert device == {"gpu": 1, "cpu": 0}  # the live process's device; the old label zeroed, the dead one's gone
