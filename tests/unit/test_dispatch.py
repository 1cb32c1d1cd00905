"""Unit tests for node/dispatch.py: a fake `Sender` (the seam), an injected clock and rng, SQLite in tmp_path."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from node import senders as dispatch_module
from node.config import Destination, DestinationKind, DispatchSection, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher, backoff_delay, deliveries
from node.errors import SendError
from node.leases import holder_id
from node.logs import PHI_KEYS
from node.scu import StoreResult
from node.senders import (
    DimseSender,
    PermanentSendError,
    Sender,
    StoreOutcome,
    TransientSendError,
    check_store_results,
    classify_store_status,
)
from node.states import DeliveryState
from peers.process import wait_until
from tests.fakeclock import FakeClock

T0 = 1_000_000.0




class Crash(BaseException):
    """Stands for the process dying mid-send: nothing in the dispatcher may catch it."""


class FakeSender(Sender):
    """Records each send; ``errors[destination]`` is raised (a list is consumed one per send); ``gates`` block."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, tuple[Path, ...]]] = []
        self.errors: dict[str, BaseException | list[BaseException]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.delay = delay
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def send(self, destination: Destination, files: Sequence[Path]) -> None:
        with self._lock:
            self.calls.append((destination.name, tuple(files)))
        self.entered.set()
        gate = self.gates.get(destination.name)
        if gate is not None:
            assert gate.wait(10), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            error = self.errors.get(destination.name)
            if isinstance(error, list):
                error = error.pop(0) if error else None
        if error is not None:
            raise error

    def sent_to(self, name: str) -> int:
        return sum(1 for dest, _ in self.calls if dest == name)


def dimse(name: str, port: int = 11112) -> Destination:
    return Destination(name=name, kind=DestinationKind.DIMSE, ae_title="PACS", host="127.0.0.1", port=port)


def make_config(*destinations: Destination, **dispatch: float) -> NodeConfig:
    settings = dict(
        initial_backoff_seconds=1.0,
        max_backoff_seconds=8.0,
        give_up_after_seconds=100.0,
        poll_seconds=0.01,
        timeout_seconds=5.0,
    )
    settings.update(dispatch)
    return NodeConfig(destinations=destinations, dispatch=DispatchSection(**settings))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


@pytest.fixture
def make(engine: sa.Engine, clock: FakeClock, sender: FakeSender) -> Iterator[Callable[..., Dispatcher]]:
    made: list[Dispatcher] = []

    def _make(
        config: NodeConfig | None = None, *, rng: Callable[[], float] = lambda: 0.5, **kwargs: object
    ) -> Dispatcher:
        senders = kwargs.pop("senders", {DestinationKind.DIMSE: sender})
        d = Dispatcher(config or make_config(dimse("pacs")), engine, senders, clock=clock, rng=rng)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield _make
    for d in made:
        d.stop(5)


def files(n: int = 2, tag: str = "a") -> list[Path]:
    return [Path(f"/results/{tag}/{i}.dcm") for i in range(n)]


def uids(n: int = 2, tag: str = "1") -> list[str]:
    return [f"1.2.826.0.1.3680043.10.1411.{tag}.{i}" for i in range(n)]


def row(d: Dispatcher, delivery_id: int) -> sa.Row:
    found = d.get(delivery_id)
    assert found is not None
    return found


def force_state(engine: sa.Engine, delivery_id: int, **values: object) -> None:
    """Test-only: put a row where a crashed process would have left it."""
    with engine.begin() as conn:
        conn.execute(deliveries.update().where(deliveries.c.id == delivery_id).values(**values))


# -- backoff ----------------------------------------------------------------------------------------------------------


def test_backoff_is_exponential_jittered_and_capped() -> None:
    settings = DispatchSection(initial_backoff_seconds=2.0, max_backoff_seconds=30.0)
    assert [backoff_delay(n, settings, lambda: 1.0) for n in range(1, 8)] == [2, 4, 8, 16, 30, 30, 30]
    assert backoff_delay(3, settings, lambda: 0.25) == 2.0  # full jitter: rng() scales the whole window
    assert backoff_delay(3, settings, lambda: 0.0) == 0.0
    assert backoff_delay(10_000, settings, lambda: 1.0) == 30.0  # no overflow for huge attempt counts


def test_backoff_grows_through_the_dispatcher(make: Callable[..., Dispatcher], sender: FakeSender,
                                              clock: FakeClock) -> None:
    jitter = iter([1.0, 0.5, 1.0, 1.0, 0.25, 1.0])
    d = make(rng=lambda: next(jitter))
    sender.errors["pacs"] = TransientSendError("connection refused")
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    waits = []
    for _ in range(6):
        assert d.run_once() == 1
        r = row(d, delivery_id)
        assert r.state == DeliveryState.PENDING
        waits.append(r.due_at - clock.now)
        clock.now = r.due_at
    # windows 1, 2, 4, 8, 8 (cap), 8 scaled by the jitter 1, .5, 1, 1, .25, 1
    assert waits == [1.0, 1.0, 4.0, 8.0, 2.0, 8.0]
    assert row(d, delivery_id).attempts == 6


# -- enqueue ----------------------------------------------------------------------------------------------------------


def test_enqueue_one_pending_row_per_destination(make: Callable[..., Dispatcher], clock: FakeClock) -> None:
    d = make(make_config(dimse("a"), dimse("b")))
    ids = d.enqueue("1.2.3", 2, files(), uids())
    assert len(ids) == 2
    rows = [row(d, i) for i in ids]
    assert [r.destination for r in rows] == ["a", "b"]
    for r in rows:
        assert (r.state, r.attempts, r.version, r.kind) == (DeliveryState.PENDING, 0, 2, "dimse")
        assert r.created_at == r.due_at == clock.now
        assert r.last_attempt_at is None and r.delivered_at is None and r.last_error is None
    assert d.enqueue("1.2.3", 2, files(), uids()) == ids  # the same result set again: the same rows
    assert d.counts() == {("a", "pending"): 1, ("b", "pending"): 1}


def test_enqueue_joins_the_callers_transaction(make: Callable[..., Dispatcher], engine: sa.Engine) -> None:
    d = make()
    with pytest.raises(RuntimeError), engine.begin() as conn:
        d.enqueue("1.2.3", 1, files(), uids(), conn=conn)
        raise RuntimeError("the worker's transaction fails after queueing")
    assert d.counts() == {}
    with engine.begin() as conn:
        [delivery_id] = d.enqueue("1.2.3", 1, files(), uids(), conn=conn)
    assert row(d, delivery_id).state == DeliveryState.PENDING


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, files(), uids()), "series_uid"),
        (("1.2.3", -1, files(), uids()), "version"),
        (("1.2.3", True, files(), uids()), "version"),
        (("1.2.3", 1, [], []), "files"),
        (("1.2.3", 1, files(2), uids(1)), "sop_uids"),
    ],
)
def test_enqueue_rejects_bad_arguments(make: Callable[..., Dispatcher], args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make().enqueue(*args)


def test_enqueue_without_destinations_queues_nothing(make: Callable[..., Dispatcher]) -> None:
    assert make(make_config()).enqueue("1.2.3", 1, files(), uids()) == []


# -- outcomes ---------------------------------------------------------------------------------------------------------


def test_delivered(make: Callable[..., Dispatcher], sender: FakeSender, clock: FakeClock) -> None:
    d = make()
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    with capture_logs() as logs:
        assert d.run_once() == 1
    r = row(d, delivery_id)
    assert (r.state, r.attempts, r.delivered_at, r.last_attempt_at) == (DeliveryState.DELIVERED, 1, T0, T0)
    assert r.holder is None and r.lease_until is None
    assert sender.calls == [("pacs", tuple(files()))]
    [sent] = [e for e in logs if e["event"] == "delivery_sent"]
    assert (sent["series_uid"], sent["destination"], sent["sop_uids"]) == ("1.2.3", "pacs", uids())
    assert d.run_once() == 0  # nothing left


@pytest.mark.parametrize("column, value", [("files", "not json"), ("sop_uids", "{}"), ("files", "[1, 2]")])
def test_an_unreadable_row_is_dead_lettered_once_and_the_next_row_still_goes(
    make: Callable[..., Dispatcher], sender: FakeSender, engine: sa.Engine, column: str, value: str
) -> None:
    d = make()
    [bad] = d.enqueue("1.2.3", 1, files(tag="a"), uids(tag="1"))
    [good] = d.enqueue("1.2.4", 1, files(tag="b"), uids(tag="2"))
    force_state(engine, bad, **{column: value})
    with capture_logs() as logs:
        for _ in range(3):
            d.run_once()
    r = row(d, bad)
    assert r.state == DeliveryState.DEAD and r.attempts == 1 and "unreadable" in r.last_error
    assert r.holder is None and r.lease_until is None
    assert row(d, good).state == DeliveryState.DELIVERED
    assert sender.calls == [("pacs", tuple(files(tag="b")))]
    assert [e["event"] for e in logs].count("delivery_unreadable") == 1


def test_transient_failure_goes_back_to_pending(make: Callable[..., Dispatcher], sender: FakeSender,
                                                clock: FakeClock) -> None:
    d = make(rng=lambda: 0.5)
    sender.errors["pacs"] = [TransientSendError("association rejected")]
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    with capture_logs() as logs:
        assert d.run_once() == 1
    r = row(d, delivery_id)
    assert (r.state, r.attempts, r.last_error) == (DeliveryState.PENDING, 1, "association rejected")
    assert r.due_at == T0 + 0.5  # rng 0.5 x initial 1 s
    [failed] = [e for e in logs if e["event"] == "delivery_failed"]
    assert failed["attempt"] == 1 and failed["next_attempt_in"] == 0.5 and failed["error"] == "association rejected"
    assert failed["sop_uids"] == uids() and not PHI_KEYS & {k.lower() for k in failed}
    assert d.run_once() == 0 and len(sender.calls) == 1  # not due yet
    clock.advance(0.5)
    assert d.run_once() == 1
    r = row(d, delivery_id)
    assert (r.state, r.attempts, r.last_error) == (DeliveryState.DELIVERED, 2, "association rejected")


def test_plain_send_error_and_sender_bugs_count_as_transient(make: Callable[..., Dispatcher],
                                                             sender: FakeSender, clock: FakeClock) -> None:
    d = make()
    sender.errors["pacs"] = [SendError("peer unreachable"), KeyError("oops")]
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    d.run_once()
    assert (row(d, delivery_id).state, row(d, delivery_id).last_error) == ("pending", "peer unreachable")
    clock.advance(0.5)
    d.run_once()
    r = row(d, delivery_id)
    assert r.state == DeliveryState.PENDING and r.last_error.startswith("unexpected KeyError")


def test_permanent_failure_is_dead_at_once(make: Callable[..., Dispatcher], sender: FakeSender,
                                           clock: FakeClock) -> None:
    d = make()
    sender.errors["pacs"] = PermanentSendError("PACS@host:104 refused 1.2.3.4: status 0xA900")
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    with capture_logs() as logs:
        assert d.run_once() == 1
    r = row(d, delivery_id)
    assert (r.state, r.attempts) == (DeliveryState.DEAD, 1)
    assert r.last_error == "PACS@host:104 refused 1.2.3.4: status 0xA900"
    assert [e["event"] for e in logs if e["event"].startswith("delivery_")] == ["delivery_dead"]
    clock.advance(10_000)
    assert d.run_once() == 0 and len(sender.calls) == 1


def test_gives_up_after_the_configured_time(make: Callable[..., Dispatcher], sender: FakeSender,
                                            clock: FakeClock) -> None:
    d = make(make_config(dimse("pacs"), give_up_after_seconds=20.0), rng=lambda: 1.0)
    sender.errors["pacs"] = TransientSendError("connection refused")
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    while row(d, delivery_id).state == DeliveryState.PENDING:
        clock.now = max(clock.now, row(d, delivery_id).due_at)
        d.run_once()
        assert clock.now - T0 <= 20.0 + 8.0
    r = row(d, delivery_id)
    assert r.state == DeliveryState.DEAD
    assert r.last_error == "gave up after 20 s; last error: connection refused"
    # attempts at 0, 1, 3, 7, 15 (windows 1, 2, 4, 8) fail; the row is past 20 s by its next due time
    assert r.attempts == 5


def test_a_failure_past_the_deadline_is_dead_with_its_error(make: Callable[..., Dispatcher], sender: FakeSender,
                                                            clock: FakeClock) -> None:
    d = make(make_config(dimse("pacs"), give_up_after_seconds=20.0))
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())

    def slow_failure(destination: Destination, paths: Sequence[Path]) -> None:
        clock.advance(25)  # the attempt itself runs past the deadline
        raise TransientSendError("timed out")

    sender.send = slow_failure  # type: ignore[method-assign,assignment]
    d.run_once()
    assert row(d, delivery_id).last_error == "gave up after 20 s; last error: timed out"


