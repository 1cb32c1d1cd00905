"""Worker: one job end to end on a real index, queue, results builder and dispatcher, with the model runner and the
PACS sender replaced at their seams (a fixed-output runner; a sender that records what it was given)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from structlog.testing import capture_logs

from models.errors import ModelError
from node.config import DestinationKind, NodeConfig, PipelineName, Priority
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.gate import check_header
from node.index import Index
from node.ingest import Ingestor, Origin
from node.metrics import Metrics
from node.pipelines import Classification, ModelRunner, Segmentation
from node.queue import JobQueue, jobs
from node.results import AlgorithmIdentity, SkipReason
from node.senders import Sender
from node.spool import Spool
from node.states import JobState
from node.worker import Worker, results
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes


class FixedRunner(ModelRunner):
    """Returns a fixed probability and a lesion blob on the middle slices; can be told to fail."""

    algorithm = AlgorithmIdentity(name="test-model", version="0.0.1")

    def __init__(self, probability: float = 0.9, fail: bool = False) -> None:
        self.probability = probability
        self.fail = fail
        self.calls = 0

    def segment(self, volume):
        self.calls += 1
        if self.fail:
            raise ModelError("model exploded")
        n, rows, cols = volume.shape
        lungs = np.zeros(volume.shape, bool)
        lungs[:, rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4] = True
        lesion = np.zeros(volume.shape, bool)
        lesion[n // 2 - 1 : n // 2 + 2, rows // 3 : rows // 2, cols // 3 : cols // 2] = True
        return Segmentation(lungs=lungs, lesion=lesion)

    def classify(self, volume, lesion=None):
        n = volume.shape[0]
        attention = np.linspace(0, 1, n)
        return Classification(probability=self.probability, threshold=0.5, attention=attention / attention.sum())


class RecordingSender(Sender):
    def __init__(self) -> None:
        self.sent: list[list[Path]] = []

    def send(self, destination, files):
        self.sent.append([Path(f) for f in files])


@pytest.fixture
def node(tmp_path):
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "queue": {"max_attempts": 2, "retry_delay_seconds": 0},
        "gate": {"min_slices": 8, "scope_check": False},  # the fixed runner's masks are no real lungs
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    index = Index(engine)
    ingestor = Ingestor(Spool(config.node.spool_dir), index)
    queue = JobQueue(engine, config.queue)
    sender = RecordingSender()
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: sender})
    yield config, engine, ingestor, queue, dispatcher, sender
    engine.dispose()


def receive(ingestor, tmp_path, name, **kw):
    series = write_ct_series(tmp_path / name, size=32, **kw)
    for path in series.paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    return series


def queue_job(queue, series_uid, version=1):
    with queue.engine.begin() as conn:
        return queue.enqueue(conn, series_uid, version, Priority.ROUTINE)


def test_series_becomes_sr_and_seg_delivered(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s1", slices=12, seed=1)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner(0.9)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    assert worker.run_pending() == 1
    job = queue.get(job_id)
    assert job.state == JobState.DONE and job.inference_seconds is not None and job.queue_seconds is not None
    assert dispatcher.run_once() == 1
    (files,) = sender.sent
    sr, seg, key = (pydicom.dcmread(f) for f in files)
    assert (sr.Modality, seg.Modality, key.Modality) == ("SR", "SEG", "KO")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == key.StudyInstanceUID == series.study_uid
    # the key-images note names three source slices and the SR; the SR names the note back
    assert key.ConceptNameCodeSequence[0].CodeValue == "113002"
    named = {sop.ReferencedSOPInstanceUID for study in key.CurrentRequestedProcedureEvidenceSequence
             for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    assert sr.SOPInstanceUID in named and len(named - {sr.SOPInstanceUID}) == 3
    assert named - {sr.SOPInstanceUID} <= set(series.sop_uids)
    assert any(key.SOPInstanceUID in text for text in _texts(sr))

    report = hd.sr.srread(files[0])
    assert "233604007" in str(report.ContentSequence)  # pneumonia, coded
    seg_read = hd.seg.segread(files[1])
    assert seg_read.number_of_segments == 2
    assert {ref.SeriesInstanceUID for ref in seg.ReferencedSeriesSequence} == {series.series_uid}


def _texts(ds):
    """Every TEXT value in an SR content tree."""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            yield str(item.TextValue)
        yield from _texts(item)


def test_refused_series_gets_a_coded_not_processed_sr(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "gap", slices=12, seed=2, skip=(5,))
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner()
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    worker.run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.UNEVEN_SPACING.value
    assert runner.calls == 0
    dispatcher.run_once()
    (files,) = sender.sent
    (sr_path,) = files
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR" and "SKIP-SPACING" in str(sr.ContentSequence)


def test_failing_model_retries_then_dead_letters_and_reports(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s3", slices=10, seed=3)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner(fail=True)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    worker.run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.DEAD and "model exploded" in job.last_error and job.attempts == 2
    assert runner.calls == 2
    dispatcher.run_once()
    (files,) = sender.sent
    assert "SKIP-FAILED" in str(pydicom.dcmread(files[0]).ContentSequence)


def test_new_version_supersedes_the_old_results(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s4", slices=10, seed=4)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.2))
    queue_job(queue, series.series_uid, 1)
    worker.run_pending()
    queue_job(queue, series.series_uid, 2)
    worker.run_pending()
    with engine.connect() as conn:
        rows = {(r.version, r.kind): r for r in conn.execute(results.select())}
    assert set(rows) == {(1, "sr"), (1, "seg"), (1, "key-images"), (2, "sr"), (2, "seg"), (2, "key-images"),
                         (2, "kos")}
    assert rows[(1, "sr")].sop_uid != rows[(2, "sr")].sop_uid
    assert rows[(1, "sr")].result_series_uid != rows[(2, "sr")].result_series_uid
    new_sr = pydicom.dcmread(rows[(2, "sr")].path)
    old_sr = pydicom.dcmread(rows[(1, "sr")].path)
    assert (new_sr.SeriesNumber, new_sr.InstanceNumber) == (old_sr.SeriesNumber + 10, 2)
    # the IOCM rejection note withdraws exactly the version-1 objects, and goes out with version 2
    kos = pydicom.dcmread(rows[(2, "kos")].path)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
    rejected = {
        sop.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for sop in ser.ReferencedSOPSequence
    }
    assert rejected == {rows[(1, "sr")].sop_uid, rows[(1, "seg")].sop_uid, rows[(1, "key-images")].sop_uid}
    delivery = [d for d in dispatcher.for_series(series.series_uid) if d.version == 2][0]
    assert json.loads(delivery.files) == [rows[(2, k)].path for k in ("sr", "seg", "key-images", "kos")]
    predecessors = [
        sop.ReferencedSOPInstanceUID
        for study in new_sr.PredecessorDocumentsSequence
        for ser in study.ReferencedSeriesSequence
        for sop in ser.ReferencedSOPSequence
    ]
    assert predecessors == [rows[(1, "sr")].sop_uid]


def test_results_are_deterministic_across_a_rerun(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s5", slices=10, seed=5)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.7))
    job_id = queue_job(queue, series.series_uid)
    worker.run_pending()
    with engine.connect() as conn:
        first = {r.kind: r.sop_uid for r in conn.execute(results.select())}
    with engine.begin() as conn:  # as if the node crashed after writing results: the same job runs again
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(state="queued"))
    worker.run_pending()
    with engine.connect() as conn:
        again = {r.kind: r.sop_uid for r in conn.execute(results.select())}
    assert again == first


def test_replayed_dead_job_delivers_its_real_results(node, tmp_path):
    """A dead job sends a "processing failed" SR; replayed with `pacsnode retry --jobs` and then succeeding, its
    SR and SEG must still go out (as the series' next version, with the note withdrawing that SR)."""
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s6", slices=10, seed=6)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner(fail=True)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    worker.run_pending()
    dispatcher.run_once()
    assert queue.get(job_id).state == JobState.DEAD and len(sender.sent[-1]) == 1
    runner.fail = False
    assert queue.retry([job_id]) == 1
    worker.run_pending()
    assert queue.get(job_id).state == JobState.SKIPPED
    assert dispatcher.run_once() == 1
    modalities = sorted(pydicom.dcmread(f).Modality for f in sender.sent[-1])
    assert modalities == ["KO", "KO", "SEG", "SR"]  # the key images and the rejection of the failure SR


def test_configured_uid_root_heads_the_result_uids(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    root = "1.2.826.0.1.3680043.10.999."
    config = config.model_copy(update={"node": config.node.model_copy(update={"uid_root": root})})
    series = receive(ingestor, tmp_path, "s1", slices=12, seed=1)
    gap = receive(ingestor, tmp_path, "gap", slices=12, seed=2, skip=(5,))
    for s in (series, gap):
        queue_job(queue, s.series_uid)
    worker = Worker(config, engine, queue, dispatcher, FixedRunner)
    assert worker.run_pending() == 2
    dispatcher.run_once()
    objects = [pydicom.dcmread(f) for files in sender.sent for f in files]
    assert sorted(o.Modality for o in objects) == ["KO", "SEG", "SR", "SR"]  # results, and the skipped series' SR
    for o in objects:
        assert o.SOPInstanceUID.startswith(root) and o.SeriesInstanceUID.startswith(root)


def receive_edited(ingestor, tmp_path, name, edit, **kw):
    """Receive a ctgen series whose files were changed by ``edit(dataset)`` first (a sender's odd headers)."""
    series = write_ct_series(tmp_path / name, size=32, **kw)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    return series


def _drop(*keywords):
    def edit(ds):
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
    return edit


def test_a_series_without_any_date_still_gets_its_result(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    dates = [f"{p}{k}" for p in ("Study", "Series", "Content", "Acquisition") for k in ("Date", "Time")]
    series = receive_edited(ingestor, tmp_path, "nodates", _drop(*dates), slices=10, seed=7)
    job_id = queue_job(queue, series.series_uid)
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)).run_pending()
    assert queue.get(job_id).state == JobState.DONE
    dispatcher.run_once()
    (files,) = sender.sent
    sr = pydicom.dcmread(files[0])
    assert sr.ContentDate and sr.SeriesDate  # from the series' receive time, stored in the index


def test_a_series_without_frame_of_reference_gets_one_coded_sr_and_no_inference(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive_edited(ingestor, tmp_path, "nofor", _drop("FrameOfReferenceUID"), slices=10, seed=8)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.MISSING_GEOMETRY.value
    assert runner.calls == 0
    dispatcher.run_once()
    ((sr_path,),) = sender.sent
    assert "SKIP-GEOMETRY" in str(pydicom.dcmread(sr_path).ContentSequence)


def test_out_of_scope_volume_gets_a_not_processed_sr_and_never_a_probability(node, tmp_path):
    """The scope check is on and reads the fixed runner's masks on a tiny non-chest volume: out of scope."""
    config, engine, ingestor, queue, dispatcher, sender = node
    config = config.model_copy(update={"gate": config.gate.model_copy(update={"scope_check": True})})
    series = receive(ingestor, tmp_path, "scope", slices=10, seed=9)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner(0.99)
    classified = []
    runner.classify = lambda volume, lesion=None: classified.append(volume)  # must never be reached
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.OUT_OF_SCOPE.value
    assert classified == []
    dispatcher.run_once()
    ((sr_path,),) = sender.sent
    values = {str(e.value) for e in pydicom.dcmread(sr_path).iterall() if e.keyword == "CodeValue"}
    assert "SKIP-SCOPE" in values and "P-PNEUMONIA" not in values and "233604007" not in values


def test_the_lung_volume_pipeline_measures_without_a_verdict(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "vol", slices=10, seed=10)
    with engine.begin() as conn:
        job_id = queue.enqueue(conn, series.series_uid, 1, Priority.ROUTINE, PipelineName.LUNG_VOLUME)
    runner = FixedRunner(0.99)
    runner.classify = lambda volume, lesion=None: pytest.fail("the lung-volume pipeline must not classify")
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    assert queue.get(job_id).state == JobState.DONE
    dispatcher.run_once()
    ((sr_path, seg_path),) = sender.sent
    sr = pydicom.dcmread(sr_path)
    values = {str(e.value) for e in sr.iterall() if e.keyword in ("CodeValue", "TextValue")}
    assert "233604007" not in values and "P-PNEUMONIA" not in values  # no verdict, no probability
    assert {"Lungs", "118565006", "39607008"} <= values  # the lungs' tracking group with a volume measurement
    assert "lung volume" in sr.SeriesDescription.lower()
    assert pydicom.dcmread(seg_path).Modality == "SEG"
    # its own algorithm identity, so its result UIDs never collide with the pneumonia pipeline's
    assert sr.ManufacturerModelName == "pacs-ai-node lung volume CT"


def test_a_dead_job_whose_failure_report_fails_too_is_an_alert(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "gone", slices=10, seed=11)
    job_id = queue_job(queue, series.series_uid)
    for path in (config.node.spool_dir).rglob("*.dcm"):
        path.unlink()  # the spooled files vanished (a disk fault): neither a result nor a report can be built
    metrics = Metrics()
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(), metrics=metrics)
    worker.run_pending()
    assert queue.get(job_id).state == JobState.DEAD
    assert [r.id for r in queue.unreported()] == [job_id]
    text = metrics.render()[0].decode()
    assert 'pacsnode_jobs_ended_total{outcome="unreported",pipeline="pneumonia"} 1.0' in text


def test_a_superseded_version_whose_files_were_purged_is_still_withdrawn(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "purged", slices=10, seed=12)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.2))
    queue_job(queue, series.series_uid, 1)
    worker.run_pending()
    with engine.connect() as conn:
        v1 = {r.kind: r for r in conn.execute(results.select())}
    for row in v1.values():
        Path(row.path).unlink()  # retention deleted the delivered v1 files
    queue_job(queue, series.series_uid, 2)
    worker.run_pending()
    with engine.connect() as conn:
        kos_path = conn.execute(results.select().where(results.c.kind == "kos")).one().path
    kos = pydicom.dcmread(kos_path)
    rejected = {
        (ser.SeriesInstanceUID, sop.ReferencedSOPInstanceUID, sop.ReferencedSOPClassUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for sop in ser.ReferencedSOPSequence
    }
    assert rejected == {(r.result_series_uid, r.sop_uid, r.sop_class_uid) for r in v1.values()}
    assert kos.StudyInstanceUID == series.study_uid and kos.PatientID == "CTGEN-0001"


def test_the_lease_is_renewed_while_results_are_built_not_only_during_inference(node, tmp_path, monkeypatch):
    """Loading and building can outlast a short lease as much as inference can: the heartbeat covers them too, so
    no other worker claims the job meanwhile and this attempt's results are committed — also past [supervise]
    item_seconds, which only marks the loop stuck (a version of the hang limit used it, and a long job ran twice)."""
    from node.config import QueueSection, SuperviseSection
    from node.pipelines.pneumonia import PneumoniaPipeline

    config, engine, ingestor, _, dispatcher, _ = node
    config = config.model_copy(update={"queue": QueueSection(lease_seconds=0.5, heartbeat_seconds=0.05,
                                                             max_attempts=2, retry_delay_seconds=0),
                                       "supervise": SuperviseSection(item_seconds=1.0)})
    queue = JobQueue(engine, config.queue)
    series = receive(ingestor, tmp_path, "slow", slices=12, seed=5)
    job_id = queue_job(queue, series.series_uid)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    seen: dict[str, object] = {}
    build = PneumoniaPipeline.build

    def slow_build(self, *args, **kwargs):
        time.sleep(3 * config.queue.lease_seconds)  # a slow build (a big series, a busy disk)
        seen["other"] = queue.claim("another-worker")  # the lease has outlived three of its own lengths
        return build(self, *args, **kwargs)

    monkeypatch.setattr(PneumoniaPipeline, "build", slow_build)
    worker.warm_up()
    assert worker.process(queue.claim(worker.worker_id)) is JobState.DONE
    assert seen["other"] is None
    assert queue.get(job_id).state == JobState.DONE


def test_a_hung_attempt_stops_renewing_its_lease_after_its_limit(node, tmp_path, monkeypatch):
    """A job stuck in a call that never returns (a hard-mounted NFS spool, a GPU hang) kept its lease for ever:
    no other worker could take it, it never died, no report went out. Past [queue] attempt_limit_seconds the
    heartbeat stops, the lease runs out, another worker claims the job; the hung attempt's outcome is dropped."""
    from node.config import QueueSection
    from node.pipelines.pneumonia import PneumoniaPipeline

    config, engine, ingestor, _, dispatcher, _ = node
    config = config.model_copy(update={"queue": QueueSection(lease_seconds=0.5, heartbeat_seconds=0.05,
                                                             max_attempts=2, retry_delay_seconds=0,
                                                             attempt_limit_seconds=1.0)})
    queue = JobQueue(engine, config.queue)
    series = receive(ingestor, tmp_path, "hung", slices=12, seed=6)
    job_id = queue_job(queue, series.series_uid)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    seen: dict[str, object] = {}
    build = PneumoniaPipeline.build

    def hung_build(self, *args, **kwargs):
        time.sleep(1.0 + 3 * config.queue.lease_seconds)  # past the attempt limit, and the lease after it
        seen["other"] = queue.claim("another-worker")
        return build(self, *args, **kwargs)

    monkeypatch.setattr(PneumoniaPipeline, "build", hung_build)
    worker.warm_up()
    with capture_logs() as logs:
        assert worker.process(queue.claim(worker.worker_id)) is JobState.RUNNING  # lease lost: nothing recorded
    other = seen["other"]
    assert other is not None and other.id == job_id and other.attempts == 2
    assert queue.get(job_id).holder == "another-worker"
    assert [e["event"] for e in logs if e["event"] in ("job_overran", "job_lease_lost")] == ["job_overran",
                                                                                             "job_lease_lost"]


def _live_results(engine, series_uid):
    """(version, kind) of every result row of the series."""
    with engine.connect() as conn:
        return {(r.version, r.kind) for r in conn.execute(results.select().where(results.c.series_uid == series_uid))}


def test_a_dead_job_replayed_after_a_newer_version_publishes_nothing(node, tmp_path):
    """Version 2 died (its "processing failed" SR went out); version 3 then made the series' result and withdrew
    version 2's. An admin's `pacsnode retry --jobs` replays every dead job: version 2 must not publish a verdict
    that nothing would ever withdraw."""
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s8", slices=10, seed=8)
    failing = FixedRunner(fail=True)
    old = queue_job(queue, series.series_uid, 2)
    Worker(config, engine, queue, dispatcher, lambda: failing).run_pending()
    assert queue.get(old).state == JobState.DEAD
    runner = FixedRunner(0.9)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    queue_job(queue, series.series_uid, 3)
    worker.run_pending()
    before = _live_results(engine, series.series_uid)
    assert (2, "skipped-sr") in before and (3, "sr") in before and (3, "kos") in before
    assert queue.retry() == 0  # not replayed: ended as superseded
    calls = runner.calls
    worker.run_pending()
    job = queue.get(old)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, "superseded")
    assert runner.calls == calls  # not even run
    assert _live_results(engine, series.series_uid) == before
    assert [d.version for d in dispatcher.for_series(series.series_uid)].count(2) == 1  # only the failure SR
    assert queue.unreported() == []


