"""Unit tests for node/commitment.py: the bookkeeping over a real SQLite database, with the network seams
(`request_commitment`, `qido_instances`) replaced by recorders and an injected clock. The real N-ACTION /
N-EVENT-REPORT exchange with Orthanc is tests/integration/test_commitment_orthanc.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
import pytest
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from structlog.testing import capture_logs

from node.commitment import (
    Commitments,
    CommitmentUnsupportedError,
    Report,
    commit_problems,
    commitments,
)
from node.commitment_peer import request_commitment
from node.config import Destination, DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher, deliveries
from node.errors import SendError
from node.states import CommitState, DeliveryState
from tests.conftest import free_port
from tests.fakeclock import FakeClock

TIMEOUT = 60.0
PACS = ("PACS", "127.0.0.1")  # the calling AE title and address of `dimse` destinations' reports


def dimse(name: str, commitment: bool = True, **more: Any) -> Destination:
    return Destination(name=name, kind=DestinationKind.DIMSE, ae_title="PACS", host="127.0.0.1", port=104,
                       commitment=commitment, commit_timeout_seconds=TIMEOUT, **more)


def web(name: str) -> Destination:
    return Destination(name=name, kind=DestinationKind.DICOMWEB, url="http://127.0.0.1:1/dicom-web",
                       commitment=True, commit_timeout_seconds=TIMEOUT)


class Requester:
    """Records N-ACTIONs; ``errors`` are raised one per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.errors: list[Exception] = []

    def __call__(self, dest: Destination, calling_ae: str, uid: str, refs: Any, timeout: float, on_report: Any) -> None:
        self.calls.append((dest.name, uid, list(refs)))
        assert calling_ae == "PACSNODE" and callable(on_report)
        if self.errors:
            raise self.errors.pop(0)


class ResultFiles(NamedTuple):
    """Two CT files of one series, as a delivery would carry them."""

    study: str
    series: str
    paths: list[Path]
    uids: list[str]


@pytest.fixture
def files(tmp_path: Path) -> ResultFiles:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    paths, uids = [], []
    for i in range(2):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return ResultFiles(study, series, paths, uids)


def setup(tmp_path: Path, files: Any, *dests: Destination, verifier: Any = None) -> tuple[Commitments, Requester,
                                                                                           FakeClock, Dispatcher]:
    config = NodeConfig(destinations=dests)
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    clock = FakeClock(1000.0)
    requester = Requester()
    tracker = Commitments(config, engine, clock=clock, requester=requester,
                          verifier=verifier or (lambda d, s, t: set()))
    dispatcher = Dispatcher(config, engine, {}, clock=clock)
    _, series, paths, uids = files
    dispatcher.enqueue(series, 1, paths, uids)
    with engine.begin() as conn:  # as the dispatcher leaves a delivered row
        conn.execute(deliveries.update().values(state=DeliveryState.DELIVERED.value, delivered_at=clock()))
    for dest in dests:
        tracker.delivered(series, 1, dest.name)
    return tracker, requester, clock, dispatcher


def row(tracker: Commitments, destination: str) -> Any:
    with tracker.engine.connect() as conn:
        return conn.execute(sa.select(commitments).where(commitments.c.destination == destination)).first()


def test_only_commitment_destinations_get_a_row_with_the_files_uids(tmp_path, files):
    study, _, _, uids = files
    tracker, _, _, _ = setup(tmp_path, files, dimse("pacs"), dimse("plain", commitment=False))
    assert row(tracker, "plain") is None
    r = row(tracker, "pacs")
    assert r.state == CommitState.PENDING and r.study_uid == study and r.deadline == 1000.0 + TIMEOUT
    assert [uid for _, uid in json.loads(r.refs)] == uids
    assert tracker.uncommitted() == {"pacs": 1}


def test_a_full_report_commits_and_a_partial_one_fails(tmp_path, files):
    _, _, _, uids = files
    tracker, requester, _, _ = setup(tmp_path, files, dimse("a"), dimse("b"))
    assert tracker.run_once() == 2
    calls = {name: uid for name, uid, _ in requester.calls}
    assert row(tracker, "a").state == CommitState.REQUESTED and row(tracker, "a").transaction_uid == calls["a"]
    assert tracker.record(Report(calls["a"], 1, tuple(uids), ()), *PACS) == 0x0000
    assert tracker.record(Report(calls["b"], 2, (uids[0],), ((uids[1], 0x0112),)), *PACS) == 0x0000
    assert row(tracker, "a").state == CommitState.COMMITTED
    b = row(tracker, "b")
    assert b.state == CommitState.FAILED and uids[1] in b.failed and "0x0112" in b.failed
    assert tracker.uncommitted() == {"a": 0, "b": 1}
    assert [p["destination"] for p in commit_problems(tracker.engine)] == ["b"]


