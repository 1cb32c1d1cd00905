"""Supervised loops: the heartbeat registry and the supervisor's restart policy (fake clock); each long-running loop
outliving the failures that used to end it — a database error inside `Dispatcher.enqueue` during the worker's
commit, a two-valued PixelPaddingValue, Rows = 1 with Columns = 65535, a MemoryError, a full disk while writing
results, `queue.claim` raising, the completion sweep and the dispatch loops raising — with a later good series
still getting its SR and SEG; dead loops restarted (worker, HTTP, DIMSE) or the node exiting 70; `/readyz` turning
503 for a stuck or dead loop."""

from __future__ import annotations

import errno
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.tag import Tag
from starlette.applications import Starlette

from node.completion import CompletionSweeper
from node.config import DestinationKind, NodeConfig, Priority, SuperviseSection
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.errors import DatabaseError
from node.http import HealthProbe, HttpServer
from node.index import Index
from node.ingest import Ingestor, Origin
from node.metrics import Metrics
from node.queue import JobQueue, jobs
from node.results import SkipReason
from node.spool import Spool
from node.states import JobState
from node.supervise import EXIT_LOOP_FAILED, Heartbeats, Supervisor, failure
from node.worker import Worker
from tests.conftest import free_port, wait_until
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.unit.test_worker import FixedRunner, RecordingSender


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "the condition") -> object:
    """`wait_until` with this module's defaults (threads in this process: poll often)."""
    return wait_until(predicate, timeout, what, interval=0.02)


# -- the registry and the policy ------------------------------------------------------------------------------


def test_a_reload_reaches_the_supervisor_and_the_stuck_threshold_through_apply_config():
    clock = Clock()
    beats = Heartbeats(stuck_after_periods=5, clock=clock)
    supervisor = Supervisor(beats, SuperviseSection(), on_fatal=lambda reason: None)
    beats.register("w", 2.0, alive=lambda: True)
    new = NodeConfig(supervise=SuperviseSection(stuck_after_periods=20, max_restarts=1))
    supervisor.apply_config(new)
    assert supervisor.settings.max_restarts == 1
    clock.now += 30  # stuck after 10 s before the reload, after 40 s now
    assert beats.snapshot()["w"].ok and beats.snapshot()["w"].limit_seconds == 40.0

def test_a_loop_is_stuck_after_n_periods_without_a_beat_unless_busy_and_dead_when_its_thread_ended():
    clock = Clock()
    beats = Heartbeats(stuck_after_periods=5, clock=clock)
    alive = [True]
    beats.register("w", 2.0, alive=lambda: alive[0])
    clock.now += 9.9
    assert beats.snapshot()["w"].ok and beats.problems() == []
    clock.now += 0.2
    status = beats.snapshot()["w"]
    assert status.stuck and not status.ok and status.limit_seconds == 10.0
    assert beats.problems() == ["w: stuck (no heartbeat for 10.1 s, limit 10.0 s)"]
    beats.beat("w", busy_for=60)  # one long item: its next beat may take a minute
    clock.now += 59
    assert beats.snapshot()["w"].ok
    beats.beat("w")
    clock.now += 11
    assert beats.snapshot()["w"].stuck
    alive[0] = False
    status = beats.snapshot()["w"]
    assert not status.alive and not status.stuck and status.problem().startswith("w: dead")
    beats.unregister("w")
    assert beats.snapshot() == {} and beats.problems() == []