class EnqueuesNewerVersion(FixedRunner):
    """While version 2 is being analysed, more instances arrive and version 3 is queued (a second worker would
    take it): the check before the job started passed, the one where results are recorded must not."""

    def __init__(self, queue, series_uid) -> None:
        super().__init__(0.9)
        self.queue, self.series_uid = queue, series_uid

    def classify(self, volume, lesion=None):
        queue_job(self.queue, self.series_uid, 3)
        return super().classify(volume, lesion)


def test_a_version_superseded_while_it_runs_records_and_sends_nothing(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s9", slices=10, seed=9)
    job_id = queue_job(queue, series.series_uid, 2)
    worker = Worker(config, engine, queue, dispatcher, lambda: EnqueuesNewerVersion(queue, series.series_uid))
    job = queue.claim(worker.worker_id)
    assert job is not None and job.id == job_id
    assert worker.process(job) == JobState.SKIPPED
    assert (queue.get(job_id).state, queue.get(job_id).skip_reason) == (JobState.SKIPPED, "superseded")
    assert _live_results(engine, series.series_uid) == set()
    assert dispatcher.for_series(series.series_uid) == []
    assert not [p for p in config.node.data_dir.rglob("*.dcm") if "results" in p.parts]  # the files removed


def test_unreported_leaves_out_a_dead_job_whose_series_moved_on(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    dead = queue_job(queue, "1.2.3.4", 1)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == dead).values(state=JobState.DEAD, last_error="x"))
    assert [r.id for r in queue.unreported()] == [dead]
    queue_job(queue, "1.2.3.4", 2)
    assert queue.unreported() == []