def test_event_type_1_missing_an_instance_is_not_committed(tmp_path, files):
    _, _, _, uids = files
    tracker, requester, _, _ = setup(tmp_path, files, dimse("a"))
    tracker.run_once()
    tracker.record(Report(requester.calls[0][1], 1, (uids[0],), ()), *PACS)
    r = row(tracker, "a")
    assert r.state == CommitState.FAILED and "not in the report" in r.failed


def test_an_unknown_transaction_is_refused(tmp_path, files):
    tracker, _, _, _ = setup(tmp_path, files, dimse("a"))
    assert tracker.record(Report(generate_uid(), 1, (), ()), *PACS) == 0x0110


def test_failed_requests_retry_then_time_out_and_a_late_report_still_commits(tmp_path, files):
    _, _, _, uids = files
    tracker, requester, clock, _ = setup(tmp_path, files, dimse("a"))
    requester.errors = [SendError("association refused")]
    tracker.run_once()
    r = row(tracker, "a")
    assert r.state == CommitState.PENDING and r.transaction_uid is None and "refused" in r.last_error
    assert tracker.run_once() == 0  # backing off
    clock.advance(r.next_attempt_at - clock())
    tracker.run_once()
    assert row(tracker, "a").state == CommitState.REQUESTED and len(requester.calls) == 2
    clock.advance(TIMEOUT)
    tracker.run_once()
    r = row(tracker, "a")
    assert r.state == CommitState.TIMED_OUT and f"no N-EVENT-REPORT within {TIMEOUT:g} s" in r.last_error
    assert tracker.uncommitted() == {"a": 1}
    tracker.record(Report(requester.calls[-1][1], 1, tuple(uids), ()), *PACS)
    assert row(tracker, "a").state == CommitState.COMMITTED


def test_a_destination_without_storage_commitment_fails_at_once(tmp_path, files):
    tracker, requester, _, _ = setup(tmp_path, files, dimse("a"))
    requester.errors = [CommitmentUnsupportedError("PACS does not accept Storage Commitment Push Model")]
    tracker.run_once()
    assert row(tracker, "a").state == CommitState.FAILED
    assert tracker.run_once() == 0


def test_qido_commits_when_every_instance_is_listed_else_fails_at_the_deadline(tmp_path, files):
    study, _, _, uids = files
    listed: set[str] = {uids[0]}
    seen: list[str] = []

    def verifier(dest: Destination, study_uid: str, timeout: float) -> set[str]:
        seen.append(study_uid)
        return set(listed)

    tracker, _, clock, _ = setup(tmp_path, files, web("w"), verifier=verifier)
    tracker.run_once()
    r = row(tracker, "w")
    assert seen == [study] and r.state == CommitState.PENDING and "1 of 2" in r.last_error
    clock.advance(TIMEOUT)
    tracker.run_once()
    assert row(tracker, "w").state == CommitState.FAILED

    tracker2, _, _, _ = setup(tmp_path / "b", files, web("w"), verifier=lambda d, s, t: set(uids))
    tracker2.run_once()
    assert row(tracker2, "w").state == CommitState.COMMITTED


def test_a_redelivered_row_no_longer_counts_its_old_proof(tmp_path, files):
    _, series, _, _ = files
    tracker, _, _, _ = setup(tmp_path, files, dimse("a"))
    assert tracker.uncommitted() == {"a": 1}
    with tracker.engine.begin() as conn:  # a replaced payload makes the row pending again (Dispatcher.enqueue)
        conn.execute(deliveries.update().values(state=DeliveryState.PENDING.value))
    assert tracker.uncommitted() == {"a": 0}
    with tracker.engine.begin() as conn:
        conn.execute(deliveries.update().values(state=DeliveryState.DELIVERED.value))
    tracker.delivered(series, 1, "a")  # delivered again: a fresh proof starts
    assert row(tracker, "a").state == CommitState.PENDING and row(tracker, "a").attempts == 0


