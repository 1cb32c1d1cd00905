"""The worker: claims jobs, gates, runs the job's pipeline (models loaded once, warm), hands results to dispatch.

`Worker.process(job)` is one job end to end: validity gate on the index rows and one header → load the series
from the spool through `models.preprocess` (undecodable pixels are a refusal too) → the routed pipeline's
`analyse` (models + scope check) with the lease kept alive by heartbeats → its `build` → files written
atomically under ``data_dir/results`` → one transaction that records the results, finishes the job and queues
one delivery per destination (`node.worker_results`). A refused series gets a coded "not processed" SR instead; a
job that dies after its last attempt gets one saying processing failed (and if even that cannot be built, the
job is counted as unreported in `/metrics` and listed under alerts in `pacsnode status`). When a newer version replaces results
already made for the series, an IOCM rejection note (KOS) withdrawing them goes out with the new objects; a job
whose series already has a newer version publishes nothing (`node.versions`: ended as skipped, "superseded"). Queue
time and inference time are recorded separately on the job. The loop runs in its own thread, apart from the
receive threads; `wake()` lets completion start it without waiting for the poll. No exception ends the loop: it
beats the heartbeat registry (`node.supervise`) as loop ``worker``, and when idle it sends the "processing failed"
SR of dead jobs nobody reported (a worker killed mid-job, a report that failed on a full disk).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom import Dataset, dcmread
from sqlalchemy.engine import Engine

from models.errors import ModelError
from models.preprocess import PreprocessError, load_series
from node.admission import ReserveWatch
from node.config import NodeConfig, PipelineName
from node.db import reading
from node.device import announce as announce_device
from node.device import report as device_entry
from node.dispatch import Dispatcher
from node.errors import SpoolFullError, StoreFailedError
from node.gate import GateRefusal, check_header, check_series, check_size, unloadable
from node.heap import release_beyond, retain_freed_memory
from node.leases import holder_id, own_prefix
from node.logs import get_logger
from node.loops import LoopThread, backoff_seconds
from node.metrics import Metrics
from node.pipelines import PIPELINES, ModelRunner, Pipeline, RegistryRunner  # noqa: F401 - re-exported
from node.prefetch import Prefetcher, prefetch_enabled
from node.queue import Job, JobQueue, LeaseLost, lease_renewed
from node.results import AlgorithmIdentity, ResultsError, SkipReason, Superseded, build_skipped_sr
from node.schema import instances, results, series
from node.spool import Spool
from node.spools import Spools
from node.states import JobState
from node.supervise import Heartbeats, failure
from node.versions import SKIP_REASON, JobSuperseded, newer_version, previous_results, superseded_entries
from node.versions import withdrawal as withdrawal_note
from node.worker_results import ResultsRecorder

LOOP = "worker"  # the worker loop's name in the heartbeat registry
_MAX_ERROR_BACKOFF = 30.0  # seconds between turns while every turn fails (e.g. the database is down)
_LOST_CHECK_SECONDS = 30.0  # how often an idle worker looks for dead jobs nobody reported
_LOADING_STOP_SECONDS = 0.2  # how long `stop` waits for a loop that is still loading the models


class Worker:
    """Runs jobs from ``queue`` until stopped; ``runner_factory`` is called once, in the worker thread."""

    def __init__(
        self, config: NodeConfig, engine: Engine, queue: JobQueue, dispatcher: Dispatcher,
        runner_factory: Callable[[], ModelRunner], *,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
        heartbeats: Heartbeats | None = None,
        identity: str | None = None,  # the node instance in lease holders (default: the host name)
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
        self.identity = identity
        self.worker_id = holder_id("worker", identity)  # <instance>:worker:<pid>:<random>, the lease holder
        root = config.node.data_dir / "results"  # a late-mounted results volume is not marked (node.spool)
        keep = config.retention.results_days * 86400.0  # results younger than that are not purged for their age
        self.results_store = Spool(root, indexed_files=lambda: _newest_results(engine, root, self.clock() - keep
                                                                               if keep else None))
        self.recorder = ResultsRecorder(engine, queue, dispatcher, self.results_store, lambda: self.clock(),
                                        self.worker_id)
        self.log = get_logger(component="worker", worker_id=self.worker_id)
        self.ready = threading.Event()  # set once the models are loaded
        self.heartbeats = heartbeats or Heartbeats()
        self._loop_thread = LoopThread(self.heartbeats, LOOP, self.worker_id, self._loop)
        self._reported: set[int] = set()  # dead jobs whose failure report this worker attempted
        self._next_lost_check = 0.0
        self._disk_watch = ReserveWatch(self.results_store.root, config.node.spool_dir, self.log, "worker_paused",
                                        "worker_resumed")
        self.prefetch = Prefetcher(config, engine, self.heartbeats) if prefetch_enabled(config) else None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """At start: the jobs an earlier worker process of this node left running go back to the queue now, not
        when their lease runs out (up to ``lease_seconds`` later); returns (requeued, dead-lettered). Their attempt
        stays counted, so a job that kills its worker (out of memory) is dead-lettered after ``max_attempts``."""
        requeued, dead = self.queue.recover(own_prefix("worker", self.identity))
        if requeued or dead:
            self.log.warning("jobs_recovered", requeued=requeued, dead_lettered=dead)
        return requeued, dead

    def start(self) -> None:
        """Run the loop in its own thread, supervised as loop ``worker`` (a dead thread is started again)."""
        thread = self._loop_thread
        if thread.alive():
            raise RuntimeError("the worker is already running")
        thread.stopping.clear()
        thread.supervise(self.poll_seconds, restart=thread.respawn)
        thread.respawn()

    def _alive(self) -> bool:
        return self._loop_thread.alive()

    def wake(self, *_: Any) -> None:
        self._loop_thread.wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop, waiting up to ``timeout`` s for a job in hand. While the models are still loading there
        is no job to finish: the wait is short and the process may exit under the load (`loading`)."""
        if self.prefetch is not None:
            self.prefetch.stop(timeout)
        self._loop_thread.stop(timeout if self.ready.is_set() else min(timeout, _LOADING_STOP_SECONDS))

    @property
    def loading(self) -> bool:
        """The loop thread is still loading the models (it holds no job)."""
        return self._loop_thread.alive() and not self.ready.is_set()

    def apply_config(self, config: NodeConfig) -> None:
        """Hot reload: gate and heartbeat settings apply to the next job (model versions need a restart)."""
        self.config = config
        if self.prefetch is not None:
            self.prefetch.apply_config(config)  # its cache bound and poll interval (on/off needs a restart)

    def warm_up(self) -> ModelRunner:
        if self.runner is None:
            t0 = time.perf_counter()
            retain_freed_memory(self.config.worker.retain_heap_mb)  # process-wide, before the models allocate
            self.runner = self.runner_factory()
            if self.prefetch is not None:
                self.prefetch.start(self.runner)  # streaming inference (node.prefetch), once the models are warm
            self.log.info("models_loaded", algorithm=self.runner.algorithm.model_key,
                          seconds=round(time.perf_counter() - t0, 2))
            announce_device(self.runner.device, self.log, self.metrics)
        self.ready.set()
        return self.runner

    def device_report(self) -> dict[str, Any]:
        """What the models run on, for ``/readyz`` (node.device)."""
        return device_entry(self.runner.device if self.runner else None, self.config.worker.device.value)

    def _algorithm(self, runner: ModelRunner, pipeline: Pipeline) -> AlgorithmIdentity:
        """The pipeline's identity under the configured UID root (``[node] uid_root``), which result UIDs derive
        from."""
        algorithm = pipeline.algorithm(runner)
        root = self.config.node.uid_root
        return replace(algorithm, uid_root=root) if root else algorithm

    def _loop(self) -> None:
        """Claim and process jobs until stopped. No exception ends it: a job's own failure is recorded by
        `process`; anything else (the database gone, a bug between jobs) is logged and the loop backs off and goes
        on — a job it held is claimed again when its lease expires, its attempt counted. Only a model load that
        fails ends the thread, so the supervisor restarts it (or takes the process down)."""
        loop = self._loop_thread
        loop.beat(busy_for=self.config.supervise.item_seconds)  # loading the models
        try:
            self.warm_up()
        except Exception as exc:  # noqa: BLE001 - ends the thread on purpose: see the docstring
            self.log.exception("models_failed_to_load", error=failure(exc))  # no header values at load time
            return
        errors = 0
        while not loop.stopping.is_set():
            loop.beat()
            try:
                paused = self._results_disk_full()
                job = None if paused else self.queue.claim(self.worker_id)
                if job is None:
                    if not paused:  # a report tried on a full disk would not be tried again by this process
                        self._report_lost()
                else:
                    loop.beat(busy_for=self.config.supervise.item_seconds)
                    self.process(job)
                    release_beyond(self.config.worker.retain_heap_mb)  # node.heap: at most that much kept free
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure, see the docstring
                errors += 1
                job = None
                self.log.error("worker_loop_error", error=failure(exc), consecutive_errors=errors)
            if job is None:
                wait = backoff_seconds(self.poll_seconds, errors, cap=_MAX_ERROR_BACKOFF)
                loop.beat(busy_for=wait)
                loop.wake.wait(wait)
                loop.wake.clear()

    def _results_disk_full(self) -> bool:
        """Whether the results' disk is down to ``[admission]``'s hard reserve: then no job is claimed (each would
        run its models and fail to write), and what is queued waits."""
        return self._disk_watch.full(self.config.admission)

    def _report_lost(self) -> None:
        """Dead jobs that no object was ever recorded for get their "processing failed" SR here, once per job per
        process: jobs whose worker died mid-attempt (killed, out of memory) until the queue dead-lettered them at
        claim time, and jobs whose report failed before (e.g. on a full disk) in an earlier process."""
        now = time.monotonic()
        if now < self._next_lost_check:
            return
        self._next_lost_check = now + _LOST_CHECK_SECONDS
        for row in self.queue.unreported(limit=100):
            if row.id in self._reported or self._loop_thread.stopping.is_set():
                continue
            job = Job(int(row.id), row.series_uid, int(row.version), 0, 0, 0.0, 0.0,
                      PipelineName(row.pipeline or PipelineName.PNEUMONIA))
            log = self.log.bind(job_id=job.id, series_uid=job.series_uid, version=job.version,
                                pipeline=job.pipeline.value)
            log.warning("dead_job_reporting", error=row.last_error)
            self._report_failure(job, PIPELINES[job.pipeline], str(row.last_error or "worker lost"), log)

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
        log = self.log.bind(job_id=job.id, series_uid=job.series_uid, version=job.version, attempt=job.attempts,
                            pipeline=job.pipeline.value)
        log.info("job_started", queue_seconds=round(job.started_at - job.created_at, 3))
        pipeline = PIPELINES[job.pipeline]
        ended: JobState | None = None  # a refusal committed under the heartbeat's lease (which then finds it ended)
        try:
            with self.engine.begin() as conn:  # e.g. a dead job replayed after the series moved on
                if (newer := newer_version(conn, job.series_uid, job.version)) is not None:
                    self.recorder.end_superseded(conn, job, newer)
            if newer is not None:
                raise JobSuperseded(newer)
            rows = self._instances(job.series_uid)
            refusal = check_series(rows, self.config.gate, expected_count=self._expected_count(job.series_uid))
            if refusal is None:
                header = _header(_by_position(rows)[0].path)
                refusal = check_header(header, self.config.gate) or check_size(header, len(rows), self.config.gate)
            if refusal is not None:
                return self._skip(job, pipeline, rows, refusal, log)
            runner = self.warm_up()
            with lease_renewed(self.queue, job, self.worker_id, self.config.queue, self.log):  # load, infer, build
                t_load = time.perf_counter()
                loaded = self._load(job, rows, runner)
                if isinstance(loaded, GateRefusal):
                    return (ended := self._skip(job, pipeline, rows, loaded, log))
                volume, runner = loaded
                t0 = time.perf_counter()
                outcome = pipeline.analyse(volume, runner, self.config.gate)
                inference_seconds = time.perf_counter() - t0
                self.metrics.inference(inference_seconds)
                if isinstance(outcome, GateRefusal):
                    return (ended := self._skip(job, pipeline, rows, outcome, log))
                algorithm = self._algorithm(runner, pipeline)
                objects = pipeline.build(
                    volume.datasets, outcome, algorithm, series_version=job.version,
                    superseded=self._superseded(job), fallback_datetime=self._fallback_datetime(job.series_uid),
                )
                objects += self._withdrawal(job, algorithm)
            t_built = time.perf_counter()
            self._commit(job, objects, inference_seconds=inference_seconds, skipped=None)
            self.metrics.job_ended(job.pipeline.value, "result")
            log.info("job_done", inference_seconds=round(inference_seconds, 3), load_seconds=round(t0 - t_load, 3),
                     build_seconds=round(t_built - t0 - inference_seconds, 3),
                     commit_seconds=round(time.perf_counter() - t_built, 3),
                     probability=None if outcome.probability is None else round(outcome.probability, 4),
                     pneumonia=outcome.pneumonia if outcome.classified else None, slices=volume.shape[0],
                     sr_uid=str(objects[0][1].SOPInstanceUID))
            return JobState.DONE
        except LeaseLost:  # not lost when this attempt's own refusal was committed before a heartbeat saw it ended
            log.warning("job_lease_lost") if ended is None else log.info("job_lease_ended_after_commit")
            return JobState.RUNNING if ended is None else ended
        except JobSuperseded as exc:
            self.metrics.job_ended(job.pipeline.value, SKIP_REASON)
            log.info("job_superseded", newer_version=exc.newer)
            return JobState.SKIPPED
        except Exception as exc:  # noqa: BLE001 - one bad series must fail its job, never the worker thread
            error = f"{type(exc).__name__}: {_safe_message(exc)}"[:1000]
            if (deferred := self._node_failure(job, exc, error)) is not None:
                held = self.queue.defer(job, self.worker_id, deferred)
                log.error("job_deferred", error=deferred, lease_held=held)
                self.metrics.job_ended(job.pipeline.value, "deferred")
                return JobState.QUEUED
            state = self.queue.fail(job, self.worker_id, error)  # RUNNING: the lease was lost, the job is not ours
            log.error("job_failed", error=error, next_state=str(state) if state is not JobState.RUNNING else "lost")
            if state is JobState.DEAD:
                self.metrics.job_ended(job.pipeline.value, "failed")
                self._report_failure(job, pipeline, error, log)
            return state

    def _load(self, job: Job, rows: Sequence[Any], runner: ModelRunner) -> tuple[Any, ModelRunner] | GateRefusal:
        """The volume and its runner (through the prefetcher when on), or the gate's refusal: pixels that do not load,
        or any slice's header out of scope, not only the first one's (a series mixing acquisitions, half contrast)."""
        try:
            loaded = ((load_series([r.path for r in rows]), runner) if self.prefetch is None
                      else self.prefetch.load(job.series_uid, rows, runner))
        except PreprocessError as exc:
            if isinstance(exc.__cause__, OSError):  # a file that does not read: not the series' pixels (process)
                raise
            return unloadable(exc)
        return next(filter(None, (check_header(ds, self.config.gate) for ds in loaded[0].datasets)), None) or loaded

    def _node_failure(self, job: Job, exc: Exception, error: str) -> str | None:
        """The job's error when the failure is the node's own, not the series' — its results disk full or not the
        one started on (a volume not mounted), or a read error while a spool root of the series has no marker (its
        volume not mounted) — so the job is deferred without spending an attempt (it would die of it, and be judged
        on missing files); None otherwise."""
        if isinstance(exc, SpoolFullError | StoreFailedError):
            return error
        if not isinstance(exc, OSError) and not isinstance(exc.__cause__, OSError):
            return None
        try:
            gone = ", ".join(map(str, Spools(self.config).unmounted(self._instances(job.series_uid))))
        except Exception:  # noqa: BLE001 - cannot tell: the failure counts as the series' own
            return None
        return f"spool not mounted: {gone}; {error}"[:1000] if gone else None

    def _instances(self, series_uid: str) -> list[Any]:
        """The series' index rows, each ``path`` resolved to where this host reads the file (node.spools; a row on
        a spool this host cannot reach raises `UnknownSpoolError`, which fails the job with that message)."""
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(instances).where(instances.c.series_uid == series_uid)))
        return Spools(self.config).rows(rows)

    def _own_study(self, job: Job, rows: Sequence[Any]) -> list[Any]:
        """The rows of the study the series was first received under: a report names no other study's instances
        (a SeriesInstanceUID reused across studies, refused by the gate, would otherwise mix two patients)."""
        row = self._series_row(job.series_uid)
        return [r for r in rows if row is None or r.study_uid == row.study_uid] or list(rows)

    def _series_row(self, series_uid: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(series).where(series.c.series_uid == series_uid)).first()

    def _expected_count(self, series_uid: str) -> int | None:
        row = self._series_row(series_uid)
        return int(row.expected_count) if row is not None and row.expected_count else None

    def _fallback_datetime(self, series_uid: str) -> dt.datetime:
        """When the sources carry no usable date: the series' first receive time (stored, so a retry rebuilds
        the same object)."""
        row = self._series_row(series_uid)
        when = row.first_received_at if row is not None else self.clock()
        return dt.datetime.fromtimestamp(when, dt.UTC).replace(tzinfo=None)

    def _previous(self, job: Job) -> list[Any]:
        """The result rows of the newest earlier version of this series (node.versions)."""
        with self.engine.connect() as conn:
            return previous_results(conn, job.series_uid, job.version)

    def _superseded(self, job: Job) -> list[Superseded]:
        """The SR/SEG of the newest earlier version of this series, which the new SR names as superseded."""
        return superseded_entries(self._previous(job))

    def _withdrawal(self, job: Job, algorithm: AlgorithmIdentity) -> list[tuple[str, Dataset]]:
        """The IOCM rejection note withdrawing the previous version's objects (node.versions.withdrawal)."""
        return withdrawal_note(self._previous(job), algorithm, job.series_uid, job.version,
                               lambda: _header(_by_position(self._instances(job.series_uid))[0].path))

    def _skip(self, job: Job, pipeline: Pipeline, rows: Sequence[Any], refusal: GateRefusal, log: Any) -> JobState:
        sources = [_header(r.path) for r in _by_position(self._own_study(job, rows))]
        algorithm = self._algorithm(self.warm_up(), pipeline)
        sr = build_skipped_sr(sources, refusal.reason, refusal.detail, algorithm, series_version=job.version,
                              fallback_datetime=self._fallback_datetime(job.series_uid))
        objects: list[tuple[str, Dataset]] = [("skipped-sr", sr), *self._withdrawal(job, algorithm)]
        self._commit(job, objects, inference_seconds=0.0, skipped=refusal)
        self.metrics.job_ended(job.pipeline.value, "not_processed")
        log.info("job_skipped", reason=refusal.reason.value, detail=refusal.detail, sr_uid=str(sr.SOPInstanceUID))
        return JobState.SKIPPED

    def _report_failure(self, job: Job, pipeline: Pipeline, error: str, log: Any) -> None:
        """A dead job still tells the PACS, with a coded "processing failed" SR; if even that fails, the job is
        counted as unreported (metrics) and stays listed as an alert in `pacsnode status`."""
        self._reported.add(job.id)
        try:
            rows = self._own_study(job, self._instances(job.series_uid))
            sources = [_header(r.path) for r in _by_position(rows)]
            algorithm = self._algorithm(self.warm_up(), pipeline)
            sr = build_skipped_sr(sources, SkipReason.PROCESSING_FAILED, error[:200], algorithm,
                                  series_version=job.version,
                                  fallback_datetime=self._fallback_datetime(job.series_uid))
            objects: list[tuple[str, Dataset]] = [("skipped-sr", sr), *self._withdrawal(job, algorithm)]
            self.recorder.record(job, objects, lambda conn: True, leased=False)
        except JobSuperseded as exc:  # a newer version exists: its own result or report stands
            log.info("failure_report_superseded", newer_version=exc.newer)
        except Exception as exc:  # noqa: BLE001 - the job is already dead-lettered with its error
            self.metrics.job_ended(job.pipeline.value, "unreported")
            log.error("failure_report_failed", error=f"{type(exc).__name__}: {_safe_message(exc)}"[:500])

    # -- committing (node.worker_results) ------------------------------------------------------------------
    def _commit(self, job: Job, objects: Sequence[tuple[str, Dataset]], *, inference_seconds: float,
                skipped: GateRefusal | None) -> None:
        def end_job(conn: sa.Connection) -> bool:
            if skipped is None:
                return self.queue.finish(conn, job, self.worker_id, inference_seconds=inference_seconds)
            return self.queue.skip(conn, job, self.worker_id, skipped.reason.value, skipped.detail)

        self.recorder.record(job, objects, end_job)