def test_a_replayed_dead_job_runs_as_a_new_version_that_withdraws_its_failure_report(node, tmp_path):
    """The "processing failed" SR of a dead job went to the PACS. Run again under the same version, the real
    verdict would sit beside it; as a new version, its SR supersedes that report and its rejection note withdraws
    it."""
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s10", slices=10, seed=10)
    failing = FixedRunner(fail=True)
    dead = queue_job(queue, series.series_uid, 1)
    Worker(config, engine, queue, dispatcher, lambda: failing).run_pending()
    with engine.connect() as conn:
        (report,) = [r for r in conn.execute(results.select()) if r.kind == "skipped-sr"]
    assert queue.retry() == 1
    assert (queue.get(dead).state, queue.get(dead).skip_reason) == (JobState.SKIPPED, "superseded")
    assert queue.retry() == 0  # nothing dead is left to replay again
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)).run_pending()
    assert _live_results(engine, series.series_uid) >= {(1, "skipped-sr"), (2, "sr"), (2, "seg"), (2, "kos")}
    with engine.connect() as conn:
        rows = {r.kind: r for r in conn.execute(results.select().where(results.c.version == 2))}
    kos = pydicom.dcmread(rows["kos"].path)
    rejected = {sop.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    assert rejected == {report.sop_uid}
    predecessors = [sop.ReferencedSOPInstanceUID for study in pydicom.dcmread(rows["sr"].path)
                    .PredecessorDocumentsSequence for ser in study.ReferencedSeriesSequence
                    for sop in ser.ReferencedSOPSequence]
    assert predecessors == [report.sop_uid]
    assert queue.unreported() == []


def test_a_contrast_enhanced_series_gets_a_not_processed_sr_and_no_inference(node, tmp_path):
    """Every model card says contrast was absent from training: a series whose header names a contrast agent (a CT
    pulmonary angiogram, a staging chest CT) is out of scope, unless the site turns gate.refuse_contrast off."""
    config, engine, ingestor, queue, dispatcher, sender = node

    def enhanced(ds):
        ds.ContrastBolusAgent = "IOHEXOL 350"

    series = receive_edited(ingestor, tmp_path, "contrast", enhanced, slices=10, seed=11)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert "contrast" in job.last_error and "IOHEXOL" not in job.last_error and runner.calls == 0
    header = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    for none in ("NONE", " no contrast ", ""):  # what scanners write for "no agent"
        header.ContrastBolusAgent = none
        assert check_header(header, config.gate) is None
    allowed = config.model_copy(update={"gate": config.gate.model_copy(update={"refuse_contrast": False})})
    queue_job(queue, series.series_uid, 2)
    Worker(allowed, engine, queue, dispatcher, lambda: runner).run_pending()
    assert runner.calls == 1


def test_a_series_mixing_acquisitions_is_judged_on_every_slice_not_the_first(node, tmp_path):
    """The header checks read only the lowest slice: a series whose later acquisition (12 of 16 slices) carried a
    contrast agent got a verdict (found by review). Every slice's header is checked once the series is loaded."""
    config, engine, ingestor, queue, dispatcher, _ = node

    def later_enhanced(ds):
        if float(ds.ImagePositionPatient[2]) > sorted_z[3]:
            ds.ContrastBolusAgent = "IOHEXOL 350"

    sorted_z = sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
                      for p in write_ct_series(tmp_path / "probe", size=32, slices=16, seed=12).paths)
    series = receive_edited(ingestor, tmp_path, "mixed", later_enhanced, slices=16, seed=12)
    job_id = queue_job(queue, series.series_uid)
    Worker(config, engine, queue, dispatcher, FixedRunner).run_pending()
    job = queue.get(job_id)
    assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
    assert "contrast" in job.last_error