def test_a_raising_liveness_check_reads_as_dead_and_bad_registrations_fail_fast():
    beats = Heartbeats()
    beats.register("x", 1.0, alive=lambda: 1 / 0)
    assert not beats.snapshot()["x"].alive
    with pytest.raises(ValueError, match="period"):
        beats.register("y", 0, alive=lambda: True)
    with pytest.raises(TypeError, match="alive"):
        beats.register("y", 1.0, alive=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stuck_after_periods"):
        Heartbeats(stuck_after_periods=0)


def test_the_supervisor_restarts_a_dead_loop_with_back_off_then_gives_up_within_its_window():
    clock = Clock()
    beats = Heartbeats(clock=clock)
    alive = [False]
    restarts: list[float] = []
    fatal: list[str] = []

    def restart() -> None:
        restarts.append(clock.now)

    beats.register("w", 1.0, alive=lambda: alive[0], restart=restart)
    settings = SuperviseSection(max_restarts=2, restart_window_seconds=100, restart_backoff_seconds=1)
    sup = Supervisor(beats, settings, on_fatal=fatal.append, clock=clock)
    sup.check()
    assert restarts == []  # the first restart waits its back-off (1 s)
    clock.now += 1
    sup.check()
    assert restarts == [1001.0] and beats.snapshot()["w"].restarts == 1
    clock.now += 1
    sup.check()
    clock.now += 1.9
    sup.check()
    assert len(restarts) == 1  # the second waits twice as long
    clock.now += 0.1
    sup.check()
    assert len(restarts) == 2 and fatal == []
    clock.now += 10
    sup.check()  # a third death within 100 s: the process must go
    assert len(restarts) == 2 and len(fatal) == 1 and "died 3 times" in fatal[0]
    assert sup.fatal == fatal[0]
    sup.check()
    assert len(fatal) == 1  # said once


def test_restarts_age_out_of_the_window_and_a_loop_without_restart_is_fatal_at_once():
    clock = Clock()
    beats = Heartbeats(clock=clock)
    restarted: list[float] = []
    beats.register("w", 1.0, alive=lambda: False, restart=lambda: restarted.append(clock.now))
    fatal: list[str] = []
    sup = Supervisor(beats, SuperviseSection(max_restarts=1, restart_window_seconds=10, restart_backoff_seconds=1),
                     on_fatal=fatal.append, clock=clock)
    for _ in range(5):  # one death per 11 s never exceeds one restart per 10 s
        clock.now += 11
        sup.check()
        clock.now += 1
        sup.check()
    assert len(restarted) == 5 and fatal == []
    beats.unregister("w")
    beats.register("gone", 1.0, alive=lambda: False)
    sup.check()
    assert fatal and "'gone' ended and cannot be restarted" in fatal[0]


def test_a_failing_restart_counts_as_a_death_and_the_supervisor_itself_never_raises():
    clock = Clock()
    beats = Heartbeats(clock=clock)

    def restart() -> None:
        raise RuntimeError("cannot")

    beats.register("w", 1.0, alive=lambda: False, restart=restart)
    fatal: list[str] = []
    sup = Supervisor(beats, SuperviseSection(max_restarts=2, restart_backoff_seconds=1), on_fatal=fatal.append,
                     clock=clock)
    for _ in range(10):
        clock.now += 5
        sup.check()
    assert fatal and "died 3 times" in fatal[0]
    broken = Supervisor(beats, SuperviseSection(), on_fatal=fatal.append, clock=lambda: 1 / 0)
    broken.check()  # logged, not raised


def test_failure_names_type_and_place_but_quotes_only_the_nodes_own_messages():
    try:
        int("DOE^JOHN")
    except ValueError as exc:
        text = failure(exc)
    assert text.startswith("ValueError at test_supervise.py:") and "DOE" not in text
    assert failure(DatabaseError("deliveries: insert failed")).endswith(": deliveries: insert failed")


# -- the worker loop ------------------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path):
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "queue": {"max_attempts": 2, "retry_delay_seconds": 0},
        "gate": {"min_slices": 8, "scope_check": False},
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    ingestor = Ingestor(Spool(config.node.spool_dir), Index(engine))
    queue = JobQueue(engine, config.queue)
    sender = RecordingSender()
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: sender})
    yield config, engine, ingestor, queue, dispatcher, sender
    engine.dispose()


def receive(ingestor, folder: Path, seed: int, edit: Callable[[pydicom.Dataset], None] | None = None):
    series = write_ct_series(folder, slices=10, size=32, seed=seed)
    for path in series.paths:
        if edit is not None:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path, enforce_file_format=True)
        ingestor.accept(dataset_bytes(path), "1.2.840.10008.1.2.1", Origin("CT1", "a1"))
    return series


def queue_job(queue, series_uid: str) -> int:
    with queue.engine.begin() as conn:
        return queue.enqueue(conn, series_uid, 1, Priority.ROUTINE)