def test_retry_brings_dead_back_and_it_delivers(make: Callable[..., Dispatcher], sender: FakeSender,
                                                clock: FakeClock) -> None:
    d = make(make_config(dimse("a"), dimse("b")))
    sender.errors = {"a": PermanentSendError("status 0xC000"), "b": PermanentSendError("status 0xC000")}
    ids1 = d.enqueue("1.2.3", 1, files(tag="x"), uids(tag="1"))
    ids2 = d.enqueue("1.2.4", 1, files(tag="y"), uids(tag="2"))
    d.run_once()
    assert d.counts() == {("a", "dead"): 2, ("b", "dead"): 2}
    assert {r.id for r in d.last_errors()} == set(ids1 + ids2)
    sender.errors = {}
    clock.advance(500)
    assert d.retry([ids1[0]]) == 1
    assert d.retry(destination="b") == 2
    r = row(d, ids1[0])
    assert (r.state, r.attempts, r.due_at, r.last_error) == (DeliveryState.PENDING, 0, clock.now, None)
    d.run_once()
    assert d.counts() == {("a", "delivered"): 1, ("a", "dead"): 1, ("b", "delivered"): 2}
    assert d.retry([]) == 0
    assert d.retry() == 1  # the last dead one; delivered rows are never touched
    d.run_once()
    assert d.counts() == {("a", "delivered"): 2, ("b", "delivered"): 2}
    assert d.last_errors() == []