@pytest.mark.parametrize(("orientation", "runs"), [
    ([-1, 0, 0, 0, -1, 0], False),  # prone: upside down, never seen in training
    ([0, 1, 0, -1, 0, 0], False),  # decubitus: on its side
    ([-1, 0, 0, 0, 1, 0], True),  # left-right flipped (feet first): training flipped left and right
])
def test_images_turned_in_plane_as_training_never_saw_are_out_of_scope(node, tmp_path, orientation, runs):
    config, engine, ingestor, queue, dispatcher, sender = node

    def turned(ds):
        ds.ImageOrientationPatient = orientation

    series = receive_edited(ingestor, tmp_path, "turned", turned, slices=10, seed=12)
    job_id = queue_job(queue, series.series_uid)
    runner = FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    if runs:
        assert job.state == JobState.DONE and runner.calls == 1
    else:
        assert (job.state, job.skip_reason) == (JobState.SKIPPED, SkipReason.OUT_OF_SCOPE.value)
        assert "turned" in job.last_error and runner.calls == 0


def test_a_full_results_disk_defers_the_job_without_spending_its_attempts(node, tmp_path, monkeypatch):
    """Writing the results on a full disk failed the job like a bad series: retried after 10 s, re-running its
    models, dead after max_attempts with a failure SR that could not be written either (unreported), and nothing
    replayed it once space came back. Now the job waits (at least a minute), its attempt not counted, and runs
    once the disk takes its results."""
    from node.errors import SpoolFullError
    from tests.fakeclock import FakeClock

    config, engine, ingestor, _, dispatcher, sender = node
    clock = FakeClock()
    queue = JobQueue(engine, config.queue, clock=clock)
    series = receive(ingestor, tmp_path, "full", slices=10, seed=41)
    job_id = queue_job(queue, series.series_uid)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9), clock=clock)

    def disk_full(*args, **kwargs):
        raise SpoolFullError("spool is full writing a result: No space left on device")

    monkeypatch.setattr(worker.results_store, "write", disk_full)
    for _ in range(config.queue.max_attempts + 1):
        assert worker.run_pending() == 1
        job = queue.get(job_id)
        assert job.state == JobState.QUEUED and job.attempts == 0 and "SpoolFullError" in job.last_error
        assert worker.run_pending() == 0  # not due again at once
        clock.advance(61)
    monkeypatch.undo()
    assert worker.run_pending() == 1 and queue.get(job_id).state == JobState.DONE
    dispatcher.run_once()
    assert len(sender.sent) == 1