def ended(queue, job_id: int) -> sa.Row | None:
    row = queue.get(job_id)
    return row if row.state in (JobState.DONE, JobState.SKIPPED, JobState.DEAD) else None


def delivered(dispatcher, series_uid: str) -> list[pydicom.Dataset]:
    """Send what is due; the objects the one delivery of ``series_uid`` carried."""
    wait_for(lambda: dispatcher.for_series(series_uid), what="the delivery to be queued")  # a report follows DEAD
    dispatcher.run_once()
    (row,) = dispatcher.for_series(series_uid)
    assert row.state == "delivered"
    return [pydicom.dcmread(f) for f in json.loads(row.files)]


def delivered_modalities(dispatcher, series_uid: str) -> list[str]:
    return sorted(ds.Modality for ds in delivered(dispatcher, series_uid))


def failed_report(dispatcher, series_uid: str) -> bool:
    """Whether the series' delivery is exactly one coded "processing failed" SR."""
    (sr,) = delivered(dispatcher, series_uid)
    return sr.Modality == "SR" and "SKIP-FAILED" in str(sr.ContentSequence)


def run_worker(config, engine, queue, dispatcher, runner, *, heartbeats=None, metrics=None) -> Worker:
    worker = Worker(config, engine, queue, dispatcher, lambda: runner, poll_seconds=0.05,
                    heartbeats=heartbeats or Heartbeats(), metrics=metrics)
    worker.start()
    return worker


def two_valued_padding(ds: pydicom.Dataset) -> None:
    ds.add_new(Tag(0x0028, 0x0120), "US", [0, 1])  # PixelPaddingValue, VM 1 by the standard


def one_row_65535_columns(ds: pydicom.Dataset) -> None:
    ds.Rows, ds.Columns = 1, 65535
    ds.PixelData = bytes(2 * 65535)


class MemoryHungryRunner(FixedRunner):
    """Runs out of memory on the series in ``poison``; fine on any other."""

    def __init__(self, poison: set[tuple[int, int, int]]) -> None:
        super().__init__(0.9)
        self.poison = poison

    def segment(self, volume):
        if volume.shape in self.poison:
            self.calls += 1
            raise MemoryError()
        return super().segment(volume)


@pytest.mark.parametrize("poison", ["two_valued_padding", "one_row_65535_columns", "memory_error"])
def test_the_worker_loop_outlives_a_poison_series_and_the_next_one_gets_its_result(node, tmp_path, poison):
    config, engine, ingestor, queue, dispatcher, sender = node
    edit = {"two_valued_padding": two_valued_padding, "one_row_65535_columns": one_row_65535_columns}.get(poison)
    bad = receive(ingestor, tmp_path / "bad", 1, edit)
    runner = MemoryHungryRunner({(10, 32, 32)} if poison == "memory_error" else set())
    beats = Heartbeats()
    worker = run_worker(config, engine, queue, dispatcher, runner, heartbeats=beats)
    try:
        bad_job = queue_job(queue, bad.series_uid)
        row = wait_for(lambda: ended(queue, bad_job), what="the poison job to end")
        if poison == "one_row_65535_columns":  # the gate refuses it before any pixel is read
            assert row.state == JobState.SKIPPED and row.skip_reason == SkipReason.NOT_ORIGINAL_AXIAL.value
        else:  # the attempt crashed: counted, retried once, then dead-lettered with a "processing failed" SR
            assert row.state == JobState.DEAD and row.attempts == 2
            assert row.last_error.startswith("TypeError" if poison == "two_valued_padding" else "MemoryError")
        (sr,) = delivered(dispatcher, bad.series_uid)
        code = "SKIP-FAILED" if row.state == JobState.DEAD else "SKIP-IMAGE-TYPE"
        assert sr.Modality == "SR" and code in str(sr.ContentSequence)
        assert beats.snapshot()["worker"].ok
        runner.poison = set()
        good = receive(ingestor, tmp_path / "good", 2)
        good_job = queue_job(queue, good.series_uid)
        assert wait_for(lambda: ended(queue, good_job), what="the good job").state == JobState.DONE
        assert delivered_modalities(dispatcher, good.series_uid) == ["KO", "SEG", "SR"]  # KO: the key images
    finally:
        worker.stop(10)
    assert "worker" not in beats.snapshot()  # stopped on purpose: no longer supervised


