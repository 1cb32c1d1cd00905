"""Completion: the rule (expected count, contiguous stack + released association, quiet timer) and the sweep
that marks series complete, bumps the version and queues prioritised jobs — on a real index database."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from node.completion import CompletionReason, CompletionSweeper
from node.config import NodeConfig, PipelineName, PriorityRule, Route
from node.db import create_engine_for, init_schema
from node.index import Index, InstanceRecord
from node.queue import JobQueue, jobs
from node.states import AssociationState, SeriesState
from tests.ctgen import write_ct_series
from tests.fakeclock import FakeClock


@pytest.fixture
def env(db_url):
    engine = create_engine_for(db_url)
    init_schema(engine)
    clock = FakeClock()
    yield engine, clock
    engine.dispose()


CHEST_CT: list[str] = []  # the path of one real chest CT file, which routing reads the header of


@pytest.fixture(autouse=True)
def chest_header(tmp_path):
    CHEST_CT[:] = [str(write_ct_series(tmp_path / "header", slices=1, size=16).paths[0])]


def make(env, **completion) -> tuple[Index, CompletionSweeper, list]:
    """A sweeper whose senders complete on release unless ``completion`` says otherwise."""
    engine, clock = env
    config = NodeConfig.model_validate(
        {"completion": {"stable_seconds": 30, "release_grace_seconds": 1, "mode": "release", **completion},
         "queue": {"priority_rules": [{"calling_ae": "ER-CT"}]}}
    )
    index = Index(engine, clock=clock)
    completed: list = []
    sweeper = CompletionSweeper(config, engine, JobQueue(engine, config.queue, clock=clock), clock=clock,
                                on_complete=lambda uid, v: completed.append((uid, v)))
    return index, sweeper, completed


def send(index: Index, series: str, zs, *, assoc: str = "a1", calling: str = "CT1", expected=None, path=None):
    path = path or CHEST_CT[0]
    for i, z in enumerate(zs):
        index.record_instance(InstanceRecord(
            sop_uid=f"{series}.{i + 1}", series_uid=series, study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=1, sha256=f"{i:064d}", modality="CT",
            image_position=f"0\\0\\{z}", image_orientation="1\\0\\0\\0\\1\\0", frame_of_reference_uid="1.9",
            images_in_acquisition=expected, calling_ae=calling, association_id=assoc,
        ))


def test_expected_count_completes_as_soon_as_reached(env):
    index, sweeper, completed = make(env)
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.1", [0, 2.5, 5.0], expected=4)
    assert sweeper.sweep() == []
    send(index, "5.1", [0, 2.5, 5.0, 7.5], expected=4)
    assert sweeper.sweep() == [("5.1", 1, CompletionReason.EXPECTED_COUNT)]
    assert completed == [("5.1", 1)]
    assert index.get_series("5.1").state == SeriesState.COMPLETE


def test_contiguous_stack_completes_after_release_and_grace_not_before(env):
    index, sweeper, _ = make(env)
    engine, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.2", [i * 2.5 for i in range(20)])
    clock.now += 5
    assert sweeper.sweep() == []  # association still open
    index.association_closed("a1", AssociationState.RELEASED)
    clock.now += 0.5
    assert sweeper.sweep() == []  # within the grace period
    clock.now += 0.6
    assert sweeper.sweep() == [("5.2", 1, CompletionReason.CONTIGUOUS_RELEASED)]


def test_missing_slice_waits_for_the_quiet_timer(env):
    index, sweeper, _ = make(env)
    engine, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.3", [i * 2.5 for i in range(20) if i != 7])
    index.association_closed("a1", AssociationState.RELEASED)
    clock.now += 29
    assert sweeper.sweep() == []
    clock.now += 1
    assert sweeper.sweep() == [("5.3", 1, CompletionReason.QUIET_TIMER)]


@pytest.mark.parametrize("state", [AssociationState.ABORTED])
def test_aborted_association_waits_for_the_timer(env, state):
    index, sweeper, _ = make(env)
    _, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.4", [i * 2.5 for i in range(20)])
    index.association_closed("a1", state)
    clock.now += 10
    assert sweeper.sweep() == []


def test_one_association_per_image_never_completes_early(env):
    index, sweeper, _ = make(env)
    _, clock = env
    for i in range(20):
        index.association_opened(f"a{i}", "CT1", "PACSNODE", "p")
        index.record_instance(InstanceRecord(
            sop_uid=f"5.5.{i}", series_uid="5.5", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=CHEST_CT[0], size=1, sha256="0" * 64, modality="CT",
            image_position=f"0\\0\\{i * 2.5}", image_orientation="1\\0\\0\\0\\1\\0", association_id=f"a{i}",
        ))
        index.association_closed(f"a{i}", AssociationState.RELEASED)
    clock.now += 10
    assert sweeper.sweep() == []
    clock.now += 20
    assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]


def test_early_completion_can_be_switched_off(env):
    index, sweeper, _ = make(env, early=False)
    _, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.6", [0, 2.5, 5.0], expected=3)
    index.association_closed("a1", AssociationState.RELEASED)
    clock.now += 10
    assert sweeper.sweep() == []


def test_reopened_series_is_completed_again_as_a_new_version(env):
    index, sweeper, _ = make(env)
    engine, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.7", [0, 2.5, 5.0], expected=3)
    assert sweeper.sweep()[0][1] == 1
    index.association_opened("a2", "CT1", "PACSNODE", "p")
    send(index, "5.7", [0, 2.5, 5.0, 7.5], assoc="a2", expected=4)
    assert index.get_series("5.7").state == SeriesState.REOPENED
    assert sweeper.sweep() == [("5.7", 2, CompletionReason.EXPECTED_COUNT)]
    with engine.connect() as conn:
        versions = sorted(r.version for r in conn.execute(jobs.select().where(jobs.c.series_uid == "5.7")))
    assert versions == [1, 2]


def test_priority_by_calling_ae_and_by_header_keyword(env, tmp_path):
    index, sweeper, _ = make(env)
    engine, _ = env
    index.association_opened("a1", "ER-CT", "PACSNODE", "p")
    send(index, "5.8", [0, 2.5], calling="ER-CT", expected=2)
    written = write_ct_series(tmp_path / "s", slices=1, size=8)
    ds = pydicom.dcmread(written.paths[0])
    ds.RequestedProcedurePriority = "STAT"
    ds.save_as(written.paths[0])
    sweeper.config = sweeper.config.model_copy(update={"queue": sweeper.config.queue.model_copy(update={
        "priority_rules": (PriorityRule(calling_ae="ER-CT"),
                           PriorityRule(keyword="RequestedProcedurePriority", equals="stat"))})})
    send(index, "5.9", [0, 2.5], calling="CT1", expected=2, path=str(written.paths[0]))
    send(index, "5.10", [0, 2.5], calling="CT1", expected=2)
    sweeper.sweep()
    with engine.connect() as conn:
        prio = {r.series_uid: r.priority for r in conn.execute(jobs.select())}
    assert prio == {"5.8": 0, "5.9": 0, "5.10": 1}


def test_an_instance_arriving_mid_decision_keeps_the_series_open(env):
    index, sweeper, _ = make(env)
    _, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "5.11", [0, 2.5, 5.0], expected=3)
    original = sweeper._complete

    def racing_complete(row, rows, reason):
        send(index, "5.11", [0, 2.5, 5.0, 7.5], expected=4)  # arrives between decision and commit
        return original(row, rows, reason)

    sweeper._complete = racing_complete
    assert sweeper.sweep() == []
    assert index.get_series("5.11").state == SeriesState.RECEIVING


def batches(index: Index, clock, series: str, chunks, pause: float, *, calling: str = "CT1", first: int = 0) -> None:
    """Send ``series`` as several associations (``chunks`` of z positions), ``pause`` seconds apart."""
    for n, zs in enumerate(chunks, start=first):
        index.association_opened(f"{series}-a{n}", calling, "PACSNODE", "p")
        for z in zs:
            index.record_instance(InstanceRecord(
                sop_uid=f"{series}.{int(z * 10)}", series_uid=series, study_uid="1.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=CHEST_CT[0], size=1, sha256=f"{int(z * 10):064d}", modality="CT", image_position=f"0\\0\\{z}",
                image_orientation="1\\0\\0\\0\\1\\0", frame_of_reference_uid="1.9", calling_ae=calling,
                association_id=f"{series}-a{n}",
            ))
        index.association_closed(f"{series}-a{n}", AssociationState.RELEASED)
        clock.now += pause


def test_by_default_a_series_sent_in_three_associations_gives_one_version(env):
    index, sweeper, completed = make(env, mode="quiet")
    _, clock = env
    zs = [i * 2.5 for i in range(54)]
    for n in range(3):
        batches(index, clock, "6.1", [zs[n * 18:(n + 1) * 18]], 0, first=n)
        clock.now += 5  # a few seconds between the chunks: every sweep in between completes nothing
        assert sweeper.sweep() == []
    clock.now += 25
    assert sweeper.sweep() == [("6.1", 1, CompletionReason.QUIET_TIMER)]
    assert completed == [("6.1", 1)] and index.get_series("6.1").instance_count == 54


def test_a_release_profile_completes_its_sender_early_and_only_its_sender(env):
    index, sweeper, _ = make(env, mode="quiet", senders=[{"calling_ae": "CT-FAST", "mode": "release",
                                                          "release_grace_seconds": 2}])
    _, clock = env
    batches(index, clock, "6.2", [[i * 2.5 for i in range(20)]], 0, calling="CT-FAST")
    batches(index, clock, "6.3", [[i * 2.5 for i in range(20)]], 0, calling="CT-OTHER")
    clock.now += 1
    assert sweeper.sweep() == []  # within CT-FAST's grace
    clock.now += 1
    assert sweeper.sweep() == [("6.2", 1, CompletionReason.CONTIGUOUS_RELEASED)]
    clock.now += 28
    assert sweeper.sweep() == [("6.3", 1, CompletionReason.QUIET_TIMER)]


def test_a_sender_profile_can_set_its_own_quiet_timer(env):
    index, sweeper, _ = make(env, mode="quiet", senders=[{"calling_ae": "SLOW-PACS", "stable_seconds": 120}])
    _, clock = env
    batches(index, clock, "6.4", [[0, 2.5, 5.0]], 0, calling="SLOW-PACS")
    clock.now += 60
    assert sweeper.sweep() == []
    clock.now += 60
    assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]


def test_a_known_expected_count_not_reached_holds_completion_back(env):
    index, sweeper, _ = make(env, expected_count_timeout_seconds=600)
    _, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "6.5", [i * 2.5 for i in range(150)], expected=200)
    index.association_closed("a1", AssociationState.RELEASED)
    clock.now += 120  # released, evenly spaced, quiet for 4 × stable_seconds: still 150 of 200
    assert sweeper.sweep() == []
    index.association_opened("a2", "CT1", "PACSNODE", "p")
    send(index, "6.5", [i * 2.5 for i in range(200)], expected=200, assoc="a2")
    assert sweeper.sweep() == [("6.5", 1, CompletionReason.EXPECTED_COUNT)]  # one version, all 200


def test_an_expected_count_that_never_comes_completes_after_its_timeout(env):
    index, sweeper, _ = make(env, expected_count_timeout_seconds=600)
    _, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "6.6", [i * 2.5 for i in range(150)], expected=200)
    clock.now += 599
    assert sweeper.sweep() == []
    clock.now += 1
    assert sweeper.sweep() == [("6.6", 1, CompletionReason.EXPECTED_COUNT_TIMEOUT)]


def test_an_ignored_series_gets_no_job_and_is_routed_again_when_it_grows(env, tmp_path):
    index, sweeper, completed = make(env)
    engine, clock = env
    head = pydicom.dcmread(CHEST_CT[0])
    head.BodyPartExamined = "HEAD"
    head_path = tmp_path / "head.dcm"
    head.save_as(head_path, enforce_file_format=True)
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "6.7", [i * 2.5 for i in range(5)], path=str(head_path))
    clock.now += 30
    assert sweeper.sweep() == [] and completed == []
    row = index.get_series("6.7")
    assert (row.state, row.route, row.version) == (SeriesState.IGNORED, "everything-else", 0)
    with engine.connect() as conn:
        assert conn.execute(jobs.select()).first() is None
    send(index, "6.7", [i * 2.5 for i in range(6)], path=str(head_path))
    assert index.get_series("6.7").state == SeriesState.REOPENED
    clock.now += 30
    sweeper.sweep()
    assert index.get_series("6.7").state == SeriesState.IGNORED and index.route_counts() == {"everything-else": 1}


def test_the_routed_pipeline_is_queued_with_the_job(env):
    index, sweeper, _ = make(env, early=True)
    engine, clock = env
    sweeper.apply_config(sweeper.config.model_copy(update={"routes": (
        Route(name="volumes", pipeline=PipelineName.LUNG_VOLUME),
    )}))
    send(index, "6.8", [0, 2.5, 5.0], expected=3)
    assert [v for _, v, _ in sweeper.sweep()] == [1]
    job = JobQueue(engine, sweeper.config.queue, clock=clock).claim("w")
    assert job.pipeline is PipelineName.LUNG_VOLUME and index.get_series("6.8").route == "volumes"


def test_routing_decisions_are_counted_in_metrics(env, tmp_path):
    from node.metrics import Metrics

    engine, clock = env
    metrics = Metrics()
    config = NodeConfig.model_validate({"completion": {"stable_seconds": 30}})
    index = Index(engine, clock=clock)
    sweeper = CompletionSweeper(config, engine, JobQueue(engine, config.queue, clock=clock), clock=clock,
                                metrics=metrics)
    head = pydicom.dcmread(CHEST_CT[0])
    head.BodyPartExamined = "HEAD"
    head.save_as(tmp_path / "head.dcm", enforce_file_format=True)
    send(index, "7.1", [0, 2.5], path=str(tmp_path / "head.dcm"))
    send(index, "7.2", [0, 2.5])
    clock.now += 30
    sweeper.sweep()
    text = metrics.render()[0].decode()
    assert 'pacsnode_series_routed_total{pipeline="none",route="everything-else"} 1.0' in text
    assert 'pacsnode_series_routed_total{pipeline="pneumonia",route="chest-ct"} 1.0' in text


def test_an_expected_count_exceeded_is_no_longer_believed(env):
    """ImagesInAcquisition counts one acquisition: a series of several (step-and-shoot, HRCT) announces 16 and
    brings 40. It may complete once at 16 (nothing says more will come), but then its further instances must not
    complete it again at every sweep (a new version a second); the release rule ends it, once."""
    index, sweeper, _ = make(env)
    engine, clock = env
    index.association_opened("a1", "CT1", "PACSNODE", "p")
    send(index, "6.9", [i * 2.5 for i in range(16)], expected=16)
    assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.EXPECTED_COUNT]
    for n in range(17, 41):
        send(index, "6.9", [i * 2.5 for i in range(n)], expected=16)
        clock.now += 0.5
        sweeper.sweep()
    index.association_closed("a1", AssociationState.RELEASED)
    clock.now += 2
    assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.CONTIGUOUS_RELEASED]
    with engine.connect() as conn:
        assert sorted(r.version for r in conn.execute(jobs.select().where(jobs.c.series_uid == "6.9"))) == [1, 2]


def test_a_localizer_at_instance_1_does_not_make_the_series_a_localizer(env, tmp_path):
    """Routing reads one header; it was the lowest instance number's, so a scanner that puts its scout at instance
    1 of the axial series had the whole series silently ignored as a localizer (no result, no report)."""
    index, sweeper, _ = make(env)
    _, clock = env
    scout = write_ct_series(tmp_path / "scout", slices=1, size=16, seed=3)
    ds = pydicom.dcmread(scout.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout.paths[0], enforce_file_format=True)
    for n in range(1, 21):
        index.record_instance(InstanceRecord(
            sop_uid=f"7.3.{n}", series_uid="7.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(scout.paths[0]) if n == 1 else CHEST_CT[0], size=1,
            sha256=f"{n:064d}", modality="CT", instance_number=n, image_position=f"0\\0\\{n * 2.5}",
            image_orientation="1\\0\\0\\0\\1\\0", frame_of_reference_uid="1.9", calling_ae="CT1", association_id="a1",
        ))
    clock.now += 60
    assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]
    assert index.get_series("7.3").state == SeriesState.COMPLETE


def test_a_failing_sweep_is_logged_once_then_a_line_a_minute_and_its_recovery(env):
    """The sweep runs every second; through a database outage it logged one error line a second. Now the first
    failure, then one line a minute with the count, and the recovery."""
    from structlog.testing import capture_logs

    from node.schema import series

    engine, _ = env
    _, sweeper, _ = make(env)
    with engine.begin() as conn:
        series.drop(conn)  # every sweep now fails in the database
    with capture_logs() as logs:
        for _ in range(5):
            sweeper._sweep_logged()
        with engine.begin() as conn:
            series.create(conn)
        sweeper._sweep_logged()
    failed = [e for e in logs if e["event"] == "completion_sweep_failed"]
    assert len(failed) == 1 and failed[0]["failed_in_a_row"] == 1
    assert [e["failed_in_a_row"] for e in logs if e["event"] == "completion_sweep_recovered"] == [5]


@pytest.mark.parametrize("unreadable", ["middle", "all", "first-with-a-priority-rule", "all-for-an-hour"])
def test_a_spool_file_that_cannot_be_read_is_no_verdict_on_the_series(env, tmp_path, unreadable):
    """A routing read that failed (an NFS blip, too many open files) ignored the series for good as "[unreadable]":
    no job, no report, only an info line. Now a neighbour of the middle instance is read instead, and when none
    can be, the series is judged again next sweep — for an hour after its last instance, then it is unreadable.
    A priority rule reads the first instance that can be read (one lost file used to stall the series)."""
    index, sweeper, completed = make(env)
    _, clock = env
    if unreadable == "first-with-a-priority-rule":
        sweeper.config = sweeper.config.model_copy(update={"queue": sweeper.config.queue.model_copy(update={
            "priority_rules": (PriorityRule(keyword="Modality", equals="CT"),)})})
    paths = []
    for n in range(1, 21):
        paths.append(tmp_path / f"{n}.dcm")
        paths[-1].write_bytes(Path(CHEST_CT[0]).read_bytes())
        index.record_instance(InstanceRecord(
            sop_uid=f"7.4.{n}", series_uid="7.4", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(paths[-1]), size=1, sha256=f"{n:064d}",
            modality="CT", instance_number=n, image_position=f"0\\0\\{n * 2.5}", image_orientation="1\\0\\0\\0\\1\\0",
            frame_of_reference_uid="1.9", calling_ae="CT1", association_id="a1",
        ))
    gone = {"middle": [paths[10]], "first-with-a-priority-rule": [paths[0]]}.get(unreadable, paths)  # 11: middle
    for p in gone:
        p.rename(p.with_suffix(".away"))
    clock.now += 60
    if unreadable in ("middle", "first-with-a-priority-rule"):
        assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]
    elif unreadable == "all-for-an-hour":
        assert sweeper.sweep() == []
        clock.now += 3600
        with capture_logs() as logs:
            assert sweeper.sweep() == []
        assert index.get_series("7.4").state == SeriesState.IGNORED and index.get_series("7.4").route == "[unreadable]"
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["series_unreadable"]
        return
    else:
        assert sweeper.sweep() == [] and sweeper.sweep() == []
        assert index.get_series("7.4").state == SeriesState.RECEIVING
        for p in gone:
            p.with_suffix(".away").rename(p)
        assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]
    assert index.get_series("7.4").state == SeriesState.COMPLETE and completed == [("7.4", 1)]


def test_a_series_that_changes_after_its_results_and_now_routes_nowhere_stays_with_its_pipeline(env):
    """Completed as version 1 (job queued, results sent); a late slice makes it match no route (here: more slices
    than the route allows). It was ignored, keeping version 1: the old results stayed live and a queued version-1
    job ran on the changed series. Now it is version 2 of its pipeline: the gate's report or a result that
    supersedes version 1."""
    engine, clock = env
    config = NodeConfig.model_validate({
        "completion": {"stable_seconds": 30, "mode": "quiet"},
        "routes": [{"name": "small-chest", "pipeline": "pneumonia", "modality": ["CT"], "max_slices": 20}]})
    index = Index(engine, clock=clock)
    queue = JobQueue(engine, config.queue, clock=clock)
    sweeper = CompletionSweeper(config, engine, queue, clock=clock)

    def slice_(n: int) -> None:
        index.record_instance(InstanceRecord(
            sop_uid=f"7.5.{n}", series_uid="7.5", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=CHEST_CT[0], size=1, sha256=f"{n:064d}", modality="CT",
            instance_number=n, image_position=f"0\\0\\{n * 2.5}", image_orientation="1\\0\\0\\0\\1\\0",
            frame_of_reference_uid="1.9", calling_ae="CT1", association_id="a1"))

    for n in range(1, 21):
        slice_(n)
    clock.now += 60
    assert [(u, v) for u, v, _ in sweeper.sweep()] == [("7.5", 1)]
    slice_(21)
    clock.now += 60
    assert [(u, v) for u, v, _ in sweeper.sweep()] == [("7.5", 2)]
    row = index.get_series("7.5")
    assert (row.state, row.version, row.route) == (SeriesState.COMPLETE, 2, "small-chest")
    with engine.connect() as conn:
        queued = [(r.version, r.pipeline) for r in conn.execute(jobs.select().where(jobs.c.series_uid == "7.5"))]
    assert sorted(queued) == [(1, "pneumonia"), (2, "pneumonia")]  # version 2's job supersedes version 1's
    # with no route to the pipeline any more (the operator turned it off), a later change is ignored
    sweeper.config = config.model_copy(update={"routes": ()})
    slice_(22)
    clock.now += 60
    assert sweeper.sweep() == [] and index.get_series("7.5").state == SeriesState.IGNORED


def test_a_malformed_header_value_neither_stalls_routing_nor_a_priority_rule(env, tmp_path):
    """Found by review: a value whose bytes do not fit its VR (SeriesDescription written as US with 3 bytes, as a
    faulty converter does) raised pydicom's BytesLengthException when routing or a priority rule read it; the sweep
    logged the series as failed and judged it again, every sweep, for ever: the series never completed, no job, no
    report. The instance itself is acknowledged (the ingest parse never converts such a value). Now a malformed value
    reads as absent: the series completes, routed on what can be read, and the rule on that keyword does not
    match."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    index, sweeper, completed = make(env)
    _, clock = env
    sweeper.config = sweeper.config.model_copy(update={"queue": sweeper.config.queue.model_copy(update={
        "priority_rules": (PriorityRule(keyword="SeriesDescription", equals="STAT"),)})})
    ds = pydicom.dcmread(CHEST_CT[0])
    tag = Tag("SeriesDescription")
    ds._dict[tag] = RawDataElement(tag, "US", 3, b"abc", 0, False, True)
    ds.save_as(tmp_path / "malformed.dcm", enforce_file_format=True)
    send(index, "7.5", [0, 2.5, 5.0], path=str(tmp_path / "malformed.dcm"))
    clock.now += 60
    with capture_logs() as logs:
        assert [r for _, _, r in sweeper.sweep()] == [CompletionReason.QUIET_TIMER]
    assert not [e for e in logs if e["event"] == "series_sweep_failed"]
    assert index.get_series("7.5").state == SeriesState.COMPLETE and completed == [("7.5", 1)]