def test_retry_restarts_the_give_up_clock(make: Callable[..., Dispatcher], sender: FakeSender,
                                          clock: FakeClock) -> None:
    d = make(make_config(dimse("pacs"), give_up_after_seconds=20.0))
    sender.errors["pacs"] = TransientSendError("connection refused")
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    d.run_once()
    clock.advance(30)
    d.run_once()
    assert row(d, delivery_id).state == DeliveryState.DEAD
    d.retry([delivery_id])
    d.run_once()  # fails again, but within its new window: pending, not dead
    assert (row(d, delivery_id).state, row(d, delivery_id).attempts) == (DeliveryState.PENDING, 1)


# -- independence of destinations ------------------------------------------------------------------------------------


def test_a_slow_destination_never_delays_another(make: Callable[..., Dispatcher], sender: FakeSender) -> None:
    d = make(make_config(dimse("slow"), dimse("fast")))
    sender.gates["slow"] = gate = threading.Event()
    ids = d.enqueue("1.2.3", 1, files(), uids())
    d.enqueue("1.2.4", 1, files(tag="b"), uids(tag="2"))
    done: list[int] = []
    runner = threading.Thread(target=lambda: done.append(d.run_once()))
    runner.start()
    try:
        # the slow send has started and now hangs; the fast destination does not wait for it
        wait_until(lambda: row(d, ids[0]).state == DeliveryState.SENDING, 10,
                   "the slow destination to start sending", interval=0.01)
        wait_until(lambda: d.counts().get(("fast", "delivered"), 0) >= 2, 10,
                   "the fast destination's deliveries (did it wait for the slow one?)", interval=0.01)
        assert row(d, ids[0]).state == DeliveryState.SENDING  # still held by the slow send
    finally:
        gate.set()
        runner.join(10)
    assert done == [4]
    assert d.counts() == {("slow", "delivered"): 2, ("fast", "delivered"): 2}