def test_no_job_is_claimed_while_the_results_disk_is_down_to_its_reserve(node, tmp_path, monkeypatch):
    from structlog.testing import capture_logs

    from node import admission

    config, engine, ingestor, queue, dispatcher, _ = node
    free = {"bytes": 100 << 20}  # 100 MiB of 100 GiB: below the default reserve (512 MiB, 1 %)
    monkeypatch.setattr(admission, "statvfs_usage", lambda path: (free["bytes"], 100 << 30))
    series = receive(ingestor, tmp_path, "waits", slices=10, seed=42)
    job_id = queue_job(queue, series.series_uid)
    dead = receive(ingestor, tmp_path, "dead", slices=10, seed=47)
    dead_id = queue_job(queue, dead.series_uid)
    with engine.begin() as conn:  # a job dead earlier whose "processing failed" SR was never written
        conn.execute(jobs.update().where(jobs.c.id == dead_id).values(state=JobState.DEAD, last_error="boom"))
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9), poll_seconds=0.05)
    with capture_logs() as logs:
        worker.start()
        try:
            time.sleep(1.0)
            assert queue.get(job_id).state == JobState.QUEUED  # each claim would run the models for nothing
            # nor is the dead job's report tried now: one tried on a full disk is not tried again by this process
            assert [r.id for r in queue.unreported()] == [dead_id]
            free["bytes"] = 50 << 30
            deadline = time.monotonic() + 20
            while (queue.get(job_id).state != JobState.DONE or queue.unreported()) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            worker.stop(10)
    assert queue.get(job_id).state == JobState.DONE and queue.unreported() == []
    events = [e["event"] for e in logs if e["event"].startswith("worker_")]
    assert events[:2] == ["worker_paused", "worker_resumed"]


