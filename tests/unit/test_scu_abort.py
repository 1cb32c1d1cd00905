"""The DIMSE SCU against a PACS that answers a C-STORE-RQ with an A-ABORT (or drops the connection) instead of a
C-STORE-RSP — what Orthanc and several archives do when they fail to store an instance. The send must end as soon as
the association is gone, not wait out the whole DIMSE timeout for a response that cannot come: with the 30 s default,
a destination aborting every attempt held its dispatch thread 30 s per retry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from node.scu import Peer, send_datasets
from tests.unit.test_scu_stall import ct

TIMEOUT = 8.0  # the peer timeout the node waits for a response; the abort must end the send long before


def _ct() -> Dataset:
    return ct(rows=8, columns=8)


def _abort(event: evt.Event) -> int:
    event.assoc.abort()  # an A-ABORT on the wire, then the association thread ends
    return 0x0000  # never sent: the association is gone


def _drop(event: evt.Event) -> int:
    event.assoc.dul.socket.socket.close()  # TCP closed under the association: an A-P-ABORT for the node
    return 0x0000


@pytest.fixture
def pacs() -> Iterator[Callable[[Callable[[evt.Event], int]], int]]:
    """A pynetdicom Storage SCP whose C-STORE handler is the given one; returns its port."""
    servers = []

    def start(handler: Callable[[evt.Event], int]) -> int:
        ae = AE(ae_title="ABORTS")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("handler", [_abort, _drop], ids=["a-abort", "tcp-closed"])
def test_a_pacs_aborting_instead_of_answering_ends_the_send_at_once(pacs, handler) -> None:
    peer = Peer("127.0.0.1", pacs(handler), called_ae="ABORTS", timeout=TIMEOUT)
    started = time.monotonic()
    results = send_datasets(peer, [_ct(), _ct()])
    took = time.monotonic() - started
    assert [r.status for r in results] == [None], results  # no response, nothing more sent on the dead association
    assert not results[0].ok
    assert took < TIMEOUT / 4, f"the send waited {took:.1f} s for a response after the association was aborted"


def test_a_pacs_answering_still_gets_every_instance(pacs) -> None:
    peer = Peer("127.0.0.1", pacs(lambda event: 0x0000), called_ae="ABORTS", timeout=TIMEOUT)
    results = send_datasets(peer, [_ct(), _ct(), _ct()])
    assert [r.status for r in results] == [0, 0, 0]
