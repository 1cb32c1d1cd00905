"""Adversarial review of the orderings between pynetdicom's threads that the node's handlers assume.

pynetdicom runs an acceptor association's handlers in several threads: EVT_ACCEPTED and EVT_RELEASED / EVT_ABORTED
in the association's own thread, EVT_CONN_CLOSE in the DUL reactor's thread (inside the state machine's action
that closes the transport), an N-EVENT-REPORT in a thread of its own. Each test here makes one interleaving
certain by slowing one of those threads at a point pynetdicom allows it to be slow (a loaded machine), with real
peers: `test_hostile_dimse.RawPeer` and pynetdicom's own AE.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)

from node import scu
from node.schema import associations
from node.scu import Peer, request_storage_commitment
from node.states import AssociationState
from tests.conftest import free_port, wait_until
from tests.unit import test_hostile_dimse as hostile

make_node, peers, thread_errors = hostile.make_node, hostile.peers, hostile.thread_errors  # shared fixtures
A_ABORT = 0x07


def _rows(node: hostile.Node) -> list[Any]:
    with node.engine.connect() as conn:
        return list(conn.execute(sa.select(associations.c.state, associations.c.closed_at)))


def _no_association_running(node: hostile.Node) -> bool:
    return not [a for a in node.server._ae.active_associations if a.is_alive()]


def test_a_peer_that_aborts_while_its_association_is_being_recorded_leaves_no_row_open(make_node, peers):
    """EVT_CONN_CLOSE is triggered in the DUL's thread (fsm AA-3/AA-4) as soon as the peer aborts or closes, also
    while the association's thread is still in the EVT_ACCEPTED handler. That handler named the association
    before writing its row: a close in between marked a row that did not exist yet as aborted (nothing updated),
    then the row was written `open` - and the EVT_ABORTED that followed found the association closed already.
    The row stayed open until the node restarted, and completion's "all sending associations closed" never held
    for its series. Here the index write takes 0.5 s and the peer aborts right after the A-ASSOCIATE-AC."""
    node = make_node(network_timeout_seconds=15.0, association_timeout_seconds=15.0)
    opened = node.server._index.association_opened

    def slow_opened(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        opened(*args, **kwargs)

    node.server._index.association_opened = slow_opened
    peer = peers(node.address)
    hostile.associate(peer)
    peer.send(struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, 0, 0))  # A-ABORT, source 0 (service user)
    peer.close()
    wait_until(lambda: _no_association_running(node) and len(_rows(node)) == 1, timeout=10, what="the association to end")
    time.sleep(0.2)  # anything still on its way
    assert [r.state for r in _rows(node)] == [AssociationState.ABORTED]


def test_a_release_is_recorded_as_released_when_the_peer_closes_at_once(make_node, monkeypatch):
    """The association thread sends the A-RELEASE-RP, then triggers EVT_RELEASED. The peer closes the connection
    as soon as it has the RP, and the DUL, seeing that in Sta13 (fsm AR-5), triggers EVT_CONN_CLOSE in its own
    thread - which closed the row as *aborted* when it came first, so the EVT_RELEASED that followed found nothing:
    a normal release recorded, metered and audited as an abort, and completion's release rule (contiguous series
    sent by an association that was released) never fired for it; the series waited for the quiet timer. Here
    the association thread is slowed 0.3 s after it sends the RP (a loaded machine); the peer is pynetdicom's AE."""
    node = make_node(network_timeout_seconds=15.0, association_timeout_seconds=15.0)
    released: list[int] = []
    node.server._on_released = lambda: released.append(1)
    send_release = ACSE.send_release

    def slow_after_rp(self: ACSE, is_response: bool = False) -> None:
        send_release(self, is_response)
        if is_response and self.assoc.is_acceptor:
            time.sleep(0.3)

    monkeypatch.setattr(ACSE, "send_release", slow_after_rp)
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(*node.address, ae_title=hostile.AE_TITLE)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert assoc.is_released
    wait_until(lambda: _no_association_running(node), timeout=10, what="the association to end")
    time.sleep(0.2)
    assert [r.state for r in _rows(node)] == [AssociationState.RELEASED]
    assert released == [1]


def test_a_report_still_being_handled_when_the_n_action_response_comes_is_answered_before_the_release(
    thread_errors,
):
    """PS3.4 J.3.3 lets the PACS send its N-EVENT-REPORT on the N-ACTION's association, and one that reports at once
    (a pynetdicom SCP's report even goes out ahead of its N-ACTION response) has it handled, in a thread pynetdicom
    starts for it, while the node already has the response - and releases. The answer, ready only once the
    A-RELEASE-RQ had gone, was a P-DATA in Sta7 (awaiting the A-RELEASE-RP), where PS3.8 allows none: pynetdicom's
    state machine raised InvalidEventError and killed the DUL thread. The PACS never had its answer (the report
    was recorded, the PACS counted it failed) and the release waited the whole timeout for an A-RELEASE-RP no thread
    read, then aborted. Here the node's report handler takes 0.3 s (a database write on a loaded machine)."""
    answers: list[Any] = []
    server, port = _pacs_reporting_on_the_n_action_association(answers)
    handled: list[str] = []

    try:
        took = _request_commitment(port, handled)
        deadline = time.monotonic() + 12  # the PACS's own wait for its answer (8 s) ends before this
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
    print(f"request took {took:.2f} s; the PACS's report was answered {answers}; handled {handled}")
    assert handled == ["1.2.3.4"]
    assert answers == [0x0000]
    assert took < 3.0
    assert not thread_errors