def test_a_failing_destination_never_delays_another(make: Callable[..., Dispatcher], sender: FakeSender,
                                                    clock: FakeClock) -> None:
    d = make(make_config(dimse("down"), dimse("up")), rng=lambda: 1.0)
    sender.errors["down"] = TransientSendError("connection refused")
    for n in range(3):
        d.enqueue(f"1.2.{n}", 1, files(tag=str(n)), uids(tag=str(n)))
    d.run_once()
    assert d.counts()[("up", "delivered")] == 3
    # the failing destination backs off as a whole: one attempt per backoff window, its other rows wait
    assert sender.sent_to("down") == 1
    assert d.run_once() == 0
    clock.advance(1.0)
    d.run_once()
    assert sender.sent_to("down") == 2
    assert d.run_once() == 0
    clock.advance(0.5)  # still inside the second window (2 s)
    del sender.errors["down"]
    d.enqueue("1.2.9", 1, files(tag="9"), uids(tag="9"))
    # a row queued after the failure is tried at once (the destination may be back); it succeeds, so the
    # destination's backlog, backed-off rows included, goes out in the same pass
    d.run_once()
    assert sender.sent_to("down") == 6
    assert d.counts() == {("down", "delivered"): 4, ("up", "delivered"): 4}


def test_each_destination_sends_in_order(make: Callable[..., Dispatcher], sender: FakeSender,
                                         clock: FakeClock) -> None:
    d = make()
    for n in range(5):
        d.enqueue(f"1.2.{n}", 1, files(tag=str(n)), uids(tag=str(n)))
        clock.advance(0.001)
    d.run_once()
    assert [paths[0].parent.name for _, paths in sender.calls] == ["0", "1", "2", "3", "4"]


# -- crashes and concurrent dispatchers ------------------------------------------------------------------------------


def test_rows_left_sending_by_a_crash_are_recovered(make: Callable[..., Dispatcher], sender: FakeSender,
                                                    clock: FakeClock) -> None:
    crashed = make()
    [delivery_id] = crashed.enqueue("1.2.3", 1, files(), uids())
    sender.errors["pacs"] = Crash()
    with pytest.raises(Crash):
        crashed.run_once()
    r = row(crashed, delivery_id)
    assert (r.state, r.attempts) == (DeliveryState.SENDING, 1)
    del sender.errors["pacs"]

    restarted = make()
    assert restarted.recover() == 0  # the lease still runs: another dispatcher might be sending it
    assert restarted.run_once() == 0
    assert restarted.recover(all_claims=True) == 1  # a lone node at start-up knows better
    r = row(restarted, delivery_id)
    assert (r.state, r.due_at, r.holder) == (DeliveryState.PENDING, clock.now, None)
    assert restarted.run_once() == 1
    assert row(restarted, delivery_id).state == DeliveryState.DELIVERED
    assert row(restarted, delivery_id).attempts == 2


