"""node.slots's admission policy with a fake clock: which connection is admitted, refused, or takes back whose slot.
The same policy on real sockets, against real peers: tests/unit/test_hostile_slots.py."""

from __future__ import annotations

import pytest

from node.slots import PROGRESS_BYTES, Slots
from node.states import PeerRefusal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


CAPS = dict(max_associations=4, max_connections=8, max_per_peer=2, reclaim_idle=30.0)


class Negotiated:
    """Stands for a connection's pynetdicom association once negotiated (``node.slots`` reads only this)."""

    is_established = True


def admit(slots: Slots, address: str, negotiating: bool = False, **caps):  # noqa: ANN201
    """Admit a connection; unless ``negotiating``, its association is negotiated at once."""
    decided = slots.admit(address, 104, object(), **{**CAPS, **caps})
    if decided.slot is not None and not negotiating:
        decided.slot.assoc = Negotiated()  # type: ignore[assignment]
    return decided


def test_below_the_caps_everyone_is_admitted_and_nothing_is_taken(clock):
    slots = Slots(clock)
    first = admit(slots, "10.0.0.1")
    clock.now += 3600
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        decided = admit(slots, address)
        assert decided.slot is not None and decided.victim is None
    assert first.slot is not None and not first.slot.reclaimed and slots.open_count() == 4


def test_at_the_per_peer_cap_the_peers_own_idle_slot_is_taken_back(clock):
    slots = Slots(clock)
    old, new = admit(slots, "10.0.0.1").slot, None
    clock.now += 10
    recent = admit(slots, "10.0.0.1").slot
    assert old is not None and recent is not None
    clock.now += 25  # old: 35 s idle, recent: 25 s
    decided = admit(slots, "10.0.0.1")
    new = decided.slot
    assert new is not None and decided.victim is old and old.reclaimed and not recent.reclaimed
    assert slots.open_from("10.0.0.1") == 2 and slots.open_count() == 3  # the victim counts until it ends
    slots.release(old)
    assert slots.open_count() == 2 and old.ended.is_set()


def test_at_the_per_peer_cap_nobody_elses_slot_is_taken_and_fresh_slots_are_kept(clock):
    slots = Slots(clock)
    admit(slots, "10.0.0.9")
    clock.now += 100  # another address's slot is idle, but it is not behind this cap
    admit(slots, "10.0.0.1")
    admit(slots, "10.0.0.1")
    clock.now += 29
    decided = admit(slots, "10.0.0.1")
    assert decided.slot is None and decided.refusal is PeerRefusal.PEER_LIMIT_REACHED and decided.victim is None
    assert decided.from_peer == 2


