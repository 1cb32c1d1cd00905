"""Review of result dispatch against a real Orthanc: what the dead letter of a destination a reload removed says.
Orthanc rejects the node's association when the called AE title is wrong (DicomCheckCalledAet); the dispatcher's
clock is a `FakeClock`, so give-up times pass without waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from node.completion import CompletionSweeper
from node.config import Destination, DestinationKind, DispatchSection, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.index import Index
from node.ingest import Ingestor
from node.queue import JobQueue
from node.senders import DimseSender
from node.spool import Spool
from node.states import DeliveryState
from node.worker import Worker
from peers.orthanc import OrthancServer
from tests.conftest import wait_until
from tests.ctgen import write_ct_series
from tests.fakeclock import FakeClock
from tests.integration.test_dispatch_orthanc import ResultFiles, _write_results
from tests.unit.results_support import ct_sources
from tests.unit.test_review_versions_race import _accept
from tests.unit.test_worker import FixedRunner

pytestmark = pytest.mark.integration

GIVE_UP = 100.0


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> ResultFiles:
    base = tmp_path_factory.mktemp("results")
    return _write_results(ct_sources(base / "ct"), base / "out", 1)


@pytest.fixture
def engine(tmp_path: Path, node_database: Any) -> Any:
    eng = create_engine_for(node_database.fresh(tmp_path / "node.db"))
    init_schema(eng)
    yield eng
    eng.dispose()


def _config(*destinations: Destination) -> NodeConfig:
    fast = DispatchSection(initial_backoff_seconds=1, max_backoff_seconds=2, give_up_after_seconds=GIVE_UP,
                           poll_seconds=0.05, timeout_seconds=5)
    return NodeConfig(destinations=destinations, dispatch=fast)


def _pacs(orthanc: OrthancServer, ae_title: str, name: str = "pacs") -> Destination:
    return Destination(name=name, kind=DestinationKind.DIMSE, ae_title=ae_title, host="127.0.0.1",
                       port=orthanc.dicom_port)


class _ReloadDuringSend(DimseSender):
    """The node's own C-STORE sender; ``during(destination)`` runs once, while the first send is on its way (the
    hot reload an operator makes at that moment)."""

    def __init__(self) -> None:
        super().__init__("PACSNODE", 5)
        self.during: Callable[[], None] | None = None

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        if (during := self.during) is not None:
            self.during = None
            during()
        super().send(destination, files)


def test_a_removed_destinations_dead_letter_says_it_is_not_configured(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, result: ResultFiles) -> None:
    """The PACS rejects the association (wrong called AE title); the operator removes the destination by a reload
    rather than fix it. Once the give-up time passes, the dead letter `pacsnode status` and /admin show must say the
    destination is not configured: on the old code it quoted the last send error ("... rejected ..."), sending the
    operator to fix an AE title on a destination that no longer exists."""
    orthanc = orthanc_factory()
    clock = FakeClock(1_000_000.0)
    dispatcher = Dispatcher(_config(_pacs(orthanc, "NOT-ORTHANC")), engine,
                            {DestinationKind.DIMSE: DimseSender("PACSNODE", 5)}, clock=clock, rng=lambda: 0.5)
    [waiting] = dispatcher.enqueue(result.series_uid, 1, result.paths, result.sop_uids)
    assert dispatcher.run_once() == 1
    row = dispatcher.get(waiting)
    # rejected (or, with Orthanc slow under load, aborted): either way an error naming the wrong AE title
    assert row is not None and row.state == DeliveryState.PENDING and "association with NOT-ORTHANC@" in row.last_error
    dispatcher.apply_config(_config())  # removed by a hot reload
    clock.advance(GIVE_UP + 1)
    dispatcher.run_once()  # the sweep: past its give-up time
    row = dispatcher.get(waiting)
    assert row is not None and row.state == DeliveryState.DEAD
    assert "destination not configured" in row.last_error
    assert orthanc.sop_instance_uids() == []


def test_a_destination_removed_while_its_send_fails_past_give_up_says_so(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, result: ResultFiles) -> None:
    """The claimed row's path: a retry past the give-up time is on its way to the PACS (which rejects it) when a
    reload removes the destination. Its dead letter must say the destination is not configured, not only quote the
    rejection."""
    orthanc = orthanc_factory()
    clock = FakeClock(1_000_000.0)
    sender = _ReloadDuringSend()
    dispatcher = Dispatcher(_config(_pacs(orthanc, "NOT-ORTHANC")), engine, {DestinationKind.DIMSE: sender},
                            clock=clock, rng=lambda: 0.5)
    [delivery] = dispatcher.enqueue(result.series_uid, 1, result.paths, result.sop_uids)
    clock.advance(GIVE_UP - 1)  # not yet given up when claimed; given up when the send has failed

    def reload_mid_send() -> None:
        dispatcher.apply_config(_config())
        clock.advance(2)

    sender.during = reload_mid_send
    assert dispatcher.run_once() == 1
    assert sender.during is None
    row = dispatcher.get(delivery)
    assert row is not None and row.state == DeliveryState.DEAD
    assert "destination not configured" in row.last_error
    assert "association with NOT-ORTHANC@" in row.last_error  # what the last attempt met is still told



@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ResultFiles]:
    """Versions 1 and 2 of one series' results (SR + SEG), as the worker would have written them."""
    base = tmp_path_factory.mktemp("versions")
    sources = ct_sources(base / "ct")
    return {v: _write_results(sources, base / "out", v) for v in (1, 2)}


