"""Streaming inference, node side: per-slice model work while a series is still arriving (``[worker] prefetch``).

The `Prefetcher` runs beside the worker, in the worker's process (threads model: the node process; processes
model: the worker role, which sees the listeners' instances through the shared index). Every
``prefetch_poll_seconds`` it reads the index for series still arriving (state receiving or reopened), decides
early whether the series would go to a model pipeline — the same routing (`node.routing.route`) on the header of
the first instance received so far that completion applies later — and for each such series decodes the
newly indexed instances and runs their per-slice model work (`models.streaming.SliceModels.work`: resize, window,
U-Net softmax, the classifier's slice features). Results are held in a `PrefetchCache` keyed by series UID, then
SOP Instance UID with the file's sha256 from the index (a re-sent, changed instance is computed again), at most
``prefetch_max_series`` series (least recently used dropped first) and no new work once it holds
``prefetch_max_mb``.

At job time the worker calls `Prefetcher.load`: it takes the series' cached work, computes only the slices
missing (or whose sha256 changed), builds the `Volume` from the cached decodes (`models.preprocess.load_series`
with a reader) and returns a runner whose `segment`/`classify` only pool (`StreamingRunner`). Work for a series
that leaves the receiving state without a queued or running job (ignored, refused, never completed, its jobs
done) is thrown away at the next turn. The early routing decision is only a guess about where to spend CPU: the
job always runs the pipeline completion chose, and the cache is keyed by content, so a wrong guess costs time,
never a wrong result.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from models.preprocess import PreprocessError, Volume, load_series
from node.config import NodeConfig
from node.logs import get_logger
from node.loops import LoopThread
from node.pipelines.runner import Classification, ModelRunner, Segmentation, classification, clinical_of
from node.routing import read_header, route
from node.schema import instances, jobs, series
from node.spool import dataset_digest
from node.states import JobState, ProcessModel, SeriesState
from node.supervise import Heartbeats, failure

if TYPE_CHECKING:
    from models.lesion_evidence import LesionEvidence

LOOP = "prefetch"  # the prefetch loop's name in the heartbeat registry
_BATCH = 16  # files per turn while a series arrives (one `models.streaming.CHUNK`; bounds a turn's latency)
_RECEIVING = (SeriesState.RECEIVING.value, SeriesState.REOPENED.value)
_PENDING_JOBS = (JobState.QUEUED.value, JobState.RUNNING.value)


def prefetch_enabled(config: NodeConfig) -> bool:
    """``[worker] prefetch``, or when unset: on when the worker runs in its own process (process model
    "processes"), off in the threads model, where per-slice work would share the receive's GIL."""
    if config.worker.prefetch is not None:
        return config.worker.prefetch
    return config.node.process_model is ProcessModel.PROCESSES