def test_unreadable_result_files_fail_the_proof_not_the_delivery(tmp_path, files):
    _, _, paths, _ = files
    config = NodeConfig(destinations=(dimse("a"),))
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    paths[0].write_bytes(b"not dicom")
    tracker = Commitments(config, engine, requester=Requester())
    Dispatcher(config, engine, {}).enqueue(files.series, 1, paths, files.uids)
    tracker.delivered(files.series, 1, "a")
    r = row(tracker, "a")
    assert r.state == CommitState.FAILED and "unreadable" in r.last_error


def test_deliveries_stored_just_before_a_crash_are_adopted_older_ones_are_not(tmp_path, files):
    _, series, paths, uids = files
    config = NodeConfig(destinations=(dimse("a"),))
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    clock = FakeClock(10_000.0)
    dispatcher = Dispatcher(config, engine, {}, clock=clock)
    dispatcher.enqueue(series, 1, paths, uids)
    dispatcher.enqueue(series, 2, paths, uids)
    with engine.begin() as conn:  # delivered, but the process died before `delivered` recorded the commitment
        conn.execute(deliveries.update().where(deliveries.c.version == 1)
                     .values(state=DeliveryState.DELIVERED.value, delivered_at=clock() - TIMEOUT - 1))
        conn.execute(deliveries.update().where(deliveries.c.version == 2)
                     .values(state=DeliveryState.DELIVERED.value, delivered_at=clock() - 5))
    tracker = Commitments(config, engine, clock=clock, requester=Requester())
    assert tracker.adopt() == 1
    assert tracker.adopt() == 0
    with engine.connect() as conn:
        (adopted,) = conn.execute(sa.select(commitments.c.delivery_id, deliveries.c.version).select_from(
            commitments.join(deliveries, deliveries.c.id == commitments.c.delivery_id))).all()
    assert adopted.version == 2


def test_an_unreachable_destination_costs_one_attempt_per_turn_and_never_holds_up_another(tmp_path, files):
    """Five deliveries to each of two PACS; "down" cannot be reached. One turn asks "down" once (its other rows wait
    for the next turn: each would wait out the same timeout), and asks "up" for every row, in a thread of its own."""
    config = NodeConfig(destinations=(dimse("down"), dimse("up")))
    engine = create_engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_schema(engine)
    clock = FakeClock(1000.0)

    class Down(Requester):
        def __call__(self, dest: Destination, *args: Any) -> None:
            super().__call__(dest, *args)
            if dest.name == "down":
                raise SendError("association with PACS@127.0.0.1:104 failed (no answer)")

    requester = Down()
    tracker = Commitments(config, engine, clock=clock, requester=requester, verifier=lambda d, s, t: set())
    dispatcher = Dispatcher(config, engine, {}, clock=clock)
    _, _, paths, uids = files
    for n in range(5):
        dispatcher.enqueue(f"1.2.3.{n}", 1, paths, uids)
    with engine.begin() as conn:
        conn.execute(deliveries.update().values(state=DeliveryState.DELIVERED.value, delivered_at=clock()))
    for n in range(5):
        for name in ("down", "up"):
            tracker.delivered(f"1.2.3.{n}", 1, name)
    assert tracker.run_once() == 6
    asked = [name for name, _, _ in requester.calls]
    assert asked.count("down") == 1 and asked.count("up") == 5
    with engine.connect() as conn:
        states = [(r.destination, r.state) for r in conn.execute(sa.select(commitments))]
    assert sorted(s for d, s in states if d == "up") == ["requested"] * 5
    assert sorted(s for d, s in states if d == "down") == ["pending"] * 5


def test_reports_for_unknown_transactions_are_refused_and_logged_rate_limited(tmp_path, files):
    """Anyone who can associate may send N-EVENT-REPORTs (pynetdicom starts a thread for each): a flood of
    reports for transactions the node never started is refused, and logged a few times, not once each."""
    tracker, _, _, _ = setup(tmp_path, files, dimse("a"))
    with capture_logs() as logs:
        statuses = {tracker.record(Report(generate_uid(), 1, (), ()), "FLOODER", "192.0.2.7") for _ in range(200)}
    assert statuses == {0x0110}
    logged = [e for e in logs if e["event"] == "commitment_report_unknown"]
    assert 1 <= len(logged) <= 5 and logged[0]["calling_ae"] == "FLOODER"