def test_an_expired_lease_is_reclaimed(make: Callable[..., Dispatcher], sender: FakeSender, clock: FakeClock,
                                       engine: sa.Engine) -> None:
    d = make()
    [delivery_id] = d.enqueue("1.2.3", 1, files(), uids())
    force_state(engine, delivery_id, state="sending", holder="gone:1:x", lease_until=clock.now + 60)
    assert d.run_once() == 0
    clock.advance(61)
    assert d.recover() == 1
    force_state(engine, delivery_id, state="sending", holder="gone:1:x", lease_until=clock.now + 60)
    clock.advance(61)
    assert d.run_once() == 1  # the loop reclaims it even without recover()
    assert row(d, delivery_id).state == DeliveryState.DELIVERED


def test_start_up_recovery_takes_back_only_this_nodes_rows(make: Callable[..., Dispatcher], sender: FakeSender,
                                                            clock: FakeClock, engine: sa.Engine) -> None:
    d = make()
    [mine] = d.enqueue("1.2.3", 1, files(), uids())
    [theirs] = d.enqueue("1.2.4", 1, files(tag="b"), uids(tag="2"))
    force_state(engine, mine, state="sending", holder=holder_id("dispatch"), lease_until=clock.now + 60)
    force_state(engine, theirs, state="sending", holder=holder_id("dispatch", "other-node"),
                lease_until=clock.now + 60)
    assert make().recover(own=True) == 1  # what serve does at start: an earlier process of this node crashed
    assert (row(d, mine).state, row(d, mine).holder) == (DeliveryState.PENDING, None)
    assert row(d, theirs).state == DeliveryState.SENDING  # another node's live lease is left alone
    assert d.run_once() == 1 and sender.sent_to("pacs") == 1