def test_a_version_waiting_for_a_destination_removed_and_restored_is_not_sent_after_a_newer_one(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, versions: dict[int, ResultFiles]) -> None:
    """Version 1 waits for the PACS ``ward`` when a reload removes it (an edit undone later the same day); version 2
    of the series (a late slice) is made meanwhile and goes to the other destination only. When ``ward`` is back,
    version 1 must not go to it: its verdict is superseded, and no rejection note will ever withdraw it there
    (version 2 was never queued to ``ward``). On the old code it was sent - a superseded verdict live at the PACS,
    because only a newer version queued to the same destination counted."""
    ward, archive = orthanc_factory(), orthanc_factory()
    both = _config(_pacs(ward, ward.aet, "ward"), _pacs(archive, archive.aet, "archive"))
    dispatcher = Dispatcher(both, engine, {DestinationKind.DIMSE: DimseSender("PACSNODE", 5)})
    v1, v2 = versions[1], versions[2]
    [old_ward, _] = dispatcher.enqueue(v1.series_uid, 1, v1.paths, v1.sop_uids)
    dispatcher.apply_config(_config(_pacs(archive, archive.aet, "archive")))
    dispatcher.enqueue(v2.series_uid, 2, v2.paths, v2.sop_uids)
    dispatcher.run_once()
    assert sorted(archive.sop_instance_uids()) == sorted(v2.sop_uids)  # version 1 was superseded there
    dispatcher.apply_config(both)  # the reload undone
    dispatcher.run_once()
    row = dispatcher.get(old_ward)
    assert row is not None and row.state == DeliveryState.DEAD and "superseded by version 2" in row.last_error
    assert ward.sop_instance_uids() == []
    assert dispatcher.retry([old_ward]) == 0  # nor does a replay send it


def test_an_ae_title_corrected_by_a_reload_during_a_failing_send_is_used_at_once(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, result: ResultFiles) -> None:
    """The operator corrects the PACS's AE title while an attempt to the wrong one is on its way (and then rejected).
    The rejection was earned at the old address: the delivery goes to the corrected one at once, not after the
    backoff that attempt earned (300 s here)."""
    orthanc = orthanc_factory()
    slow = DispatchSection(initial_backoff_seconds=300, max_backoff_seconds=300, give_up_after_seconds=3600,
                           poll_seconds=0.05, timeout_seconds=5)
    sender = _ReloadDuringSend()
    dispatcher = Dispatcher(NodeConfig(destinations=(_pacs(orthanc, "NOT-ORTHANC"),), dispatch=slow), engine,
                            {DestinationKind.DIMSE: sender}, rng=lambda: 1.0)
    fixed = NodeConfig(destinations=(_pacs(orthanc, orthanc.aet),), dispatch=slow)
    sender.during = lambda: dispatcher.apply_config(fixed)
    dispatcher.start()
    try:
        [delivery] = dispatcher.enqueue(result.series_uid, 1, result.paths, result.sop_uids)
        wait_until(lambda: (row := dispatcher.get(delivery)) is not None and row.state == DeliveryState.DELIVERED,
                   30, "delivery to the corrected AE title")
    finally:
        assert dispatcher.stop(10)
    row = dispatcher.get(delivery)
    assert row is not None and row.attempts == 2
    assert sorted(orthanc.sop_instance_uids()) == sorted(result.sop_uids)


