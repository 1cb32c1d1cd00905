"""The worker: claims jobs, gates, runs the models (loaded once, warm), builds SR/SEG, hands them to dispatch.

`Worker.process(job)` is one job end to end: validity gate on the index rows → load the series from the spool
through `models.preprocess` (undecodable pixels are a refusal too) → `ModelRunner.run` with the lease kept alive
by heartbeats → `node.results` objects → files written atomically under ``data_dir/results`` → one transaction
that records the results, finishes the job and queues one delivery per destination. A refused series gets a
coded "not processed" SR instead; a job that dies after its last attempt gets one saying processing failed.
Queue time and inference time are recorded separately on the job. The loop runs in its own thread, apart
from the receive threads; `wake()` lets completion start it without waiting for the poll.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from sqlalchemy.engine import Engine

from models.errors import ModelError
from models.preprocess import PreprocessError, Volume, load_series
from node.config import NodeConfig
from node.db import metadata
from node.dispatch import Dispatcher
from node.gate import GateRefusal, check_series
from node.index import instances
from node.logs import get_logger
from node.metrics import Metrics
from node.queue import Job, JobQueue
from node.results import (
    AlgorithmIdentity,
    Findings,
    ResultsError,
    SkipReason,
    Superseded,
    build_results,
    build_skipped_sr,
)
from node.spool import Spool
from node.states import JobState

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),  # the source series
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # sr | seg | skipped-sr
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("result_series_uid", sa.String(64), nullable=False),
    sa.Column("sop_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("series_uid", "version", "kind", name="uq_results_series_version_kind"),
)


class ModelRunner(ABC):
    """The inference seam: a warm model pair turning a `Volume` into `Findings`."""

    algorithm: AlgorithmIdentity

    @abstractmethod
    def run(self, volume: Volume) -> Findings: ...


class RegistryRunner(ModelRunner):
    """The shipped TensorFlow classifier + U-Net from `models.registry`, loaded once per process."""

    def __init__(self, classifier_version: str | None = None, segmenter_version: str | None = None,
                 weights_dir: Path | None = None) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banners are not operator logs
        from models.registry import Registry

        registry = Registry(weights_dir)
        self.classifier = registry.classifier(classifier_version)
        self.segmenter = registry.segmenter(segmenter_version)
        self.algorithm = AlgorithmIdentity(
            name="pacs-ai-node pneumonia CT",
            version=f"cls-{self.classifier.version}+seg-{self.segmenter.version}",
        )

    def run(self, volume: Volume) -> Findings:
        cls = self.classifier.predict(volume, age=volume.patient_age, sex=volume.patient_sex)
        seg = self.segmenter.predict(volume)
        return Findings(
            probability=float(cls.probability), threshold=float(cls.threshold), attention=cls.attention,
            lungs=seg.lungs, lesion=seg.lesion,
        )


class Worker:
    """Runs jobs from ``queue`` until stopped; ``runner_factory`` is called once, in the worker thread."""

    def __init__(
        self,
        config: NodeConfig,
        engine: Engine,
        queue: JobQueue,
        dispatcher: Dispatcher,
        runner_factory: Callable[[], ModelRunner],
        *,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.queue = queue
        self.dispatcher = dispatcher
        self.runner_factory = runner_factory
        self.runner: ModelRunner | None = None
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.metrics = metrics or Metrics()
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self.results_store = Spool(config.node.data_dir / "results")
        self.log = get_logger(component="worker", worker_id=self.worker_id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the models are loaded

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.worker_id, daemon=True)
        self._thread.start()

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def apply_config(self, config: NodeConfig) -> None:
        """Hot reload: gate and heartbeat settings apply to the next job (model versions need a restart)."""
        self.config = config

    def warm_up(self) -> ModelRunner:
        if self.runner is None:
            t0 = time.perf_counter()
            self.runner = self.runner_factory()
            self.log.info("models_loaded", algorithm=self.runner.algorithm.model_key,
                          seconds=round(time.perf_counter() - t0, 2))
        self.ready.set()
        return self.runner

    def _algorithm(self, runner: ModelRunner) -> AlgorithmIdentity:
        """The runner's identity under the configured UID root (``[node] uid_root``), which result UIDs derive from."""
        root = self.config.node.uid_root
        return replace(runner.algorithm, uid_root=root) if root else runner.algorithm

    def _loop(self) -> None:
        try:
            self.warm_up()
        except Exception:
            self.log.exception("models_failed_to_load")
            return
        while not self._stop.is_set():
            try:
                job = self.queue.claim(self.worker_id)
            except sa.exc.SQLAlchemyError:
                self.log.exception("claim_failed")
                job = None
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self.process(job)

    def run_pending(self) -> int:
        """Process every due job now, in the caller's thread (tests, one-shot runs); returns how many."""
        self.warm_up()
        n = 0
        while (job := self.queue.claim(self.worker_id)) is not None:
            self.process(job)
            n += 1
        return n

    # -- one job -------------------------------------------------------------------------------------------
    def process(self, job: Job) -> JobState:
        log = self.log.bind(job_id=job.id, series_uid=job.series_uid, version=job.version, attempt=job.attempts)
        log.info("job_started", queue_seconds=round(job.started_at - job.created_at, 3))
        try:
            rows = self._instances(job.series_uid)
            refusal = check_series(rows, self.config.gate)
            if refusal is not None:
                return self._skip(job, rows, refusal, log)
            try:
                volume = load_series([r.path for r in rows])
            except PreprocessError as exc:
                return self._skip(job, rows, GateRefusal(SkipReason.UNDECODABLE_PIXELS, str(exc)[:200]), log)
            runner = self.warm_up()
            t0 = time.perf_counter()
            with self._heartbeat(job):
                findings = runner.run(volume)
            inference_seconds = time.perf_counter() - t0
            self.metrics.inference(inference_seconds)
            built = build_results(
                volume.datasets, findings, self._algorithm(runner), series_version=job.version,
                superseded=self._superseded(job),
            )
            objects = [("sr", built.sr)] + ([("seg", built.seg)] if built.seg is not None else [])
            self._commit(job, objects, inference_seconds=inference_seconds, skipped=None)
            log.info(
                "job_done", inference_seconds=round(inference_seconds, 3), probability=round(findings.probability, 4),
                pneumonia=findings.probability >= findings.threshold, slices=volume.shape[0],
                sr_uid=str(built.sr.SOPInstanceUID),
            )
            return JobState.DONE
        except LeaseLost:
            log.warning("job_lease_lost")
            return JobState.RUNNING
        except (ModelError, ResultsError, OSError, sa.exc.SQLAlchemyError, ValueError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
            state = self.queue.fail(job, self.worker_id, error)
            log.error("job_failed", error=error, next_state=str(state))
            if state is JobState.DEAD:
                self._report_failure(job, error, log)
            return state

    def _instances(self, series_uid: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(instances).where(instances.c.series_uid == series_uid)))

    def _superseded(self, job: Job) -> list[Superseded]:
        """The SR/SEG of the newest earlier version of this series, which the new SR names as superseded."""
        with self.engine.connect() as conn:
            prev = conn.execute(
                sa.select(sa.func.max(results.c.version)).where(
                    results.c.series_uid == job.series_uid, results.c.version < job.version
                )
            ).scalar()
            if prev is None:
                return []
            rows = conn.execute(
                sa.select(results).where(results.c.series_uid == job.series_uid, results.c.version == prev)
            )
            return [Superseded(r.study_uid, r.result_series_uid, r.sop_uid, r.sop_class_uid) for r in rows]

    def _skip(self, job: Job, rows: Sequence[Any], refusal: GateRefusal, log: Any) -> JobState:
        sources = [dcmread(r.path, stop_before_pixels=True) for r in _by_position(rows)]
        runner = self.warm_up()
        sr = build_skipped_sr(sources, refusal.reason, refusal.detail, self._algorithm(runner),
                              series_version=job.version)
        self._commit(job, [("skipped-sr", sr)], inference_seconds=0.0, skipped=refusal)
        log.info("job_skipped", reason=refusal.reason.value, detail=refusal.detail, sr_uid=str(sr.SOPInstanceUID))
        return JobState.SKIPPED

    def _report_failure(self, job: Job, error: str, log: Any) -> None:
        """A dead job still tells the PACS, with a coded "processing failed" SR (best effort)."""
        try:
            rows = self._instances(job.series_uid)
            sources = [dcmread(r.path, stop_before_pixels=True) for r in _by_position(rows)]
            sr = build_skipped_sr(sources, SkipReason.PROCESSING_FAILED, error[:200], self._algorithm(self.warm_up()),
                                  series_version=job.version)
            self._store_and_enqueue(job, [("skipped-sr", sr)], lambda conn: True)
        except Exception:  # the job is already dead-lettered with its error; this report is extra
            log.exception("failure_report_failed")

    # -- writing and committing ----------------------------------------------------------------------------
    def _commit(self, job: Job, objects: Sequence[tuple[str, Dataset]], *, inference_seconds: float,
                skipped: GateRefusal | None) -> None:
        def end_job(conn: sa.Connection) -> bool:
            if skipped is None:
                return self.queue.finish(conn, job, self.worker_id, inference_seconds=inference_seconds)
            return self.queue.skip(conn, job, self.worker_id, skipped.reason.value, skipped.detail)

        self._store_and_enqueue(job, objects, end_job)

    def _store_and_enqueue(self, job: Job, objects: Sequence[tuple[str, Dataset]],
                           end_job: Callable[[sa.Connection], bool]) -> None:
        """Write the objects durably, then in one transaction: record them, end the job, queue deliveries."""
        written: list[dict[str, Any]] = []
        for kind, ds in objects:
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            spooled = self.results_store.write(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), [buffer.getvalue()]
            )
            written.append(
                dict(series_uid=job.series_uid, version=job.version, job_id=job.id, kind=kind,
                     study_uid=str(ds.StudyInstanceUID), result_series_uid=str(ds.SeriesInstanceUID),
                     sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), path=str(spooled.path),
                     created_at=self.clock())
            )
        with self.engine.begin() as conn:
            conn.execute(
                results.delete().where(
                    results.c.series_uid == job.series_uid,
                    results.c.version == job.version,
                    results.c.kind.in_([w["kind"] for w in written]),
                )
            )
            conn.execute(results.insert(), written)
            if not end_job(conn):
                raise LeaseLost()
            self.dispatcher.enqueue(
                job.series_uid, job.version, [Path(w["path"]) for w in written], [w["sop_uid"] for w in written],
                conn=conn,
            )
        self.dispatcher.wake()

    @contextmanager
    def _heartbeat(self, job: Job) -> Iterator[None]:
        stop = threading.Event()
        lost = threading.Event()

        def beat() -> None:
            while not stop.wait(self.config.queue.heartbeat_seconds):
                if not self.queue.heartbeat(job, self.worker_id):
                    lost.set()
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if lost.is_set():
            raise LeaseLost()


class LeaseLost(Exception):
    """The job's lease expired and another worker may hold it: drop this attempt's outcome."""


def _by_position(rows: Sequence[Any]) -> list[Any]:
    """Rows in slice order when geometry allows (instance number otherwise), for result references."""
    def key(r: Any) -> tuple[float, int]:
        try:
            z = float(str(r.image_position).split("\\")[2])
        except (IndexError, ValueError):
            z = 0.0
        return (z, r.instance_number or 0)

    return sorted(rows, key=key)