def test_two_dispatchers_never_send_one_row(db_url: str, clock: FakeClock) -> None:
    engines = [create_engine_for(db_url), create_engine_for(db_url)]  # two processes' engines on one database
    init_schema(engines[0])
    sender = FakeSender(delay=0.005)
    config = make_config(dimse("pacs"))
    a, b = (Dispatcher(config, e, {DestinationKind.DIMSE: sender}, clock=clock) for e in engines)
    for n in range(30):
        a.enqueue(f"1.2.{n}", 1, files(tag=str(n)), uids(tag=str(n)))
    handled: list[int] = []
    start = threading.Barrier(2)

    def run(d: Dispatcher) -> None:
        start.wait()
        handled.append(d.run_once())

    threads = [threading.Thread(target=run, args=(d,)) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sends = Counter(paths for _, paths in sender.calls)
    assert len(sends) == 30 and set(sends.values()) == {1}
    assert sum(handled) == 30
    assert a.counts() == {("pacs", "delivered"): 30}
    for e in engines:
        e.dispose()


# -- senders by kind --------------------------------------------------------------------------------------------------


def test_no_sender_for_a_kind_is_dead_with_a_clear_error(make: Callable[..., Dispatcher]) -> None:
    web = Destination(name="web", kind=DestinationKind.DICOMWEB, url="http://127.0.0.1:8042/dicom-web")
    d = make(make_config(web, dimse("pacs")))
    ids = d.enqueue("1.2.3", 1, files(), uids())
    d.run_once()
    assert row(d, ids[0]).state == DeliveryState.DEAD
    assert row(d, ids[0]).last_error == "no sender for kind 'dicomweb'"
    assert row(d, ids[1]).state == DeliveryState.DELIVERED


def test_sender_is_abstract_and_senders_are_checked(engine: sa.Engine) -> None:
    with pytest.raises(TypeError):
        Sender()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="senders"):
        Dispatcher(make_config(), engine, {DestinationKind.DIMSE: object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="DestinationKind"):
        Dispatcher(make_config(), engine, {"dimse": FakeSender()})  # type: ignore[dict-item]


# -- config reload, background loop, status ---------------------------------------------------------------------------


def test_apply_config_swaps_destinations_and_backoff(make: Callable[..., Dispatcher], sender: FakeSender,
                                                     clock: FakeClock) -> None:
    d = make(make_config(dimse("old"), initial_backoff_seconds=1.0), rng=lambda: 1.0)
    sender.errors["new"] = TransientSendError("busy: status 0xA700")
    [old_id] = d.enqueue("1.2.3", 1, files(), uids())
    d.apply_config(make_config(dimse("new"), initial_backoff_seconds=5.0))
    [new_id] = d.enqueue("1.2.4", 1, files(tag="b"), uids(tag="2"))
    d.run_once()
    assert row(d, new_id).due_at == clock.now + 5.0  # the new backoff applies
    assert row(d, old_id).state == DeliveryState.PENDING  # a removed destination's rows wait (until give-up)
    assert sender.sent_to("old") == 0
    clock.advance(100)
    d.run_once()
    assert row(d, old_id).last_error == "gave up after 100 s; last error: destination not configured"
    other = FakeSender()
    d.apply_config(make_config(dimse("new")), senders={DestinationKind.DIMSE: other})
    d.enqueue("1.2.5", 1, files(tag="c"), uids(tag="3"))
    d.run_once()
    assert other.sent_to("new") == 1 and sender.sent_to("new") == 1


def test_background_loop_sends_on_wake_and_stops_gracefully(engine: sa.Engine) -> None:
    sender = FakeSender()
    # a long poll: only wake() (called by enqueue) can make the delivery prompt
    d = Dispatcher(make_config(dimse("a"), dimse("b"), poll_seconds=30.0), engine, {DestinationKind.DIMSE: sender})
    d.start()
    try:
        with pytest.raises(RuntimeError):
            d.start()
        ids = d.enqueue("1.2.3", 1, files(), uids())
        wait_until(lambda: all(row(d, i).state == DeliveryState.DELIVERED for i in ids), 10,
                   "wake() to trigger a send", interval=0.01)
        # a hot reload adds a destination: its thread starts; its first row goes out at once
        d.apply_config(make_config(dimse("a"), dimse("b"), dimse("c"), poll_seconds=30.0))
        ids = d.enqueue("1.2.4", 1, files(tag="x"), uids(tag="2"))
        wait_until(lambda: all(row(d, i).state == DeliveryState.DELIVERED for i in ids), 10,
                   "the new destination to be served", interval=0.01)
        sender.gates["a"] = gate = threading.Event()
        [held, *_] = d.enqueue("1.2.5", 1, files(tag="y"), uids(tag="3"))
        wait_until(lambda: row(d, held).state == DeliveryState.SENDING, 10, "the held delivery to be claimed",
                   interval=0.01)
        threading.Timer(0.2, gate.set).start()
    finally:
        t0 = time.monotonic()
        assert d.stop(timeout=10) is True
    assert time.monotonic() - t0 < 5
    assert row(d, held).state == DeliveryState.DELIVERED  # the send in flight was finished, not dropped
    assert not [t for t in threading.enumerate() if t.name.startswith("pacsnode-dispatch")]


def test_counts_and_last_errors(make: Callable[..., Dispatcher], sender: FakeSender, clock: FakeClock) -> None:
    d = make(make_config(dimse("a"), dimse("b")))
    sender.errors["a"] = TransientSendError("connection refused")
    ids = d.enqueue("1.2.3", 1, files(), uids())
    d.run_once()
    assert d.counts() == {("a", "pending"): 1, ("b", "delivered"): 1}
    [err] = d.last_errors(5)
    assert (err.id, err.destination, err.state, err.last_error) == (ids[0], "a", "pending", "connection refused")
    assert [r.id for r in d.for_series("1.2.3")] == ids


# -- DIMSE status classes (no network: node.scu's results are faked) -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "stored"), (0x0001, "stored"), (0xB000, "stored"), (0xB007, "stored"), (0xBFFF, "stored"),
        (0xA700, "transient"), (0xA7FF, "transient"), (0x0213, "transient"), (0x0110, "transient"),
        (0xFE00, "transient"), (0x1234, "transient"),
        (0xA900, "permanent"), (0xA9FF, "permanent"), (0xC000, "permanent"), (0xCFFF, "permanent"),
        (0x0122, "permanent"), (0x0117, "permanent"),
    ],
)
def test_store_status_classes(status: int, outcome: str) -> None:
    assert classify_store_status(status) is StoreOutcome(outcome)


def test_store_results_checks() -> None:
    ok = StoreResult("1.1", 0x0000)
    check_store_results([ok, StoreResult("1.2", 0xB000)], 2, "P")
    with pytest.raises(TransientSendError, match=r"1\.2: status 0xA700"):
        check_store_results([ok, StoreResult("1.2", 0xA700)], 2, "P")
    with pytest.raises(PermanentSendError, match=r"1\.2: status 0xC000"):
        check_store_results([StoreResult("1.2", 0xC000), StoreResult("1.3", 0xA700)], 2, "P")
    # no presentation context accepted for the instance, wherever it stands: permanent
    with pytest.raises(PermanentSendError, match=r"1\.2: not accepted"):
        check_store_results([StoreResult("1.2", None, not_accepted=True), ok], 2, "P")
    with pytest.raises(PermanentSendError, match=r"1\.2: not accepted"):
        check_store_results([ok, StoreResult("1.2", None, not_accepted=True)], 2, "P")
    # no response: transient
    with pytest.raises(TransientSendError, match="no C-STORE response"):
        check_store_results([ok, StoreResult("1.2", None)], 2, "P")
    with pytest.raises(TransientSendError, match="association ended after 1 of 2"):
        check_store_results([StoreResult("1.2", None)], 2, "P")


