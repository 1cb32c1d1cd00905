"""Adversarial review of delivery: a destination re-pointed by a config hot reload, with real DIMSE peers (pynetdicom
Storage SCPs, the node's own `DimseSender`) and the real `Dispatcher` on SQLite.

After a PACS outage the destination's rows wait out their backoff (up to ``max_backoff_seconds``). When the admin
re-points the destination (a new host or port) by a reload, those waits were earned by the old address: the rows
must go to the new one at once, as `Dispatcher.apply_config` intends ("new or changed: don't keep waiting on the old
address"), and as the first success at a recovered destination makes its backed-off rows due at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.config import Destination, DestinationKind, DispatchSection, NodeConfig
from node.dispatch import Dispatcher
from node.senders import DimseSender
from peers.process import free_port
from tests.ctgen import write_ct_series
from tests.fakeclock import FakeClock

T0 = 1_000_000.0
TIMEOUT = 5.0


class Pacs:
    """A pynetdicom Storage SCP; ``answer(dataset)`` gives each C-STORE's status; ``received`` the UIDs stored."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.answer: Callable[[pydicom.Dataset], int] = lambda ds: 0x0000
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        status = self.answer(ds)
        if status == 0x0000:
            self.received.append(str(ds.SOPInstanceUID))
        return status


@pytest.fixture
def pacs() -> Iterator[Callable[[], Pacs]]:
    made: list[Pacs] = []

    def make() -> Pacs:
        made.append(Pacs())
        return made[-1]

    yield make
    for p in made:
        p.server.shutdown()


def config(port: int) -> NodeConfig:
    dest = Destination(name="pacs", kind="dimse", ae_title="PACS", host="127.0.0.1", port=port)
    return NodeConfig(destinations=(dest,), dispatch=DispatchSection(
        initial_backoff_seconds=60.0, max_backoff_seconds=300.0, give_up_after_seconds=86400.0,
        poll_seconds=0.01, timeout_seconds=TIMEOUT))


@pytest.fixture
def dispatcher(engine: sa.Engine) -> Iterator[Callable[[int], Dispatcher]]:
    made: list[Dispatcher] = []

    def make(port: int) -> Dispatcher:
        d = Dispatcher(config(port), engine, {DestinationKind.DIMSE: DimseSender("NODE", TIMEOUT)},
                       clock=FakeClock(T0), rng=lambda: 1.0)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop(5)


def queue(d: Dispatcher, out: Path, series: str, seed: int) -> tuple[int, list[str]]:
    """One delivery of two small real DICOM files (their UIDs from ``seed``); returns its row id and their SOP
    Instance UIDs."""
    paths = write_ct_series(out, slices=2, size=8, seed=seed).paths
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    return d.enqueue(series, 1, paths, uids)[0], uids


def state(d: Dispatcher, delivery_id: int) -> str:
    row = d.get(delivery_id)
    assert row is not None
    return str(row.state)


def test_rows_backed_off_at_the_old_address_go_to_the_new_one_at_once(pacs, dispatcher, tmp_path):
    """The PACS moved: its old port refuses connections. The delivery fails there and backs off 60 s; the admin
    reloads with the new port. A delivery queued after the reload goes at once; the one that waited on the old
    address must go too, not 60 s (up to max_backoff_seconds) later."""
    d = dispatcher(free_port())  # nothing listens there: connection refused, transient
    old_id, old_uids = queue(d, tmp_path / "a", "1.2.826.0.1.3680043.10.1411.1", 1)
    d.run_once()
    assert state(d, old_id) == "pending"  # backed off: due in 60 s
    moved = pacs()
    d.apply_config(config(moved.port))
    new_id, new_uids = queue(d, tmp_path / "b", "1.2.826.0.1.3680043.10.1411.2", 2)
    d.run_once()
    d.run_once()
    assert state(d, new_id) == "delivered"
    assert state(d, old_id) == "delivered", "the row that failed at the old address still waits out its backoff"
    assert set(new_uids).isdisjoint(old_uids)
    assert sorted(moved.received) == sorted(new_uids + old_uids)


def test_a_failure_at_the_old_address_during_the_reload_does_not_hold_up_the_new_one(pacs, dispatcher, tmp_path):
    """The reload lands while a C-STORE to the old PACS is in flight, and the old PACS then answers 0xA700 (out of
    resources). That failure says nothing about the new PACS: the row goes there at once, not after a backoff."""
    old, new = pacs(), pacs()
    entered, release = threading.Event(), threading.Event()

    def stalled(ds: pydicom.Dataset) -> int:
        entered.set()
        assert release.wait(10)
        return 0xA700

    old.answer = stalled
    d = dispatcher(old.port)
    row_id, uids = queue(d, tmp_path / "a", "1.2.826.0.1.3680043.10.1411.3", 3)
    first = threading.Thread(target=d.run_once)
    first.start()
    assert entered.wait(10)
    d.apply_config(config(new.port))  # in flight: the association to the old PACS finishes as it is
    release.set()
    first.join(10)
    assert state(d, row_id) == "pending"
    d.run_once()
    assert state(d, row_id) == "delivered", "the old address's failure put the re-pointed destination on backoff"
    assert new.received == uids