def test_a_pacs_that_stores_the_sr_and_refuses_the_seg_is_retried_and_ends_with_each_object_once(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, result: ResultFiles, tmp_path: Path) -> None:
    """Orthanc stores the SR and answers the SEG 0xA700 (its Lua filter fails on SEGs): the node must not count the
    delivery as done (the SR alone is at the PACS), must say which object was refused, and once the PACS takes
    SEGs again the retry stores the SEG and leaves one copy of each object there."""
    script = tmp_path / "refuse-seg.lua"
    script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                      "  if dicom.Modality == 'SEG' then error('no SEG here') end\n  return true\nend\n")
    orthanc = orthanc_factory(config={"LuaScripts": [str(script)]})
    clock = FakeClock(1_000_000.0)
    dispatcher = Dispatcher(_config(_pacs(orthanc, orthanc.aet)), engine,
                            {DestinationKind.DIMSE: DimseSender("PACSNODE", 5)}, clock=clock, rng=lambda: 1.0)
    [delivery] = dispatcher.enqueue(result.series_uid, 1, result.paths, result.sop_uids)
    dispatcher.run_once()
    row = dispatcher.get(delivery)
    assert row is not None and row.state == DeliveryState.PENDING
    assert f"{result.sop_uids[1]}: status 0xA700" in row.last_error and result.sop_uids[0] not in row.last_error
    assert orthanc.sop_instance_uids() == [result.sop_uids[0]]  # partial at the PACS, and the node knows it
    orthanc.stop()
    script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n  return true\nend\n")
    orthanc.start()
    clock.advance(2)  # the backoff of a first failure (initial_backoff_seconds 1, jitter 1.0)
    dispatcher.run_once()
    row = dispatcher.get(delivery)
    assert row is not None and row.state == DeliveryState.DELIVERED and row.attempts == 2
    assert sorted(orthanc.sop_instance_uids()) == sorted(result.sop_uids)
    assert orthanc.statistics()["CountInstances"] == 2


def test_a_version_made_while_no_destination_was_configured_supersedes_the_one_waiting(
        orthanc_factory: Callable[..., OrthancServer], engine: Any, tmp_path: Path) -> None:
    """The one PACS is taken out of the config (maintenance) while version 1's delivery waits for it; a late slice
    makes version 2, which the worker records and which goes nowhere (no destination). When the PACS is back in
    the config, version 1 must not go to it: version 2 superseded its verdict. On the old code it was sent (only a
    newer version's delivery row counted, and version 2 had none)."""
    orthanc = orthanc_factory()
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "gate": {"min_slices": 8, "scope_check": False},  # the fixed runner's masks are no real lungs
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
    })
    queue = JobQueue(engine, config.queue)
    dispatcher = Dispatcher(config, engine, {DestinationKind.DIMSE: DimseSender("PACSNODE", 5)})
    sweeper = CompletionSweeper(config, engine, queue, clock=lambda: time.time() + 3600)
    ingestor = Ingestor(Spool(config.node.spool_dir), Index(engine))
    worker = Worker(config, engine, queue, dispatcher, lambda: FixedRunner(0.9))
    series = write_ct_series(tmp_path / "s", size=32, slices=11, seed=31)
    _accept(ingestor, series.paths[:10])
    assert [v for _, v, _ in sweeper.sweep()] == [1]
    worker.run_pending()
    [waiting] = [r for r in dispatcher.for_series(series.series_uid) if r.version == 1]
    dispatcher.apply_config(config.model_copy(update={"destinations": ()}))
    _accept(ingestor, series.paths[10:])
    assert [v for _, v, _ in sweeper.sweep()] == [2]
    worker.run_pending()
    dispatcher.apply_config(config)
    dispatcher.run_once()
    row = dispatcher.get(waiting.id)
    assert row is not None and row.state == DeliveryState.DEAD and "superseded by version 2" in row.last_error
    assert orthanc.sop_instance_uids() == []
    assert dispatcher.retry([waiting.id]) == 0
