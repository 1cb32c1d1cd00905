"""Streaming inference (node.prefetch + models.streaming): per-slice work while a series arrives gives the same
results as the plain path, and partial work for series that will not be processed is thrown away.

Real shipped models on CPU, a real index and queue, the real results builder; only the PACS sender is replaced by
one that records the files it was given. Phantoms are small (16 × 128²)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from models.preprocess import load_series
from node.config import DestinationKind, NodeConfig, Priority
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.index import Index
from node.ingest import Ingestor, Origin
from node.prefetch import PrefetchCache, Prefetcher, StreamingRunner
from node.queue import JobQueue
from node.schema import instances, series
from node.spool import Spool
from node.states import SeriesState
from node.supervise import Heartbeats
from node.worker import Worker
from peers import wait_until
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.unit.test_worker import RecordingSender

SLICES, SIZE = 16, 128


@pytest.fixture(scope="module")
def runner():
    from node.pipelines import RegistryRunner

    return RegistryRunner(device="cpu")


def _node(tmp_path, *, prefetch: bool, routes=None, max_mb: int = 1024):
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "gate": {"min_slices": 8, "scope_check": False},  # ctgen phantoms are no real chests
        "worker": {"prefetch": prefetch, "prefetch_poll_seconds": 0.05, "prefetch_max_mb": max_mb},
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        **({"routes": routes} if routes is not None else {}),
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    sender = RecordingSender()
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: sender})
    ingestor = Ingestor(Spool(config.node.spool_dir), Index(engine))
    return config, engine, ingestor, JobQueue(engine, config.queue), dispatcher, sender


def _receive(ingestor, tmp_path, paths):
    for path in paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))


def _numbers(ds) -> list[float]:
    """Every numeric measurement value in an SR content tree."""
    out: list[float] = []
    for item in getattr(ds, "ContentSequence", []):
        for mv in getattr(item, "MeasuredValueSequence", []):
            out.append(float(mv.NumericValue))
        out.extend(_numbers(item))
    return out


def _run(tmp_path, runner, paths, uid, *, prefetch: bool, before_completion=None):
    config, engine, ingestor, queue, dispatcher, sender = _node(tmp_path, prefetch=prefetch)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner, heartbeats=Heartbeats())
    worker.warm_up()  # the prefetcher starts with the models
    try:
        _receive(ingestor, tmp_path, paths[: SLICES // 2])
        if prefetch:  # half the series has arrived: its slices are worked on before the rest comes
            wait_until(lambda: len(worker.prefetch.cache.known(uid)) == SLICES // 2, 60, "the first half prefetched")
        _receive(ingestor, tmp_path, paths[SLICES // 2 :])
        if before_completion is not None:
            before_completion(worker, engine)
        with engine.begin() as conn:
            conn.execute(sa.update(series).values(state=SeriesState.COMPLETE.value))
            queue.enqueue(conn, uid, 1, Priority.ROUTINE)
        assert worker.run_pending() == 1
    finally:
        worker.stop(30)
    assert dispatcher.run_once() == 1
    (files,) = sender.sent
    sr, seg = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    engine.dispose()
    return _numbers(sr), seg.pixel_array, worker


def _prefetched(tmp_path, runner, s):
    """A node with a prefetcher (the shipped models) that has received series ``s`` and worked on it until idle
    (the loop's body, in this thread); returns the node's parts and the prefetcher."""
    from models.streaming import SliceModels

    node = _node(tmp_path, prefetch=True)
    config, engine, ingestor = node[:3]
    prefetcher = Prefetcher(config, engine, Heartbeats())
    prefetcher.models = SliceModels(runner.classifier, runner.segmenter)
    _receive(ingestor, tmp_path, s.paths)
    while prefetcher.turn():
        pass
    return (*node, prefetcher)


def test_prefetched_series_gives_the_same_sr_and_seg_as_the_plain_path(tmp_path, runner):
    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=7)
    seen: dict[str, int] = {}

    def all_prefetched(worker, engine):
        wait_until(lambda: len(worker.prefetch.cache.known(s.series_uid)) == SLICES, 60, "every slice prefetched")
        seen["cached"] = len(worker.prefetch.cache.known(s.series_uid))

    plain, plain_seg, _ = _run(tmp_path / "off", runner, s.paths, s.series_uid, prefetch=False)
    streamed, streamed_seg, worker = _run(tmp_path / "on", runner, s.paths, s.series_uid, prefetch=True,
                                          before_completion=all_prefetched)
    assert seen["cached"] == SLICES
    assert worker.prefetch.cache.series() == []  # the job took its series' work
    # same layers and weights; other batch shapes round differently: within a few float32 ulps (module docstring)
    assert plain and streamed == pytest.approx(plain, rel=1e-6, abs=1e-6)
    assert streamed_seg.shape == plain_seg.shape and np.array_equal(streamed_seg, plain_seg)


def test_a_changed_resend_is_computed_again_and_matches_a_fresh_load(tmp_path, runner):
    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=8)
    config, engine, ingestor, queue, _, _, prefetcher = _prefetched(tmp_path, runner, s)
    assert len(prefetcher.cache.known(s.series_uid)) == SLICES
    # one instance re-sent with other pixels: the index holds its new sha256, the cache the old one
    ds = pydicom.dcmread(s.paths[3])
    ds.PixelData = (ds.pixel_array[::-1].copy()).tobytes()
    ds.save_as(s.paths[3])
    _receive(ingestor, tmp_path, [s.paths[3]])
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(instances).where(instances.c.series_uid == s.series_uid)))
    assert prefetcher.turn() is True  # recomputed while the series still arrives
    volume, streaming = prefetcher.load(s.series_uid, rows, runner)
    plain = load_series([r.path for r in rows])
    assert np.array_equal(volume.hu, plain.hu)
    # the same lesion evidence to both (the default classifier fuses it; tests/unit/test_lesion_fusion.py compares the
    # evidence of the two paths): the classifier head must agree within float32 rounding
    evidence = runner.segment(plain).evidence
    assert streaming.classify(volume, evidence).probability == pytest.approx(
        runner.classify(plain, evidence).probability, abs=1e-6)
    engine.dispose()


def test_partial_work_of_a_series_that_will_not_be_processed_is_thrown_away(tmp_path, runner):
    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=9)
    config, engine, ingestor, _, _, _ = _node(tmp_path, prefetch=True)
    prefetcher = Prefetcher(config, engine, Heartbeats())
    from models.streaming import SliceModels

    prefetcher.models = SliceModels(runner.classifier, runner.segmenter)
    _receive(ingestor, tmp_path, s.paths[:5])
    assert prefetcher.turn() and prefetcher.cache.known(s.series_uid)
    # completion decides the series is incomplete / ignored (no job): its partial work goes
    with engine.begin() as conn:
        conn.execute(sa.update(series).values(state=SeriesState.IGNORED.value))
    assert prefetcher.turn() is False
    assert prefetcher.cache.series() == []
    engine.dispose()


def test_prefetching_stops_at_the_memory_cap_and_the_job_computes_the_rest(tmp_path, runner):
    n = SLICES + 8  # more than one turn takes (node.prefetch._BATCH)
    s = write_ct_series(tmp_path / "src", slices=n, size=SIZE, seed=11)
    config, engine, ingestor, _, _, _ = _node(tmp_path, prefetch=True, max_mb=1)  # one batch of 128² slices > 1 MB
    prefetcher = Prefetcher(config, engine, Heartbeats())
    from models.streaming import SliceModels

    prefetcher.models = SliceModels(runner.classifier, runner.segmenter)
    _receive(ingestor, tmp_path, s.paths)
    assert prefetcher.turn() is True and prefetcher.cache.nbytes() > 1_000_000
    assert prefetcher.turn() is False and 0 < len(prefetcher.cache.known(s.series_uid)) < n
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(instances).where(instances.c.series_uid == s.series_uid)))
    volume, _ = prefetcher.load(s.series_uid, rows, runner)
    assert volume.shape == (n, SIZE, SIZE)
    engine.dispose()


def test_a_series_no_route_sends_to_a_model_is_not_prefetched(tmp_path, runner):
    s = write_ct_series(tmp_path / "src", slices=4, size=32, seed=10)
    config, engine, ingestor, _, _, _ = _node(
        tmp_path, prefetch=True, routes=[{"name": "nothing", "pipeline": "ignore"}])
    prefetcher = Prefetcher(config, engine, Heartbeats())
    from models.streaming import SliceModels

    prefetcher.models = SliceModels(runner.classifier, runner.segmenter)
    _receive(ingestor, tmp_path, s.paths)
    assert prefetcher.turn() is False and prefetcher.cache.series() == []
    engine.dispose()


def test_prefetch_defaults_to_on_only_where_the_worker_has_its_own_process():
    from node.prefetch import prefetch_enabled

    def config(**node):
        return NodeConfig.model_validate({"node": node})

    assert prefetch_enabled(config(process_model="processes"))
    assert not prefetch_enabled(config(process_model="threads"))
    assert prefetch_enabled(NodeConfig.model_validate({"worker": {"prefetch": True}}))


def test_the_cache_keeps_the_most_recently_used_series():
    cache = PrefetchCache(max_series=2)
    cache.put("a", "1", "x", None)
    cache.put("b", "1", "x", None)
    cache.put("a", "2", "x", None)  # a is used again
    cache.put("c", "1", "x", None)  # b goes
    assert cache.series() == ["a", "c"] and cache.known("a") == {"1": "x", "2": "x"}


def test_streaming_fuses_the_same_clinical_inputs_and_calibration_as_the_one_call_path(tmp_path):
    """Classifier 2.0.0 reads symptoms from the request text and is temperature-calibrated: the streamed head must
    give the same calibrated probability and the same SR notes (inputs fused, calibration) as `Classifier.predict`."""
    from models.streaming import SliceModels
    from node.pipelines import RegistryRunner

    runner = RegistryRunner(classifier_version="2.0.0", device="cpu")
    assert runner.classifier.temperature != 1.0 and "fever" in runner.classifier.clinical_used
    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=12)
    for p in s.paths:
        ds = pydicom.dcmread(p)
        ds.ReasonForTheRequestedProcedure = "fever and productive cough, no dyspnoea"
        ds.save_as(p)
    models = SliceModels(runner.classifier, runner.segmenter)
    volume = load_series(s.paths)
    streamed = StreamingRunner(runner, models, models.read(s.paths)).classify(volume)
    plain = runner.classify(load_series(s.paths))
    assert streamed.probability == pytest.approx(plain.probability, abs=1e-6)
    assert streamed.notes == plain.notes
    assert dict(plain.notes.fusion_inputs).keys() >= {"fever", "cough", "dyspnoea"}
    assert "temperature scaling" in plain.notes.calibration


def test_a_series_with_one_slice_of_another_size_is_refused_with_its_code_not_failed(tmp_path, runner):
    """Per-slice work stacks a batch's slices; one slice of another matrix size in a batch made that a ValueError
    every prefetch turn, and at job time a processing failure (three tries, then a failure SR). Now the prefetch
    works each size apart, and the job is refused with the mixed-geometry code like any geometry the volume
    cannot be built from."""
    from node.results import SkipReason
    from node.states import JobState

    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=9)
    ds = pydicom.dcmread(s.paths[10])
    small = ds.pixel_array[::2, ::2].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
    ds.PixelData = small.tobytes()
    ds.save_as(s.paths[10])
    config, engine, ingestor, queue, dispatcher, sender, prefetcher = _prefetched(tmp_path, runner, s)
    assert len(prefetcher.cache.known(s.series_uid)) == SLICES
    worker = Worker(config, engine, queue, dispatcher, lambda: runner, heartbeats=Heartbeats())
    worker.warm_up()
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(series).values(state=SeriesState.COMPLETE.value))
            job_id = queue.enqueue(conn, s.series_uid, 1, Priority.ROUTINE)
        assert worker.run_pending() == 1
    finally:
        worker.stop(30)
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.MIXED_GEOMETRY.value
    assert dispatcher.run_once() == 1
    ((sr_path,),) = sender.sent
    assert "SKIP-MIXED-GEOM" in str(pydicom.dcmread(sr_path))
    engine.dispose()


def test_a_resend_caught_between_its_commit_and_its_rename_is_not_cached_with_the_old_pixels(tmp_path, runner,
                                                                                            monkeypatch):
    """A re-send's index row (its new sha256) commits before its file is moved over the old one (node.ingest). A
    prefetch turn in between read the old file and cached its pixels under the new hash, and the job then built
    its volume, SR and SEG from the old pixels. Now the file's own digest must match the row's."""

    s = write_ct_series(tmp_path / "src", slices=SLICES, size=SIZE, seed=10)
    config, engine, ingestor, _, _, _, prefetcher = _prefetched(tmp_path, runner, s)
    ds = pydicom.dcmread(s.paths[3])
    ds.PixelData = ds.pixel_array[::-1].copy().tobytes()
    ds.save_as(s.paths[3])
    held = []
    place = Spool.place
    monkeypatch.setattr(Spool, "place", staticmethod(lambda spooled: held.append(spooled)))  # not yet renamed
    _receive(ingestor, tmp_path, [s.paths[3]])
    assert len(held) == 1
    while prefetcher.turn():  # the row is new, the file still the old one
        pass
    place(held[0])  # the rename lands
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(instances).where(instances.c.series_uid == s.series_uid)))
    volume, _ = prefetcher.load(s.series_uid, rows, runner)
    assert np.array_equal(volume.hu, load_series([r.path for r in rows]).hu)
    engine.dispose()