def _newest_results(engine: Engine, root: Path, since: float | None, limit: int = 8) -> list[Path]:
    """The newest result files recorded under ``root`` since ``since`` (None: any): retention deletes result files
    ``results_days`` after their series settled and keeps the rows, so only files younger than that must be there.
    With all of them (a node quiet for longer, upgraded from a release before spool markers) the folder was taken
    for an unmounted volume and every result waited for ever. Raises `DatabaseError`."""
    prefix = f"{root}/"
    where = sa.func.substr(results.c.path, 1, len(prefix)) == prefix
    if since is not None:
        where = sa.and_(where, results.c.created_at >= since)
    with reading(engine, "results read failed") as conn:
        return [Path(p) for p in conn.execute(
            sa.select(results.c.path).where(where).order_by(results.c.id.desc()).limit(limit)).scalars()]


def _header(path: str) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def _safe_message(exc: BaseException) -> str:
    """An exception's message for logs and the jobs table: our own errors' messages are PHI-free by contract;
    other libraries' messages may quote header values, so only their type is kept."""
    from node.errors import NodeError

    if isinstance(exc, (ResultsError, ModelError, PreprocessError, NodeError, LeaseLost)):
        return str(exc)
    return "(message withheld: it may quote header values)"


def _by_position(rows: Sequence[Any]) -> list[Any]:
    """Rows in slice order when geometry allows (instance number otherwise), for result references."""
    def key(r: Any) -> tuple[float, int]:
        try:
            z = float(str(r.image_position).split("\\")[2])
        except (IndexError, ValueError):
            z = 0.0
        return (z, r.instance_number or 0)

    return sorted(rows, key=key)