class PrefetchCache:
    """Per-slice work by series UID → SOP Instance UID → (sha256, `models.streaming.FileWork` or None when the
    file could not be decoded), at most ``max_series`` series, least recently used dropped first. Thread-safe."""

    def __init__(self, max_series: int) -> None:
        self.max_series = max_series
        self._series: OrderedDict[str, dict[str, tuple[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, series_uid: str) -> dict[str, str]:
        """SOP UID → sha256 of what is cached for the series."""
        with self._lock:
            return {sop: sha for sop, (sha, _) in self._series.get(series_uid, {}).items()}

    def put(self, series_uid: str, sop_uid: str, sha256: str, work: Any) -> None:
        with self._lock:
            entry = self._series.setdefault(series_uid, {})
            entry[sop_uid] = (sha256, work)
            self._series.move_to_end(series_uid)
            while len(self._series) > self.max_series:
                self._series.popitem(last=False)

    def take(self, series_uid: str) -> dict[str, tuple[str, Any]]:
        with self._lock:
            return self._series.pop(series_uid, {})

    def drop(self, series_uid: str) -> bool:
        with self._lock:
            return self._series.pop(series_uid, None) is not None

    def series(self) -> list[str]:
        with self._lock:
            return list(self._series)

    def nbytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for e in self._series.values() for _, w in e.values() if w is not None)


class StreamingRunner(ModelRunner):
    """A runner over one volume's per-slice work: `segment` and `classify` only pool (`SliceModels`)."""

    def __init__(self, base: ModelRunner, models: Any, work: Sequence[Any]) -> None:
        self.algorithm, self.segmenter_version, self.device = base.algorithm, base.segmenter_version, base.device
        self.min_matrix = base.min_matrix  # the validated matrix of the models it pools for (the pipeline checks it)
        self.models, self.work = models, work

    def segment(self, volume: Volume) -> Segmentation:
        seg = self.models.segment(volume, self.work)
        return Segmentation(lungs=seg.lungs, lesion=seg.lesion, evidence=seg.evidence)

    def classify(self, volume: Volume, lesion: LesionEvidence | None = None) -> Classification:
        cls = self.models.classify(volume, self.work, clinical=clinical_of(volume), lesion=lesion)
        return classification(cls, self.models.classifier.card)


class Prefetcher:
    """See the module docstring. `start(runner)` begins once the worker's models are loaded (no-op for a runner
    without the shipped models, e.g. a test fake); `load` serves the worker."""

    def __init__(self, config: NodeConfig, engine: Engine, heartbeats: Heartbeats,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.engine, self.clock = config, engine, clock
        self.cache = PrefetchCache(config.worker.prefetch_max_series)
        self.models: Any = None
        self.log = get_logger(component="prefetch")
        self._loop = LoopThread(heartbeats, LOOP, "prefetch", self._run)
        self._routes: dict[str, bool] = {}  # series UID → does the early routing send it to a model pipeline?
        self._computing = threading.Lock()  # held while one batch is computed: `load` waits for it, not redoes it

    def start(self, runner: ModelRunner) -> None:
        if self.models is None:
            classifier, segmenter = getattr(runner, "classifier", None), getattr(runner, "segmenter", None)
            if classifier is None or segmenter is None:
                return
            from models.streaming import SliceModels

            self.models = SliceModels(classifier, segmenter, getattr(runner, "candidates", None))
            self.models.warm()
        if not self._loop.alive():
            self._loop.start(self.config.worker.prefetch_poll_seconds * 4 + 60, self._loop.respawn)

    def stop(self, timeout: float = 30.0) -> None:
        self._loop.stop(timeout)

    def apply_config(self, config: NodeConfig) -> None:
        self.config = config
        self.cache.max_series = config.worker.prefetch_max_series

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._loop.stopping.is_set():
            self._loop.beat(busy_for=60.0)
            try:
                busy = self.turn()
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure (the job recomputes)
                self.log.error("prefetch_turn_failed", error=failure(exc))
                busy = False
            if not busy and self._loop.sleep(self.config.worker.prefetch_poll_seconds):
                return

    def turn(self) -> bool:
        """One pass: drop work nobody will use, then compute up to one batch per receiving series; True when it
        computed anything (the loop then goes on at once)."""
        with self.engine.connect() as conn:
            receiving = list(conn.execute(
                sa.select(series.c.series_uid, series.c.calling_ae, series.c.instance_count, series.c.expected_count)
                .where(series.c.state.in_(_RECEIVING)).order_by(series.c.last_received_at.desc())
                .limit(self.cache.max_series)))
            waiting = set(conn.execute(sa.select(jobs.c.series_uid).where(jobs.c.state.in_(_PENDING_JOBS))).scalars())
        arriving = {r.series_uid for r in receiving}
        for uid in self.cache.series():
            if uid not in arriving and uid not in waiting and self.cache.drop(uid):
                self.log.info("prefetch_discarded", series_uid=uid)
        self._routes = {k: v for k, v in self._routes.items() if k in arriving}
        busy = False
        for row in receiving:
            if self._loop.stopping.is_set():
                break
            busy |= self._advance(row)
        return busy

    def _advance(self, row: Any) -> bool:
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(instances.c.sop_uid, instances.c.sha256, instances.c.path,
                                               instances.c.instance_number)
                                     .where(instances.c.series_uid == row.series_uid)))
        if not rows or not self._routed(row, rows):
            return False
        known = self.cache.known(row.series_uid)
        todo = [r for r in rows if known.get(r.sop_uid) != r.sha256][:_BATCH]
        if not todo or self.cache.nbytes() >= self.config.worker.prefetch_max_mb * 1_000_000:
            return False  # nothing new, or the memory cap reached: the job computes the rest itself
        self._compute(row.series_uid, todo)
        return True

    def _routed(self, row: Any, rows: Sequence[Any]) -> bool:
        """The early routing guess, made once per series from its first instance received so far."""
        if row.series_uid not in self._routes:
            first = min(rows, key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_uid))
            slices = max(int(row.instance_count or 0), int(row.expected_count or 0))
            header = read_header(first.path, calling_ae=row.calling_ae, slices=slices)
            from node.completion import NODE_MANUFACTURER

            self._routes[row.series_uid] = route(header, self.config.routes, NODE_MANUFACTURER).pipeline is not None
        return self._routes[row.series_uid]

    def _compute(self, series_uid: str, rows: Sequence[Any]) -> None:
        from models.preprocess import read_file

        decoded, kept = [], []
        for r in rows:
            try:
                data = Path(r.path).read_bytes()
            except OSError:
                data = b""
            if dataset_digest(data) != r.sha256:
                # Not (yet) the file the row describes — a re-send's row commits before its file is moved over
                # the old one (node.ingest), so the old pixels would be cached under the new hash — or a file
                # gone: left to the job, which reads the file as it is then (not tried again every turn).
                self.cache.put(series_uid, r.sop_uid, r.sha256, None)
                continue
            try:
                decoded.append(read_file(0, r.path, data))
                kept.append(r)
            except PreprocessError:
                self.cache.put(series_uid, r.sop_uid, r.sha256, None)  # the job reads it again and refuses it
        if decoded:
            with self._computing:
                results = self.models.work(decoded)
                for r, fw in zip(kept, results, strict=True):
                    self.cache.put(series_uid, r.sop_uid, r.sha256, fw)

    # -- job time --------------------------------------------------------------------------------------------
    def load(self, series_uid: str, rows: Sequence[Any], runner: ModelRunner) -> tuple[Volume, ModelRunner]:
        """The volume of ``rows`` (index rows of the series) and a runner for it: cached per-slice work where the
        sha256 matches, the rest computed now. Without models (prefetch not started) the plain path."""
        paths = [r.path for r in rows]
        if self.models is None:
            return load_series(paths), runner
        t0 = time.perf_counter()
        with self._computing:  # a batch under way when the series completed: wait for it (≤ one batch), use it
            cached = self.cache.take(series_uid)
        work: dict[str, Any] = {}
        missing = []
        for i, r in enumerate(rows):
            sha, fw = cached.get(r.sop_uid, ("", None))
            if fw is not None and sha == r.sha256:
                work[str(r.path)] = fw
            else:
                missing.append((i, r))
        if missing:
            from models.preprocess import read_file

            decoded = [read_file(i, r.path) for i, r in missing]  # errors name the file as load_series would
            for (_, r), fw in zip(missing, self.models.work(decoded), strict=True):
                work[str(r.path)] = fw
        from models.streaming import reindexed

        volume = load_series(paths, reader=lambda i, p: reindexed(work[str(p)], i))
        self.models.attach(volume, list(work.values()))
        self.log.info("prefetch_used", series_uid=series_uid, slices_cached=len(rows) - len(missing),
                      slices_computed=len(missing), seconds=round(time.perf_counter() - t0, 3))
        return volume, StreamingRunner(runner, self.models, list(work.values()))