def test_a_database_error_inside_enqueue_during_the_commit_fails_only_that_attempt(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    with engine.begin() as conn:  # a real database error inside Dispatcher.enqueue, in the worker's transaction
        conn.execute(sa.text("CREATE TRIGGER no_deliveries BEFORE INSERT ON deliveries "
                             "BEGIN SELECT RAISE(ABORT, 'injected'); END"))
    real_enqueue = dispatcher.enqueue
    errors: list[BaseException] = []

    def enqueue(*args, **kwargs):
        try:
            return real_enqueue(*args, **kwargs)
        except Exception as exc:
            errors.append(exc)
            raise

    dispatcher.enqueue = enqueue  # type: ignore[method-assign]
    queue.settings = queue.settings.model_copy(update={"retry_delay_seconds": 0.5})
    series = receive(ingestor, tmp_path / "s", 3)
    worker = run_worker(config, engine, queue, dispatcher, FixedRunner(0.9))
    try:
        job_id = queue_job(queue, series.series_uid)
        wait_for(lambda: errors, what="the failed commit")
        with engine.begin() as conn:  # the database recovers before the retry
            conn.execute(sa.text("DROP TRIGGER no_deliveries"))
        row = wait_for(lambda: ended(queue, job_id), what="the job to end")
        assert isinstance(errors[0], DatabaseError) and isinstance(errors[0].__cause__, sa.exc.IntegrityError)
        assert row.state == JobState.DONE and row.attempts == 2  # the failed attempt counted, the retry made it
        assert delivered_modalities(dispatcher, series.series_uid) == ["KO", "SEG", "SR"]
        later = receive(ingestor, tmp_path / "later", 4)
        later_job = queue_job(queue, later.series_uid)
        assert wait_for(lambda: ended(queue, later_job), what="the later job").state == JobState.DONE
    finally:
        worker.stop(10)


def test_a_dead_job_whose_report_hits_a_full_disk_is_reported_by_a_restarted_worker_once_space_is_back(node,
                                                                                                    tmp_path):
    """A job that fails for its own reason while the disk is full: its "processing failed" SR cannot be written
    either (unreported). The worker does not hammer the full disk with it, and a restarted worker reports it once
    there is room. (A full disk alone no longer kills a job: it waits, test_worker.)"""
    config, engine, ingestor, queue, dispatcher, sender = node
    metrics = Metrics()
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9, fail=True), poll_seconds=0.05,
                    metrics=metrics)
    real_write = worker.results_store.write

    def full_disk_write(study, series, sop, chunks):
        def no_space():
            raise OSError(errno.ENOSPC, "No space left on device")
            yield b""  # pragma: no cover - makes this a generator the spool iterates inside its try
        return real_write(study, series, sop, no_space())

    worker.results_store.write = full_disk_write  # type: ignore[method-assign]
    series = receive(ingestor, tmp_path / "s", 5)
    worker.start()
    try:
        job_id = queue_job(queue, series.series_uid)
        row = wait_for(lambda: ended(queue, job_id), what="the job to end")
        assert row.state == JobState.DEAD and "model exploded" in row.last_error
        wait_for(lambda: 'outcome="unreported"' in metrics.render()[0].decode(), what="the failed report")
        assert [r.id for r in queue.unreported()] == [job_id]  # not even the failure report could be written
        time.sleep(0.5)
        assert queue.unreported() != []  # this process tried its report once; it does not hammer a full disk
    finally:
        worker.stop(10)
    restarted = run_worker(config, engine, queue, dispatcher, FixedRunner(0.9))  # e.g. the node restarted
    try:
        wait_for(lambda: queue.unreported() == [], what="the dead job's report")
    finally:
        restarted.stop(10)
    assert failed_report(dispatcher, series.series_uid)


