"""Association slots against peers that hold them without using them (node.slots), on loopback with the real
listener: C-ECHO keep-alives and a data set trickled one PDV at a time, each within the network timeout, used to
hold their slots for as long as the peer liked. At a cap, the idle one now gives its slot back (A-ABORT); one that
stores instances keeps its slot. The newcomers are pynetdicom's SCU and DCMTK's storescu."""

from __future__ import annotations

import select
import subprocess
import threading
import time
from io import BytesIO

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from structlog.testing import capture_logs

from node.errors import StoreStatus
from tests.conftest import peer_env, require_tool
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes
from tests.unit import test_hostile_dimse as hostile
from tests.unit.test_hostile_dimse import A_ABORT, AE_TITLE, CX_CT, CX_ECHO, RawPeer, associate, ct_dataset

make_node, peers, thread_errors = hostile.make_node, hostile.peers, hostile.thread_errors  # shared fixtures

RECLAIM_IDLE = 2.0  # the node's reclaim_idle_seconds here (its network timeout is 1.5 s): holders start fresh under load too
KEEPALIVE = 0.4  # a holder's C-ECHO interval: well within the network timeout


class Holder:
    """An associated `RawPeer` that keeps its association alive without storing anything: a C-ECHO every
    `KEEPALIVE` s, or (``trickle``) a C-STORE whose data set comes one byte-sized PDV at a time. Runs until the node
    ends it; ``ending`` then says how: the PDU type the node sent (7: A-ABORT), or "closed"."""

    def __init__(self, peer: RawPeer, trickle: bytes | None = None) -> None:
        associate(peer)
        self.peer = peer
        self.ending: int | str | None = None
        self.ended = threading.Event()
        self.sent = 0
        if trickle is not None:
            self._begin_store(trickle)
        self._trickle = trickle
        threading.Thread(target=self._run, daemon=True).start()

    def _begin_store(self, data: bytes) -> None:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 0
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.10.1411.99"
        req.DataSet = BytesIO(data)
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        for primitive in msg.encode_msg(CX_CT, self.peer.max_pdu):
            if primitive.presentation_data_value_list[0][1][0] & 1:  # the command set, in full
                self._send(primitive)

    def _send(self, primitive: P_DATA) -> None:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        self.peer.send(pdu.encode())

    def _run(self) -> None:
        try:
            while True:
                if select.select([self.peer.sock], [], [], KEEPALIVE)[0]:  # the node sent something: its end
                    self.ending = self.peer.read_pdu()[0]
                    return
                if self._trickle is None:
                    assert self.peer.echo(CX_ECHO) == 0x0000
                else:  # one more byte of the data set, never the last
                    primitive = P_DATA()
                    primitive.presentation_data_value_list = [[CX_CT, b"\x00" + self._trickle[self.sent:self.sent + 1]]]
                    self._send(primitive)
                    self.sent += 1
        except (EOFError, OSError):
            self.ending = "closed"
        except AssertionError as exc:  # an A-ABORT where the C-ECHO response was awaited
            self.ending = A_ABORT if "PDU type 7" in str(exc) else repr(exc)
        finally:
            self.ended.set()


def test_keepalive_holders_give_back_a_slot_at_the_per_peer_cap(make_node, peers, thread_errors):
    node = make_node(max_associations=8, max_associations_per_peer=2, reclaim_idle_seconds=RECLAIM_IDLE)
    holders = [Holder(peers(node.address)) for _ in range(2)]
    assert node.echo() is None  # both fresh: the cap holds, the newcomer is closed at accept
    time.sleep(RECLAIM_IDLE + 0.3)  # each has sent a C-ECHO every 0.4 s: alive, but idle
    with capture_logs() as logs:
        assert node.echo() == 0x0000
    ended = [h for h in holders if h.ended.wait(2.0)]
    assert len(ended) == 1 and ended[0].ending == A_ABORT  # one slot, the stalest, with an A-ABORT
    assert not [h for h in holders if h not in ended][0].ended.is_set()
    reclaimed = [e for e in logs if e["event"] == "association_reclaimed"]
    assert len(reclaimed) == 1 and reclaimed[0]["idle_seconds"] >= RECLAIM_IDLE
    assert reclaimed[0]["peer"].startswith("127.0.0.1:") and thread_errors == []