def test_dimse_sender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.ctgen import write_ct_series

    series = write_ct_series(tmp_path / "ct", slices=2, size=8)
    dest = dimse("pacs", port=104)
    sender = DimseSender("PACSNODE", timeout=3)
    seen: list[object] = []

    def fake_send(peer: object, datasets: Sequence[object]) -> list[StoreResult]:
        seen.append(peer)
        return [StoreResult(str(ds.SOPInstanceUID), 0) for ds in datasets]  # type: ignore[attr-defined]

    monkeypatch.setattr(dispatch_module, "send_datasets", fake_send)
    sender.send(dest, series.paths)
    [peer] = seen
    assert (peer.host, peer.port, peer.called_ae, peer.calling_ae, peer.timeout) == (  # type: ignore[attr-defined]
        "127.0.0.1", 104, "PACS", "PACSNODE", 3.0
    )

    def refused(peer: object, datasets: object) -> list[StoreResult]:
        raise SendError("association with PACS@127.0.0.1:104 failed (rejected)")

    monkeypatch.setattr(dispatch_module, "send_datasets", refused)
    with pytest.raises(TransientSendError, match="rejected"):
        sender.send(dest, series.paths)
    with pytest.raises(PermanentSendError, match="missing"):
        sender.send(dest, [tmp_path / "nope.dcm"])
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(PermanentSendError, match="junk.dcm"):
        sender.send(dest, [tmp_path / "junk.dcm"])
    with pytest.raises(ValueError, match="calling_ae"):
        DimseSender("x" * 17, 3)
    with pytest.raises(ValueError, match="timeout"):
        DimseSender("PACSNODE", 0)


def test_an_older_version_is_never_sent_after_a_newer_one(make: Callable[..., Dispatcher], sender: FakeSender,
                                                          clock: FakeClock) -> None:
    """Version 1 failed and waits for its retry; meanwhile version 2 (whose rejection note withdraws version 1's
    objects) is queued and delivered. Sending version 1 afterwards would make its verdict live again."""
    d = make(rng=lambda: 0.5)
    sender.errors["pacs"] = [TransientSendError("association rejected")]
    [old] = d.enqueue("1.2.3", 1, files(tag="v1"), uids(tag="1"))
    assert d.run_once() == 1 and row(d, old).state == DeliveryState.PENDING
    [new] = d.enqueue("1.2.3", 2, files(tag="v2"), uids(tag="2"))
    [other] = d.enqueue("1.2.4", 1, files(tag="o"), uids(tag="3"))
    clock.advance(10)
    with capture_logs() as logs:
        d.run_once()
    assert row(d, new).state == row(d, other).state == DeliveryState.DELIVERED
    r = row(d, old)
    assert r.state == DeliveryState.DEAD and "superseded by version 2" in r.last_error
    assert ("pacs", tuple(files(tag="v1"))) not in sender.calls[1:]  # only the first, failed attempt
    assert [e["event"] for e in logs].count("delivery_superseded") == 1
    assert d.retry() == 0 and d.retry([old]) == 0  # an admin's replay never brings it back
    assert row(d, old).state == DeliveryState.DEAD


def test_a_second_dispatcher_never_sends_a_version_while_an_older_one_is_being_sent(db_url: str,
                                                                                     clock: FakeClock) -> None:
    """Two dispatchers on one database: A is sending version 1 when version 2 (whose rejection note withdraws
    version 1) is queued. B used to claim and send version 2 at once, so version 1 landed after its withdrawal
    and was live again beside version 2. B now waits for A's send to end."""
    engines = [create_engine_for(db_url), create_engine_for(db_url)]
    init_schema(engines[0])
    config = make_config(dimse("pacs"))
    slow, quick = FakeSender(), FakeSender()
    slow.gates["pacs"] = threading.Event()
    a = Dispatcher(config, engines[0], {DestinationKind.DIMSE: slow}, clock=clock)
    b = Dispatcher(config, engines[1], {DestinationKind.DIMSE: quick}, clock=clock)
    [v1] = a.enqueue("1.2.3", 1, files(tag="v1"), uids(tag="1"))
    sending = threading.Thread(target=a.run_once)
    sending.start()
    assert slow.entered.wait(10)
    [v2] = b.enqueue("1.2.3", 2, files(tag="v2"), uids(tag="2"))
    [other] = b.enqueue("1.2.4", 1, files(tag="o"), uids(tag="3"))
    b.run_once()
    assert quick.calls == [("pacs", tuple(files(tag="o")))]  # another series is not held up
    assert row(b, v2).state == DeliveryState.PENDING
    slow.gates["pacs"].set()
    sending.join(10)
    assert row(a, v1).state == DeliveryState.DELIVERED
    b.run_once()
    assert row(b, v2).state == row(b, other).state == DeliveryState.DELIVERED
    v2_sends = [c for c in slow.calls + quick.calls if c == ("pacs", tuple(files(tag="v2")))]
    assert len(v2_sends) == 1  # once, after version 1 (A's drain goes on to it, or B's next turn takes it)
    for e in engines:
        e.dispose()