def test_a_job_whose_worker_died_mid_attempt_is_dead_lettered_and_reported_by_the_next_worker(node, tmp_path):
    """A worker killed mid-job (the OOM killer, kill -9) cannot record anything: the lease expires, the queue
    counts the attempt and dead-letters the job at max_attempts; an idle worker then sends its failure SR."""
    config, engine, ingestor, queue, dispatcher, sender = node
    series = receive(ingestor, tmp_path / "s", 7)
    job_id = queue_job(queue, series.series_uid)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(
            state=JobState.RUNNING, holder="worker-killed", attempts=config.queue.max_attempts,
            lease_until=time.time() - 1))
    runner = FixedRunner(0.9)
    worker = run_worker(config, engine, queue, dispatcher, runner)
    try:
        wait_for(lambda: queue.get(job_id).state == JobState.DEAD and not queue.unreported(), what="the report")
    finally:
        worker.stop(10)
    assert runner.calls == 0  # the poison job is never run again
    assert "lease expired 2 times" in queue.get(job_id).last_error
    assert failed_report(dispatcher, series.series_uid)


def test_claim_raising_in_the_loop_is_logged_and_the_loop_goes_on(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    real_claim = queue.claim
    calls = [0]

    def claim(worker_id):
        calls[0] += 1
        if calls[0] <= 2:
            raise RuntimeError("claim exploded")
        return real_claim(worker_id)

    queue.claim = claim  # type: ignore[method-assign]
    series = receive(ingestor, tmp_path / "s", 8)
    job_id = queue_job(queue, series.series_uid)
    worker = run_worker(config, engine, queue, dispatcher, FixedRunner(0.9))
    try:
        assert wait_for(lambda: ended(queue, job_id), what="the job").state == JobState.DONE
        assert worker._alive() and calls[0] > 2
    finally:
        worker.stop(10)


def test_a_worker_whose_models_fail_to_load_is_restarted_by_the_supervisor(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    loads = [0]

    def factory():
        loads[0] += 1
        if loads[0] == 1:
            raise RuntimeError("GPU busy")
        return FixedRunner(0.9)

    beats = Heartbeats()
    fatal: list[str] = []
    supervisor = Supervisor(beats, SuperviseSection(restart_backoff_seconds=0.05), on_fatal=fatal.append)
    worker = Worker(config, engine, queue, dispatcher, factory, poll_seconds=0.05, heartbeats=beats)
    worker.start()
    try:
        wait_for(lambda: not worker._alive(), what="the first load to fail")
        assert beats.problems()[0].startswith("worker: dead (its thread ended")
        series = receive(ingestor, tmp_path / "s", 9)
        job_id = queue_job(queue, series.series_uid)

        def restarted():
            supervisor.check()
            return ended(queue, job_id)

        assert wait_for(restarted, what="the restarted worker to run the job").state == JobState.DONE
        assert loads[0] == 2 and beats.snapshot()["worker"].restarts == 1 and fatal == []
    finally:
        worker.stop(10)


# -- dispatch and completion ----------------------------------------------------------------------------------


def test_dispatch_loops_outlive_errors_and_deliver_afterwards(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    beats = Heartbeats()
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: sender}, heartbeats=beats)
    real_claim, real_sweep = dispatcher._claim, dispatcher._sweep
    failures = {"claim": 0, "sweep": 0}

    def claim(name):
        if failures["claim"] < 1:
            failures["claim"] += 1
            raise KeyError("a bug between rows")
        return real_claim(name)

    def sweep():
        failures["sweep"] += 1
        if failures["sweep"] == 1:
            raise ValueError("sweep exploded")
        return real_sweep()

    dispatcher._claim, dispatcher._sweep = claim, sweep  # type: ignore[method-assign]
    files = [write_ct_series(tmp_path / "r", slices=1, size=16).paths[0]]
    dispatcher.start()
    try:
        assert set(beats.snapshot()) == {"dispatch:pacs", "dispatch-sweep"}
        dispatcher.enqueue("1.2.3", 1, files, ["1.2.3.4"])
        wait_for(lambda: sender.sent, what="the delivery")
        wait_for(lambda: failures["sweep"] > 1, what="a sweep after the failing one")
        assert all(s.ok for s in beats.snapshot().values())
    finally:
        dispatcher.stop(10)
    assert beats.snapshot() == {}


def test_a_dead_dispatch_thread_is_revived_by_its_restart(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    beats = Heartbeats()
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: sender}, heartbeats=beats)
    dispatcher.start()
    try:
        worker = dispatcher._threads._workers["pacs"]
        worker.stop.set()  # the thread ends although nobody stopped the dispatcher
        worker.wake.set()
        wait_for(lambda: not beats.snapshot()["dispatch:pacs"].alive, what="the thread to end")
        worker.stop.clear()
        sup = Supervisor(beats, SuperviseSection(restart_backoff_seconds=0.01), on_fatal=pytest.fail)
        wait_for(lambda: sup.check() or beats.snapshot()["dispatch:pacs"].alive, what="the restart")
        files = [write_ct_series(tmp_path / "r", slices=1, size=16).paths[0]]
        dispatcher.enqueue("1.2.3", 1, files, ["1.2.3.4"])
        wait_for(lambda: sender.sent, what="a delivery by the revived thread")
    finally:
        dispatcher.stop(10)