def test_jobs_an_earlier_worker_process_left_running_are_recovered_at_start(node, tmp_path):
    """A worker process that ended mid-job (killed, out of memory, a stop past its timeout) left the job running
    until its lease ran out (300 s by default). A worker of the same node instance now takes it back at start;
    the attempt stays counted, so a job that kills its worker each time is dead-lettered after max_attempts
    (here 2), and another instance's running job is left alone."""
    config, engine, ingestor, queue, dispatcher, _ = node
    mine = receive(ingestor, tmp_path, "mine", slices=10, seed=43)
    theirs = receive(ingestor, tmp_path, "theirs", slices=10, seed=44)
    job_id = queue_job(queue, mine.series_uid)

    def worker(identity: str) -> Worker:
        return Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9), identity=identity)

    assert queue.claim(worker("unit").worker_id).id == job_id  # that process then dies
    other_id = queue_job(queue, theirs.series_uid)
    assert queue.claim(worker("other-node").worker_id).id == other_id  # alive, on another instance
    assert worker("unit").recover() == (1, 0)
    assert queue.get(job_id).state == JobState.QUEUED and queue.get(other_id).state == JobState.RUNNING
    assert queue.claim(worker("unit").worker_id).id == job_id  # attempt 2 of 2: that process dies too
    assert worker("unit").recover() == (0, 1)
    job = queue.get(job_id)
    assert job.state == JobState.DEAD and "worker lost 2 times" in job.last_error
    assert queue.get(other_id).state == JobState.RUNNING