def _request_commitment(port: int, handled: list[str]) -> float:
    """The node's Storage Commitment request to the SCP on ``port``; its report handler takes 0.3 s (a database write
    on a loaded machine) and notes each Transaction UID in ``handled``. Returns the seconds the request took."""
    def on_report(event: Any) -> tuple[int, None]:
        time.sleep(0.3)
        handled.append(str(event.event_information.TransactionUID))
        return 0x0000, None

    t0 = time.monotonic()
    request_storage_commitment(Peer("127.0.0.1", port, called_ae="SCPAE", timeout=6.0), "1.2.3.4",
                               [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")], on_report)
    return time.monotonic() - t0


def _pacs_reporting_on_the_n_action_association(answers: list[Any], after_response: bool = False,
                                                 timeout: float = 8) -> tuple[Any, int]:
    """A pynetdicom Storage Commitment SCP that sends its N-EVENT-REPORT on the N-ACTION's association as soon as it
    has the request (pynetdicom's reactor lets that report go out before the N-ACTION response), or, with
    ``after_response``, once the response has been sent; the status of each answer it gets (None: none) goes to
    ``answers``."""
    def report(assoc: Any, uid: str) -> None:
        info = Dataset()
        info.TransactionUID = uid
        status, _ = assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        answers.append(status.get("Status"))

    def on_action(event: Any) -> tuple[int, None]:
        if not after_response:
            threading.Thread(target=report, args=(event.assoc, str(event.action_information.TransactionUID)),
                             daemon=True).start()
        return 0x0000, None

    def on_sent(event: Any) -> None:  # in the DUL's thread: the first P-DATA it sent is the N-ACTION response
        if after_response and type(event.pdu).__name__ == "P_DATA_TF" and not sent:
            sent.append(event.pdu)
            threading.Thread(target=report, args=(event.assoc, "1.2.3.4"), daemon=True).start()

    ae = AE("SCPAE")
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = timeout
    ae.add_supported_context(StorageCommitmentPushModel)
    port = free_port()
    sent: list[Any] = []
    handlers = [(evt.EVT_N_ACTION, on_action), (evt.EVT_PDU_SENT, on_sent)]
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers), port


def test_an_answer_to_a_report_that_crossed_the_release_request_does_not_kill_the_dul(thread_errors, monkeypatch):
    """A report the PACS sends after its N-ACTION response can arrive just after the node decided to release (here
    the node's sender thread is slowed 0.2 s after that decision), and be answered after the A-RELEASE-RQ. That
    answer cannot be sent any more (Sta7 allows no P-DATA) and is dropped instead of killing the DUL thread with
    InvalidEventError; the report
    is still taken. The PACS, waiting for that answer, does not answer the A-RELEASE-RQ: the association ends by its
    timeout (here 1.5 s, then its A-ABORT), which no change on the node's side can avoid once the two crossed."""
    answers: list[Any] = []
    server, port = _pacs_reporting_on_the_n_action_association(answers, after_response=True, timeout=1.5)
    handled: list[str] = []
    wait = scu._Reports.wait

    def late_release(self: Any, timeout: float) -> None:  # nothing to wait for yet: the report is not there
        wait(self, timeout)
        time.sleep(0.2)  # it arrives (and is being handled) before the A-RELEASE-RQ goes

    monkeypatch.setattr(scu._Reports, "wait", late_release)

    try:
        took = _request_commitment(port, handled)
    finally:
        server.shutdown()
    print(f"request took {took:.2f} s; the PACS's report was answered {answers}; handled {handled}")
    assert handled == ["1.2.3.4"]
    assert not thread_errors
    assert took < 4.0  # the PACS's abort, not the node's own timeout (6 s)


def test_a_close_the_database_refused_is_written_when_the_association_ends(make_node):
    """Found by the completion review: the association's name was taken off before its row was closed, so a close
    the database refused (a moment's outage; pynetdicom swallows a handler's exception) left the row open until the
    node restarted - and completion's release rule off for its series. The close is now tried again when the
    association's thread ends (as aborted: the release was not recorded)."""
    node = make_node(network_timeout_seconds=15.0, association_timeout_seconds=15.0)
    closed = node.server._index.association_closed
    failures = [RuntimeError("database unavailable")]

    def flaky_closed(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        closed(*args, **kwargs)

    node.server._index.association_closed = flaky_closed
    assert node.echo() == 0
    wait_until(lambda: _no_association_running(node), timeout=10, what="the association to end")
    wait_until(lambda: [r.state for r in _rows(node)] == [AssociationState.ABORTED], timeout=5,
               what="the row closed")
    assert not failures