def test_the_completion_sweep_outlives_a_non_database_error_and_a_poison_series(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'c.db'}")
    init_schema(engine)
    config = NodeConfig.model_validate({"completion": {"stable_seconds": 0.01, "sweep_seconds": 0.05}})
    ingestor = Ingestor(Spool(tmp_path / "spool"), Index(engine))
    poison = receive(ingestor, tmp_path / "poison", 10)
    good = receive(ingestor, tmp_path / "good", 11)
    beats = Heartbeats()
    sweeper = CompletionSweeper(config, engine, JobQueue(engine, config.queue), heartbeats=beats)
    real_route, real_sweep = sweeper._route, sweeper.sweep

    def route(row, rows):
        if row.series_uid == poison.series_uid:
            raise TypeError("a header routing cannot read")
        return real_route(row, rows)

    blow_ups = [0]

    def sweep():
        if blow_ups[0] < 2:
            blow_ups[0] += 1
            raise RuntimeError("not a database error")
        return real_sweep()

    sweeper._route, sweeper.sweep = route, sweep  # type: ignore[method-assign]
    sweeper.start()
    try:
        def completed():
            with engine.connect() as conn:
                return conn.execute(sa.select(jobs.c.series_uid)).scalars().all()

        assert wait_for(completed, what="the good series' job") == [good.series_uid]
        wait_for(lambda: sweeper._failures.get(poison.series_uid, 0) >= 2, what="the poison series judged again")
        assert blow_ups[0] == 2 and beats.snapshot()["completion"].ok
    finally:
        sweeper.stop()
        engine.dispose()
    assert "completion" not in beats.snapshot()


# -- readiness and the service --------------------------------------------------------------------------------


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_readyz_reports_each_loop_and_turns_503_when_one_is_stuck_or_dead(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'r.db'}")
    clock = Clock()
    beats = Heartbeats(stuck_after_periods=3, clock=clock)
    alive = [True]
    beats.register("worker", 1.0, alive=lambda: alive[0])
    probe = HealthProbe(engine, tmp_path, lambda: True, beats)
    config = NodeConfig.model_validate({"node": {"host": "127.0.0.1", "http_port": free_port()}})
    server = HttpServer(config, Starlette(), health=probe, heartbeats=beats)
    server.start()
    url = f"http://127.0.0.1:{server.port}/readyz"
    try:
        status, body = get(url)
        assert status == 200 and body["ready"] and body["checks"]["loops"] == "ok"
        assert set(body["loops"]) == {"worker", "http"}
        assert body["loops"]["worker"] == {"alive": True, "stuck": False, "age_seconds": 0.0, "period_seconds": 1.0,
                                           "limit_seconds": 3.0, "restarts": 0}
        clock.now += 2.5
        status, body = get(url)
        assert status == 200 and body["loops"]["worker"]["age_seconds"] == 2.5
        clock.now += 1  # the worker has not beaten for 3.5 s: stuck
        status, body = get(url)
        assert status == 503 and not body["ready"] and body["loops"]["worker"]["stuck"]
        assert body["checks"]["loops"].startswith("worker: stuck (no heartbeat for 3.5 s")
        beats.beat("worker")
        beats.beat("http")
        assert get(url)[0] == 200
        alive[0] = False
        status, body = get(url)
        assert status == 503 and body["checks"]["loops"].startswith("worker: dead")
        assert probe.check()["loops"].startswith("worker: dead")  # what the app's own /readyz sees too
    finally:
        server.stop()
        engine.dispose()