def test_progress_keeps_a_slot_a_byte_now_and_then_does_not(clock):
    slots = Slots(clock)
    moving, trickling = admit(slots, "10.0.0.1").slot, admit(slots, "10.0.0.1").slot
    assert moving is not None and trickling is not None
    for _ in range(40):  # 40 s: the first sends an instance's worth every second, the other a byte
        clock.now += 1
        moving.count(PROGRESS_BYTES // 2 + 1)
        trickling.count(1)
    newcomer = admit(slots, "10.0.0.1")
    assert newcomer.victim is trickling and newcomer.slot is not None
    clock.now += 31
    moving.progressed()  # a C-STORE stored
    newcomer.slot.count(PROGRESS_BYTES)
    assert admit(slots, "10.0.0.1").refusal is PeerRefusal.PEER_LIMIT_REACHED


def test_at_the_association_cap_any_addresss_idle_slot_makes_room(clock):
    slots = Slots(clock)
    idle = admit(slots, "10.0.0.1").slot
    clock.now += 31
    busy = [admit(slots, f"10.0.0.{n}").slot for n in (2, 3, 4)]
    decided = admit(slots, "10.0.0.5")
    assert decided.slot is not None and decided.victim is idle and not any(s.reclaimed for s in busy)


def test_at_the_association_cap_without_an_idle_slot_pynetdicom_rejects_then_the_accept_refuses(clock):
    slots = Slots(clock)
    for n in range(4):
        admit(slots, f"10.0.0.{n}")
    clock.now += 29
    for n in range(4):  # over max_associations, under max_connections: admitted, A-ASSOCIATE-RJ follows
        decided = admit(slots, f"10.0.1.{n}")
        assert decided.slot is not None and decided.victim is None
    decided = admit(slots, "10.0.2.1")
    assert decided.slot is None and decided.refusal is PeerRefusal.CONNECTION_REFUSED and decided.open == 8


def test_new_connections_from_an_idle_address_start_as_idle_as_it(clock):
    """A peer cannot renew its idle slots by connecting again: each new connection takes back one of its own at
    the per-peer cap, but starts no fresher than the stalest it keeps, so another address can take it at once."""
    slots = Slots(clock)
    for _ in range(2):
        admit(slots, "10.0.0.1")
    clock.now += 31
    renewed = admit(slots, "10.0.0.1")
    assert renewed.victim is not None and renewed.slot is not None
    others = [admit(slots, f"10.0.0.{n}") for n in (2, 3)]  # 4 open: the association cap
    assert all(o.victim is None for o in others)
    decided = admit(slots, "10.0.0.4")
    assert decided.victim is not None and decided.victim.address == "10.0.0.1"


def test_a_newcomer_from_a_moving_address_starts_fresh(clock):
    slots = Slots(clock)
    moving = admit(slots, "10.0.0.1").slot
    assert moving is not None
    clock.now += 31
    moving.progressed()
    second = admit(slots, "10.0.0.1").slot
    assert second is not None and second.progress == clock.now


def test_without_reclaim_idle_the_caps_alone_decide(clock):
    slots = Slots(clock)
    for _ in range(2):
        admit(slots, "10.0.0.1", reclaim_idle=None)
    clock.now += 86400
    decided = admit(slots, "10.0.0.1", reclaim_idle=None)
    assert decided.slot is None and decided.refusal is PeerRefusal.PEER_LIMIT_REACHED


def test_at_the_association_cap_the_longest_waiting_unnegotiated_connection_makes_room(clock):
    """Connections that have not negotiated (a TLS handshake, no A-ASSOCIATE-RQ yet) from a few addresses filled
    the caps until their association timeout; the oldest of them now gives way to a newcomer, never a negotiated
    association, however recent."""
    slots = Slots(clock)
    negotiated = admit(slots, "10.0.0.1").slot
    silent = []
    for n in range(3):
        clock.now += 1
        silent.append(admit(slots, f"10.0.1.{n}", negotiating=True).slot)
    clock.now += 1
    decided = admit(slots, "10.0.2.1")  # 4 open: the association cap; nobody idle 30 s
    assert decided.slot is not None and decided.victim is silent[0] and silent[0].reclaimed
    assert negotiated is not None and not negotiated.reclaimed
    clock.now += 1
    for expected in silent[1:]:  # the oldest first, each time
        assert admit(slots, "10.0.3.1", negotiating=True).victim is expected
        clock.now += 1


def test_at_the_per_peer_cap_an_address_does_not_displace_its_own_negotiation(clock):
    slots = Slots(clock)
    for _ in range(2):
        admit(slots, "10.0.0.1", negotiating=True)
    decided = admit(slots, "10.0.0.1")
    assert decided.slot is None and decided.refusal is PeerRefusal.PEER_LIMIT_REACHED


def test_with_reclaim_off_unnegotiated_connections_keep_their_slots(clock):
    slots = Slots(clock)
    for n in range(8):
        admit(slots, f"10.0.0.{n}", negotiating=True, reclaim_idle=None)
    decided = admit(slots, "10.0.1.1", reclaim_idle=None)
    assert decided.slot is None and decided.refusal is PeerRefusal.CONNECTION_REFUSED