def test_a_claim_in_flight_on_another_dispatcher_holds_the_newer_version_up(postgres_server: Any,
                                                                            clock: FakeClock) -> None:
    """The window the first guard left (PostgreSQL READ COMMITTED): A has claimed version 1, not yet committed,
    when version 2 is queued; B still reads version 1 as waiting, so a guard on 'sending' rows alone let B send
    version 2 first. A waiting older version now holds the newer one up too (and is superseded when it is not
    being claimed). PostgreSQL only: SQLite has one writer at a time, so version 2's enqueue would wait for A."""
    db_url = str(postgres_server.create_database())
    engines = [create_engine_for(db_url), create_engine_for(db_url)]
    init_schema(engines[0])
    config = make_config(dimse("pacs"))
    quick = FakeSender()
    b = Dispatcher(config, engines[1], {DestinationKind.DIMSE: quick}, clock=clock)
    [v1] = b.enqueue("1.2.3", 1, files(tag="v1"), uids(tag="1"))
    a_claim = engines[0].connect()
    a_tx = a_claim.begin()  # A's claim of version 1, in flight
    a_claim.execute(deliveries.update().where(deliveries.c.id == v1).values(
        state=DeliveryState.SENDING.value, holder="a", lease_until=clock() + 60))
    [v2] = Dispatcher(config, engines[1], {}, clock=clock).enqueue("1.2.3", 2, files(tag="v2"), uids(tag="2"))
    turn = threading.Thread(target=b.run_once)
    turn.start()
    time.sleep(0.5)
    a_tx.commit()  # A goes on to send version 1
    a_claim.close()
    turn.join(30)
    assert quick.calls == [] and row(b, v2).state == DeliveryState.PENDING
    with engines[0].begin() as conn:  # version 1 delivered by A
        conn.execute(deliveries.update().where(deliveries.c.id == v1).values(state=DeliveryState.DELIVERED.value))
    b.run_once()
    assert quick.calls == [("pacs", tuple(files(tag="v2")))]
    for e in engines:
        e.dispose()


def test_a_results_volume_not_mounted_is_retried_not_dead_lettered(engine: sa.Engine, clock: FakeClock,
                                                                     tmp_path: Path) -> None:
    """Defect: with the results on a volume of their own (docker-compose.scale.yml's ``results``, shared by workers
    and the dispatcher) and that volume not mounted for a moment, every delivery failed on "result file missing", a
    permanent error, and was dead-lettered at once — results lost to the PACS until an admin's retry. Now a missing
    file while ``data_dir/results`` has lost its marker (node.spool) is retried; once the volume is back the delivery
    reaches the PACS (DCMTK storescp here, through the real DIMSE sender)."""
    import os

    from node.spool import Spool
    from peers.dcmtk import StoreScp
    from tests.ctgen import write_ct_series

    data_dir = tmp_path / "data"
    results = Spool(data_dir / "results")  # marks the root, as the worker's results store does
    made = write_ct_series(tmp_path / "ct", slices=2, size=8, seed=77)
    written = [results.write(made.study_uid, made.series_uid, sop, [p.read_bytes()]).path
               for sop, p in zip(made.sop_uids, made.paths, strict=True)]
    pacs = StoreScp(tmp_path / "pacs").start()
    try:
        config = make_config(dimse("pacs", port=pacs.port)).model_copy(
            update={"node": NodeConfig(node={"data_dir": str(data_dir)}).node})
        d = Dispatcher(config, engine, {DestinationKind.DIMSE: DimseSender("PACSNODE", 30)}, clock=clock,
                       rng=lambda: 0.5)
        (delivery_id,) = d.enqueue(made.series_uid, 1, written, list(made.sop_uids))
        os.rename(data_dir / "results", tmp_path / "volume")  # the volume gone, its bare mount point left
        (data_dir / "results").mkdir()
        d.run_once()
        got = row(d, delivery_id)
        assert got.state == DeliveryState.PENDING.value, (got.state, got.last_error)
        assert "has no marker" in got.last_error and "missing" in got.last_error
        (data_dir / "results").rmdir()
        os.rename(tmp_path / "volume", data_dir / "results")
        for _ in range(5):  # storescp on a loaded machine may miss a response: the delivery is retried
            clock.advance(60)
            d.run_once()
            if row(d, delivery_id).state != DeliveryState.PENDING.value:
                break
        assert row(d, delivery_id).state == DeliveryState.DELIVERED.value, row(d, delivery_id).last_error
        assert len(list((tmp_path / "pacs").rglob("*"))) >= 2
        d.stop(5)
    finally:
        pacs.stop()