def test_only_the_destination_may_settle_its_commitment(tmp_path, files):
    """A peer that learns a Transaction UID (it crosses the network in the clear without TLS) must not be able to
    mark results committed that the PACS never stored: the report must come from the destination's AE title;
    others are answered as an unknown transaction is, and logged. By default any address: a PACS often reports
    from another address than the one the node dials (NAT, a Kubernetes service, an HA pair)."""
    _, _, _, uids = files
    tracker, requester, _, _ = setup(tmp_path, files, dimse("a"))
    tracker.run_once()
    uid = requester.calls[0][1]
    with capture_logs() as logs:
        assert tracker.record(Report(uid, 1, tuple(uids), ()), "FORGER", "127.0.0.1") == 0x0110
    assert row(tracker, "a").state == CommitState.REQUESTED
    foreign = [e for e in logs if e["event"] == "commitment_report_foreign"]
    assert [e["calling_ae"] for e in foreign] == ["FORGER"] and foreign[0]["destination"] == "a"
    assert "FORGER" in foreign[0]["error"]
    assert tracker.record(Report(uid, 1, tuple(uids), ()), "PACS", "10.1.2.3") == 0x0000
    assert row(tracker, "a").state == CommitState.COMMITTED


def test_listed_reporters_add_to_the_destination_and_listed_hosts_bind_the_address(tmp_path, files):
    _, _, _, uids = files
    dest = dimse("a", commitment_report_ae_titles=("PACS_SCP",), commitment_report_hosts=("localhost",))
    tracker, requester, _, _ = setup(tmp_path, files, dest)
    tracker.run_once()
    uid = requester.calls[0][1]
    assert tracker.record(Report(uid, 1, tuple(uids), ()), "OTHER", "127.0.0.1") == 0x0110
    assert tracker.record(Report(uid, 1, tuple(uids), ()), "PACS_SCP", "192.0.2.7") == 0x0110  # not a listed host
    assert tracker.record(Report(uid, 1, tuple(uids), ()), "PACS", "::ffff:127.0.0.1") == 0x0000  # localhost resolved
    assert row(tracker, "a").state == CommitState.COMMITTED


def test_a_report_for_a_destination_no_longer_configured_is_refused(tmp_path, files):
    _, _, _, uids = files
    tracker, requester, _, _ = setup(tmp_path, files, dimse("a"))
    tracker.run_once()
    tracker.apply_config(NodeConfig(destinations=(dimse("b"),)))
    assert tracker.record(Report(requester.calls[0][1], 1, tuple(uids), ()), *PACS) == 0x0110


def test_a_report_on_the_node_s_own_n_action_association_commits(tmp_path, files):
    """PS3.4 J.3.3 lets the PACS answer on the N-ACTION's association: a pynetdicom Storage Commitment SCP does
    (the report is sent from its N-ACTION handler) and the real requester hands it to `handle_report`, where the
    reporter is the association's acceptor (on one the PACS opens, as Orthanc does, the requestor:
    tests/integration/test_commitment_orthanc.py)."""
    def on_action(event: Any) -> tuple[int, None]:
        report = Dataset()
        report.TransactionUID = event.action_information.TransactionUID
        report.ReferencedSOPSequence = event.action_information.ReferencedSOPSequence
        event.assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        return 0x0000, None

    ae = AE("SCPAE")
    ae.add_supported_context(StorageCommitmentPushModel)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    try:  # listed reporters elsewhere do not stop a report from the very peer the node dialled
        dest = Destination(name="a", kind=DestinationKind.DIMSE, ae_title="SCPAE", host="127.0.0.1", port=port,
                           commitment=True, commitment_report_ae_titles=("PACS_SCU",),
                           commitment_report_hosts=("192.0.2.9",))
        tracker, _, _, _ = setup(tmp_path, files, dest)
        tracker.requester = request_commitment  # the real N-ACTION, not the recorder
        assert tracker.run_once() == 1
        assert row(tracker, "a").state == CommitState.COMMITTED, row(tracker, "a")
    finally:
        server.shutdown()


def test_the_qido_proof_follows_no_redirect():
    """A redirect is an answer from something other than the destination's DICOMweb service (a login page, another
    server without the token): no proof of storage, as the sender and the reachability check treat it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from node.commitment_peer import qido_instances

    class Moved(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b'[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}]'
            if self.path.startswith("/elsewhere"):
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(302)
            self.send_header("Location", "/elsewhere" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = Destination(name="w", kind=DestinationKind.DICOMWEB, url=f"http://127.0.0.1:{server.server_port}/dw")
        with pytest.raises(SendError, match="HTTP 302"):
            qido_instances(dest, "1.2", 5)
    finally:
        server.shutdown()