def test_a_dead_http_server_is_restarted_on_its_port(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'r.db'}")
    beats = Heartbeats()
    config = NodeConfig.model_validate({"node": {"host": "127.0.0.1", "http_port": free_port()}})
    server = HttpServer(config, Starlette(), health=HealthProbe(engine, tmp_path, lambda: True, beats),
                        heartbeats=beats)
    server.start()
    port = server.port
    try:
        server._server.should_exit = True  # uvicorn's loop ends without anyone stopping the node
        wait_for(lambda: not beats.snapshot()["http"].alive, what="the server thread to end")
        sup = Supervisor(beats, SuperviseSection(restart_backoff_seconds=0.01), on_fatal=pytest.fail)
        wait_for(lambda: sup.check() or beats.snapshot()["http"].alive, what="the restart")
        assert server.port == port and get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        server.stop()
        engine.dispose()


def service_config(tmp_path) -> NodeConfig:
    return NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "port": free_port(),
                 "http_port": free_port()},
        "worker": {"enabled": False},
        "supervise": {"restart_backoff_seconds": 0.01},
    })


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
def test_the_service_restarts_a_dimse_acceptor_that_died(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.service import DIMSE_LOOP, Service

    service = Service(service_config(tmp_path))
    service.start()
    try:
        real_beat = service.heartbeats.beat
        crashed = threading.Event()

        def beat(name, **kw):  # raises inside serve_forever once: the acceptor thread ends
            if name == DIMSE_LOOP and not crashed.is_set():
                crashed.set()
                raise OSError(errno.EBADF, "select failed")
            real_beat(name, **kw)

        service.heartbeats.beat = beat  # type: ignore[method-assign]
        wait_for(lambda: crashed.is_set() and not service.heartbeats.snapshot()[DIMSE_LOOP].alive,
                 what="the acceptor to die")
        wait_for(lambda: service.supervisor.check() or service.heartbeats.snapshot()[DIMSE_LOOP].alive,
                 what="the restart")
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", service.config.node.port, ae_title=service.config.node.ae_title)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert service.heartbeats.snapshot()[DIMSE_LOOP].restarts == 1
    finally:
        service.stop(10)


def test_a_loop_that_keeps_dying_makes_run_forever_return_70(tmp_path):
    from node.service import Service

    service = Service(service_config(tmp_path))
    started = threading.Event()

    def doom() -> None:
        service.heartbeats.register("doomed", 1.0, alive=lambda: False)  # no restart possible
        started.set()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert service.run_forever(on_started=doom) == EXIT_LOOP_FAILED
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert started.is_set() and not service.pid_file.exists()


def test_the_lease_heartbeat_outlives_a_failing_database_call(node, tmp_path):
    config, engine, ingestor, queue, dispatcher, sender = node
    config = config.model_copy(update={"queue": config.queue.model_copy(update={"heartbeat_seconds": 0.02})})
    series = receive(ingestor, tmp_path / "s", 12)
    job_id = queue_job(queue, series.series_uid)
    real_heartbeat = queue.heartbeat
    beats: list[bool] = []

    def heartbeat(job, worker_id):
        if not beats:
            beats.append(False)
            raise sa.exc.OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        beats.append(real_heartbeat(job, worker_id))
        return beats[-1]

    queue.heartbeat = heartbeat  # type: ignore[method-assign]
    runner = FixedRunner(0.9)
    real_segment = runner.segment

    def slow_segment(volume):
        wait_for(lambda: len(beats) >= 3, what="heartbeats after the failed one")
        return real_segment(volume)

    runner.segment = slow_segment
    Worker(config, engine, queue, dispatcher, lambda: runner).run_pending()
    assert queue.get(job_id).state == JobState.DONE and beats[1:3] == [True, True]