def test_a_trickled_data_set_gives_its_association_to_dcmtk_storescu(make_node, peers, tmp_path, thread_errors):
    """One association in all: a peer trickling a C-STORE's data set a PDV per 0.4 s held it, and storescu got an
    A-ASSOCIATE-RJ (pynetdicom's count) for as long as the trickle went on."""
    storescu = require_tool("storescu")
    node = make_node(max_associations=1, max_associations_per_peer=4, reclaim_idle_seconds=RECLAIM_IDLE)
    _, data = ct_dataset(tmp_path)
    holder = Holder(peers(node.address), trickle=data)
    series = write_ct_series(tmp_path / "sent", slices=3, size=32)
    host, port = node.address
    time.sleep(RECLAIM_IDLE + 0.3)
    store = subprocess.run([storescu, "-aec", AE_TITLE, host, str(port), *map(str, series.paths)], env=peer_env(),
                           capture_output=True, timeout=30)
    assert store.returncode == 0, store.stderr.decode()
    assert holder.ended.wait(2.0) and holder.ending == A_ABORT and 0 < holder.sent < len(data), thread_errors
    assert sorted(p.stem for p in node.spooled()) == sorted(series.sop_uids)  # nothing of the trickle
    assert thread_errors == []


def test_an_association_that_stores_keeps_its_slot_the_idle_one_goes(make_node, peers, tmp_path):
    node = make_node(max_associations=8, max_associations_per_peer=2, reclaim_idle_seconds=RECLAIM_IDLE)
    series = write_ct_series(tmp_path / "busy", slices=60, size=16)  # stores for longer than RECLAIM_IDLE
    busy = peers(node.address)
    associate(busy)
    idle = Holder(peers(node.address))
    statuses: list[int] = []

    def store_all() -> None:
        for path, sop_uid in zip(series.paths, series.sop_uids, strict=True):
            statuses.append(busy.store(CX_CT, sop_uid, dataset_bytes(path)))
            time.sleep(0.05)

    storing = threading.Thread(target=store_all)
    storing.start()
    time.sleep(RECLAIM_IDLE + 0.3)
    assert node.echo() == 0x0000  # took the idle holder's slot
    assert idle.ended.wait(2.0) and idle.ending == A_ABORT
    storing.join(30)
    assert statuses == [StoreStatus.SUCCESS] * len(series.paths)  # never interrupted
    # both slots now belong to associations that moved data recently or are new: the next newcomer is refused
    fresh = Holder(peers(node.address))
    assert node.echo() is None and not fresh.ended.is_set()


@pytest.mark.parametrize("reclaim", [None])
def test_with_reclaim_off_holders_keep_their_slots(make_node, peers, reclaim):
    node = make_node(max_associations=8, max_associations_per_peer=2, reclaim_idle_seconds=reclaim)
    holders = [Holder(peers(node.address)) for _ in range(2)]
    time.sleep(RECLAIM_IDLE + 0.3)
    assert node.echo() is None
    assert not any(h.ended.is_set() for h in holders)


def test_a_hot_reload_switches_reclaiming_on_for_the_next_connection(make_node, peers):
    node = make_node(max_associations=8, max_associations_per_peer=2, reclaim_idle_seconds=None)
    holders = [Holder(peers(node.address)) for _ in range(2)]
    time.sleep(RECLAIM_IDLE + 0.3)
    assert node.echo() is None
    section = node.config.node.model_copy(update={"reclaim_idle_seconds": RECLAIM_IDLE})
    node.server.apply_config(node.config.model_copy(update={"node": section}))  # what SIGHUP does
    assert node.echo() == 0x0000
    assert sum(h.ended.wait(2.0) for h in holders) == 1