def test_a_series_over_the_memory_budget_is_refused_before_it_is_loaded(node, tmp_path):
    """The worker holds a series whole (~13 bytes per voxel at its peak): a 2,000-slice series of 512² took ~7 GB
    and ended the worker at every attempt. Over [gate] max_series_megavoxels it gets a coded SR, no inference."""
    config, engine, ingestor, queue, dispatcher, sender = node
    config = config.model_copy(update={"gate": config.gate.model_copy(update={"max_series_megavoxels": 0.01})})
    big = receive(ingestor, tmp_path, "big", slices=10, seed=45)  # 10 x 32 x 32 = 10,240 voxels > 10,000
    job_id = queue_job(queue, big.series_uid)
    runner = FixedRunner()
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.TOO_LARGE.value
    assert "10 slices" in job.last_error and runner.calls == 0
    dispatcher.run_once()
    ((sr_path,),) = sender.sent
    assert "SKIP-TOO-LARGE" in str(pydicom.dcmread(sr_path))
    small = receive(ingestor, tmp_path, "small", slices=9, seed=46)  # 9,216 voxels: within the budget
    job_id = queue_job(queue, small.series_uid)
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    assert queue.get(job_id).state == JobState.DONE


def test_a_spool_volume_not_mounted_defers_the_job_instead_of_judging_the_series(node, tmp_path):
    """Defect: with the spool's volume not mounted (a lost NFS mount, a reboot with the mount late), every file of a
    queued series failed to read; the job spent its attempts, died and was left for an admin's retry, though nothing
    was wrong with the series. Now a failure to read files while the series' spool root has no marker defers the job
    (no attempt spent, nothing sent), and once the volume is back it gets its real results."""
    import os

    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s-nfs", slices=12, seed=41)
    job_id = queue_job(queue, series.series_uid)
    root = config.node.spool_dir
    os.rename(root, tmp_path / "volume")  # the volume gone, its bare mount point left
    root.mkdir()
    runner = FixedRunner(0.9)
    worker = Worker(config, engine, queue, dispatcher, lambda: runner)
    with capture_logs() as logs:
        worker.process(queue.claim(worker.worker_id))
    job = queue.get(job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0, (job.state, job.attempts, job.last_error)
    assert "spool not mounted" in job.last_error and str(root) in job.last_error
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["job_deferred"]
    assert dispatcher.run_once() == 0 and sender.sent == [] and runner.calls == 0
    root.rmdir()
    os.rename(tmp_path / "volume", root)
    with engine.begin() as conn:  # due now rather than after the deferral
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(due_at=0))
    assert worker.run_pending() == 1 and queue.get(job_id).state == JobState.DONE
    dispatcher.run_once()
    assert [pydicom.dcmread(f).Modality for f in sender.sent[0]] == ["SR", "SEG", "KO"]


def test_a_file_missing_from_a_mounted_spool_fails_the_job_rather_than_calling_it_undecodable(node, tmp_path,
                                                                                              monkeypatch):
    """The spool is there (its marker reads) but a file read for the volume is gone: that is a failure of the node's
    own (data lost), retried and then dead-lettered as failed, its reason kept — not a refusal for undecodable pixels
    (which a read error on the pixels alone, headers readable, would otherwise have been answered with)."""
    import models.preprocess

    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path, "s-lost", slices=12, seed=42)
    job_id = queue_job(queue, series.series_uid)
    real = models.preprocess.read_file

    def read_file(index, path, data=None):  # the file vanishes after the header checks, before the load reads it
        if index == 3:
            Path(path).unlink(missing_ok=True)
        return real(index, path, data)

    monkeypatch.setattr(models.preprocess, "read_file", read_file)
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    worker.run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.DEAD and job.skip_reason is None and job.attempts == 2
    assert "cannot be read (No such file or directory)" in job.last_error
    dispatcher.run_once()  # nothing coded "undecodable" goes out (the failure report needs every file's header)
    assert all("SKIP-UNDECODABLE" not in str(pydicom.dcmread(f).ContentSequence) for fs in sender.sent for f in fs)


def test_a_series_uid_reused_across_two_studies_is_never_judged_as_one(node, tmp_path):
    """Found by review: a sender that reuses a SeriesInstanceUID for another patient's study (a console generating
    UIDs from the time, a de-identification tool hashing) had both studies' slices indexed as one series; the
    models ran on a volume of two patients and only highdicom's SEG check ended the job (processing failed after
    every attempt). Now the gate refuses such a series before any model runs (SKIP-MULTI-STUDY), and the coded
    report goes to the study the series was first received under, naming only that study's instances."""
    config, engine, ingestor, queue, dispatcher, sender = node
    a = write_ct_series(tmp_path / "a", size=32, slices=8, seed=51, patient_id="PAT-A")
    b = write_ct_series(tmp_path / "b", size=32, slices=8, seed=52, patient_id="PAT-B")
    for path in a.paths:
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    for i, path in enumerate(b.paths):  # the other study, under the same series UID, continuing the stack
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = a.series_uid, a.frame_of_reference_uid
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 8 * 2.5]
        ds.save_as(tmp_path / f"b{i}.dcm", enforce_file_format=True)
        ingestor.accept(dataset_bytes(tmp_path / f"b{i}.dcm"), "1.2.840.10008.1.2.1", Origin("CT2", "a2"))
    job_id = queue_job(queue, a.series_uid)
    runner = FixedRunner(0.9)
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.SKIPPED and job.skip_reason == SkipReason.MULTIPLE_STUDIES.value
    assert runner.calls == 0
    dispatcher.run_once()
    ((sr_path,),) = sender.sent
    sr = pydicom.dcmread(sr_path)
    assert "SKIP-MULTI-STUDY" in str(sr.ContentSequence)
    assert (sr.PatientID, sr.StudyInstanceUID) == ("PAT-A", a.study_uid)
    named = {sop.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
             for ser in study.ReferencedSeriesSequence for sop in ser.ReferencedSOPSequence}
    assert named == set(a.sop_uids)
    assert {s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence} == {a.study_uid}


def test_malformed_age_sex_and_request_text_are_missing_inputs_not_a_failed_series(node, tmp_path):
    """Found by review: PatientAge, PatientBirthDate, PatientSex or ReasonForStudy written in a VR their bytes do not
    fit (US with 3 bytes, as a faulty converter writes; the ingest parse rightly acknowledges them, it never
    converts such values) raised pydicom's BytesLengthException where the gate and the models read them: the job
    failed every attempt and the PACS got "processing failed" instead of a result. Now such a value reads as
    missing: the series gets its SR and SEG."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    config, engine, ingestor, queue, dispatcher, sender = node
    series = write_ct_series(tmp_path / "in", size=32, slices=12, seed=61)
    for i, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientAge", "PatientBirthDate", "PatientSex", "ReasonForStudy"):
            tag = Tag(keyword)
            ds._dict[tag] = RawDataElement(tag, "US", 3, b"abc", 0, False, True)
        ds.save_as(tmp_path / f"m{i}.dcm", enforce_file_format=True)
        ingestor.accept(dataset_bytes(tmp_path / f"m{i}.dcm"), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    job_id = queue_job(queue, series.series_uid)
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)).run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.DONE, (job.state, job.last_error)
    dispatcher.run_once()
    assert [pydicom.dcmread(f).Modality for f in sender.sent[0]] == ["SR", "SEG", "KO"]


def test_a_worker_started_before_its_results_volume_is_mounted_writes_nothing_under_it(node, tmp_path):
    """Found by this session's second review: the worker's results folder was marked at start whatever it held, so a
    worker (re)started before its results volume was mounted (docker-compose.scale.yml's ``results`` volume) marked
    the bare mount point and wrote results there, which the volume then hid: their deliveries died as "result file
    missing". Now the folder is marked only if the newest recorded results are in it; until the volume is there the
    results store refuses writes and jobs wait without spending attempts, then get their results in the volume."""
    import os

    from node.spool import read_marker

    config, engine, ingestor, queue, dispatcher, sender = node
    first = receive(ingestor, tmp_path, "s-first", slices=12, seed=71)
    queue_job(queue, first.series_uid)
    Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9)).run_pending()
    root = config.node.data_dir / "results"
    os.rename(root, tmp_path / "results-volume")  # the worker restarts with the volume not mounted yet
    root.mkdir()
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    later = receive(ingestor, tmp_path, "s-later", slices=12, seed=72)
    job_id = queue_job(queue, later.series_uid)
    worker.run_pending()
    job = queue.get(job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0, (job.state, job.last_error)
    assert list(root.iterdir()) == []  # no marker, no result on the bare mount point
    root.rmdir()
    os.rename(tmp_path / "results-volume", root)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(due_at=0))
    worker.run_pending()
    assert queue.get(job_id).state == JobState.DONE
    assert read_marker(root) is not None and (root / later.study_uid).is_dir()
