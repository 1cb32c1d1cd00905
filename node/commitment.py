"""Proof of delivery: a delivered result set is *committed* only when the destination says it holds every object.

For destinations with ``commitment = true``, `Commitments.delivered` (the dispatcher's ``on_delivered`` observer)
records one ``commitments`` row per delivered result set (state `pending`, deadline = now +
``commit_timeout_seconds``), with the SOP class/instance UIDs read from the files' headers. A supervised loop then

* **DIMSE** — Storage Commitment Push Model (PS3.4 J): writes a new Transaction UID (state `requested`), sends
  N-ACTION (Action Type 1, ReferencedSOPSequence) as the node's AE title, releases. The PACS answers with
  N-EVENT-REPORT (Event Type 1: all held; 2: failures exist) on that association or on a new one it opens to the
  node's DIMSE port (Orthanc does the latter, calling the AE title it has for the node in ``DicomModalities``);
  `Commitments.handle_report` (bound to ``EVT_N_EVENT_REPORT`` on both) marks the row `committed` when every
  requested instance is referenced and none failed, else `failed` with the failed UIDs and reasons — provided the
  report comes from that destination (its AE title at its address, `node.commitment_peer.foreign_reporter`); a
  report from anyone else is refused as one for an unknown transaction is. A failed
  N-ACTION (association refused, failure status) is retried with back-off until the deadline; a destination that
  does not accept the Storage Commitment SOP class is `failed` at once.
* **DICOMweb** — QIDO-RS ``GET {url}/studies/{study}/instances``: `committed` when every stored SOP Instance UID
  is listed, else checked again until the deadline, then `failed` naming what is missing.

Rows still `pending`/`requested` at their deadline become `timed_out` (a late report still commits them). This
module is the only writer of ``commitments``; delivery states (node.dispatch) are never touched. The network
side (N-ACTION, QIDO-RS, reading a report) is `node.commitment_peer`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy.engine import Engine

from node.commitment_peer import (
    STATUS_PROCESSING_FAILURE,
    Ref,
    Report,
    foreign_reporter,
    parse_report,
    qido_instances,
    read_refs,
    request_commitment,
)
from node.config import Destination, DestinationKind, NodeConfig
from node.db import insert_for, reading, transaction
from node.errors import SendError
from node.logs import get_logger
from node.loops import LoopThread, backoff_seconds
from node.refusals import Refusals
from node.schema import commitments, deliveries
from node.scu import CommitmentUnsupportedError
from node.states import CommitState, DeliveryState, PeerRefusal
from node.supervise import Heartbeats, failure

LOOP = "commitment"
OPEN_STATES = (CommitState.PENDING.value, CommitState.REQUESTED.value)
UNCOMMITTED_STATES = (*OPEN_STATES, CommitState.FAILED.value, CommitState.TIMED_OUT.value)
_MAX_ERROR_CHARS = 2000
_MAX_RETRY_SECONDS = 60.0
_STATUS_SUCCESS = 0x0000
_STATUS_NO_SUCH_EVENT_TYPE = 0x0113


# -- bookkeeping ----------------------------------------------------------------------------------------------------


class Commitments:
    """Commitment bookkeeping and its supervised loop (``commitment``); see the module docstring.

    ``clock`` returns epoch seconds; ``requester`` / ``verifier`` are `request_commitment` / `qido_instances`
    (fakes in unit tests). Database failures raise `DatabaseError`.
    """

    def __init__(self, config: NodeConfig, engine: Engine, *, heartbeats: Heartbeats | None = None,
                 clock: Callable[[], float] = time.time,
                 requester: Callable[..., None] = request_commitment,
                 verifier: Callable[[Destination, str, float], set[str]] = qido_instances) -> None:
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(config).__name__}")
        self.config = config
        self.engine = engine
        self.heartbeats = heartbeats or Heartbeats()
        self.clock = clock
        self.requester = requester
        self.verifier = verifier
        self.log = get_logger(component="commitment")
        self._refusals = Refusals("commitment")  # reports refused: logged at most a few per peer and minute
        self._insert = insert_for(engine)
        self._loop_thread = LoopThread(self.heartbeats, LOOP, "pacsnode-commitment", self._run)

    def apply_config(self, config: NodeConfig) -> None:
        self.config = config
        self._loop_thread.wake.set()

    def _destination(self, name: str) -> Destination | None:
        return next((d for d in self.config.destinations if d.name == name), None)

    # -- the dispatcher's hook ------------------------------------------------------------------------------------
    def delivered(self, series_uid: str, version: int, destination: str) -> None:
        """A result set was stored at ``destination``: if it proves delivery, start (or restart) its commitment.

        Called from the dispatcher thread right after the delivery is marked delivered; never raises (a failure is
        logged and, where possible, recorded on the row)."""
        try:
            self._delivered(series_uid, version, destination)
        except Exception as exc:  # noqa: BLE001 - an observer must not fail a delivery
            self.log.error("commitment_record_failed", series_uid=series_uid, destination=destination,
                           error=failure(exc))

    def _delivered(self, series_uid: str, version: int, name: str) -> None:
        dest = self._destination(name)
        if dest is None or not dest.commitment:
            return
        d = deliveries.c
        with reading(self.engine, "commitments") as conn:
            row = conn.execute(sa.select(d.id, d.files).where(
                d.series_uid == series_uid, d.version == version, d.destination == name)).first()
        if row is None:
            return
        now = self.clock()
        state, error, study = CommitState.PENDING, None, None
        refs: list[Ref] = []
        try:
            study, refs = read_refs([Path(p) for p in json.loads(row.files)])
        except SendError as exc:
            state, error = CommitState.FAILED, str(exc)
        values = dict(destination=name, kind=dest.kind.value, study_uid=study, refs=json.dumps(refs),
                      state=state.value, transaction_uid=None, attempts=0, stored_at=now,
                      deadline=now + dest.commit_timeout_seconds, next_attempt_at=now, requested_at=None,
                      reported_at=None, failed=None, last_error=error)
        with transaction(self.engine, "commitments") as conn:
            ins = self._insert(commitments).values(delivery_id=int(row.id), **values)
            conn.execute(ins.on_conflict_do_update(index_elements=["delivery_id"], set_=values))
        self.log.info("commitment_pending", delivery_id=int(row.id), series_uid=series_uid, destination=name,
                      instances=len(refs), state=state.value)
        self._loop_thread.wake.set()

    def adopt(self) -> int:
        """Start the proof of deliveries stored within their destination's commitment timeout that have no
        commitment row (the process stopped between marking them delivered and `delivered`); returns how many.
        Older ones are left alone, so turning ``commitment`` on does not question the whole history."""
        now = self.clock()
        c, d = commitments.c, deliveries.c
        found = []
        with reading(self.engine, "commitments") as conn:
            for dest in (x for x in self.config.destinations if x.commitment):
                found += [(r.series_uid, r.version, dest.name) for r in conn.execute(
                    sa.select(d.series_uid, d.version).where(
                        d.destination == dest.name, d.state == DeliveryState.DELIVERED.value,
                        d.delivered_at >= now - dest.commit_timeout_seconds,
                        ~sa.exists().where(c.delivery_id == d.id)))]
        for series_uid, version, name in found:
            self._delivered(series_uid, int(version), name)
        return len(found)

    # -- the loop's work ------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Expire overdue rows, then request / check every due one. Returns how many were worked on."""
        self._expire()
        now = self.clock()
        c = commitments.c
        with reading(self.engine, "commitments") as conn:
            due = list(conn.execute(sa.select(commitments).where(
                c.state == CommitState.PENDING.value, c.next_attempt_at <= now).order_by(c.next_attempt_at)))
        if not due:
            return 0
        by_destination: dict[str, list[Any]] = {}
        for r in due:
            by_destination.setdefault(r.destination, []).append(r)
        with ThreadPoolExecutor(max_workers=min(4, len(by_destination)), thread_name_prefix="pacsnode-commit") as pool:
            return sum(pool.map(self._work_destination, by_destination.values()))

    def _work_destination(self, rows: Sequence[Any]) -> int:
        """One destination's due rows, oldest first, in its own thread: a destination that cannot be reached costs
        one timeout per turn, not one per row, and never holds up another's. Returns how many were worked on."""
        for n, row in enumerate(rows, 1):
            if not self._work(row):
                return n  # the rest stay due: tried again next turn
        return len(rows)

    def _work(self, row: Any) -> bool:
        """Request or check one row; False when the destination could not be reached."""
        dest = self._destination(row.destination)
        if dest is None or not dest.commitment:
            return True  # left pending: times out unless the destination comes back
        try:
            if dest.kind is DestinationKind.DIMSE:
                return self._request(row, dest)
            return self._verify(row, dest)
        except Exception as exc:  # noqa: BLE001 - one row's failure never ends the loop
            self.log.error("commitment_error", delivery_id=row.delivery_id, error=failure(exc))
            return True

    def _request(self, row: Any, dest: Destination) -> bool:
        uid = generate_uid()
        c = commitments.c
        with transaction(self.engine, "commitments") as conn:  # written first: the report may come back at once
            claimed = conn.execute(commitments.update().where(
                c.delivery_id == row.delivery_id, c.state == CommitState.PENDING.value).values(
                state=CommitState.REQUESTED.value, transaction_uid=uid, requested_at=self.clock(),
                attempts=c.attempts + 1)).rowcount
        if not claimed:
            return True
        log = self.log.bind(delivery_id=row.delivery_id, destination=row.destination, transaction_uid=uid)
        refs = [tuple(r) for r in json.loads(row.refs)]
        try:
            self.requester(dest, self.config.node.ae_title, uid, refs, self.config.dispatch.timeout_seconds,
                           self.handle_report)
        except CommitmentUnsupportedError as exc:
            self._set(row.delivery_id, CommitState.REQUESTED, state=CommitState.FAILED.value,
                      last_error=str(exc)[:_MAX_ERROR_CHARS])
            log.error("commitment_unsupported", error=str(exc))
            return True
        except SendError as exc:
            delay = min(_MAX_RETRY_SECONDS, 2.0 ** (int(row.attempts) + 1))
            self._set(row.delivery_id, CommitState.REQUESTED, state=CommitState.PENDING.value, transaction_uid=None,
                      next_attempt_at=self.clock() + delay, last_error=str(exc)[:_MAX_ERROR_CHARS])
            log.warning("commitment_request_failed", error=str(exc), retry_in=delay)
            return False
        log.info("commitment_requested", instances=len(refs))
        return True

    def _verify(self, row: Any, dest: Destination) -> bool:
        refs = [tuple(r) for r in json.loads(row.refs)]
        wanted = {uid for _, uid in refs}
        log = self.log.bind(delivery_id=row.delivery_id, destination=row.destination)
        now = self.clock()
        c = commitments.c
        try:
            if not row.study_uid:
                raise SendError("result files carry no StudyInstanceUID to search")
            found = self.verifier(dest, row.study_uid, self.config.reachability.timeout_seconds)
        except SendError as exc:
            error: str | None = str(exc)
            missing: list[str] | None = None
        else:
            missing = sorted(wanted - found)
            error = f"QIDO-RS does not list {len(missing)} of {len(wanted)} instances" if missing else None
        if error is None:
            self._set(row.delivery_id, CommitState.PENDING, state=CommitState.COMMITTED.value, reported_at=now,
                      failed=None, last_error=None, attempts=c.attempts + 1)
            log.info("commitment_committed", instances=len(wanted), via="qido-rs")
            return True
        delay = min(_MAX_RETRY_SECONDS, 2.0 ** (int(row.attempts) + 1))
        self._set(row.delivery_id, CommitState.PENDING, next_attempt_at=now + delay, attempts=c.attempts + 1,
                  last_error=error[:_MAX_ERROR_CHARS],
                  failed=None if missing is None else json.dumps([[u, "not found by QIDO-RS"] for u in missing]))
        log.warning("commitment_check_failed", error=error, retry_in=delay)
        return missing is not None  # it answered (objects missing), or it could not be asked

    def _expire(self) -> int:
        """Open rows past their deadline → `timed_out` (`failed` for a DICOMweb check that kept missing objects)."""
        now = self.clock()
        c = commitments.c
        overdue = sa.and_(c.state.in_(OPEN_STATES), c.deadline <= now)
        with transaction(self.engine, "commitments") as conn:
            rows = list(conn.execute(sa.select(c.delivery_id, c.destination, c.state, c.failed, c.last_error,
                                               c.deadline, c.stored_at).where(overdue)))
            for row in rows:
                state = CommitState.FAILED if row.failed else CommitState.TIMED_OUT
                waited = row.deadline - row.stored_at
                what = ("no N-EVENT-REPORT" if row.state == CommitState.REQUESTED.value else "no proof of storage")
                reason = f"{what} within {waited:g} s" + (f"; last error: {row.last_error}" if row.last_error else "")
                conn.execute(commitments.update().where(c.delivery_id == row.delivery_id, overdue).values(
                    state=state.value, last_error=reason[:_MAX_ERROR_CHARS]))
                self.log.error("commitment_" + state.value, delivery_id=row.delivery_id,
                               destination=row.destination, error=reason)
        return len(rows)

    def _set(self, delivery_id: int, expected: CommitState, **values: Any) -> None:
        c = commitments.c
        with transaction(self.engine, "commitments") as conn:
            conn.execute(commitments.update().where(c.delivery_id == delivery_id, c.state == expected.value)
                         .values(**values))

    # -- the PACS's answer ----------------------------------------------------------------------------------------
    def handle_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """``EVT_N_EVENT_REPORT`` handler (on the node's DIMSE server and on the N-ACTION association): record a
        Storage Commitment result. Returns 0x0000 when recorded, 0x0113 for an event type other than 1 or 2,
        0x0110 for a report that is malformed, unknown, or could not be stored."""
        assoc = event.assoc  # the PACS: the acceptor when the report comes on the node's own N-ACTION association
        remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
        calling, peer, dialled = str(remote.ae_title), str(remote.address), bool(assoc.is_requestor)
        try:
            report = parse_report(event)
        except (ValueError, AttributeError, TypeError) as exc:
            self._refusals.record(PeerRefusal.COMMITMENT_REPORT_REFUSED, peer, calling_ae=calling, error=str(exc))
            return STATUS_PROCESSING_FAILURE, None
        if report.event_type not in (1, 2):
            self._refusals.record(PeerRefusal.COMMITMENT_REPORT_REFUSED, peer, calling_ae=calling,
                                  event_type=report.event_type, transaction_uid=report.transaction_uid)
            return _STATUS_NO_SUCH_EVENT_TYPE, None
        try:
            return self.record(report, calling, peer, dialled=dialled), None
        except Exception as exc:  # noqa: BLE001 - the boundary: a failure status, never an aborted association
            self.log.error("commitment_report_failed", transaction_uid=report.transaction_uid, error=failure(exc))
            return STATUS_PROCESSING_FAILURE, None

    def record(self, report: Report, calling_ae: str, peer: str, *, dialled: bool = False) -> int:
        """Apply one report to the row with its Transaction UID; returns the N-EVENT-REPORT response status.
        Refused (0x0110, as an unknown transaction) unless ``calling_ae`` at ``peer`` is the row's destination
        (`foreign_reporter`; ``dialled``: on the node's own N-ACTION association).

        Committed only when every requested instance is among the committed ones and none failed (a late report
        still commits a `timed_out` row); otherwise `failed` with the reasons."""
        c = commitments.c
        now = self.clock()
        with reading(self.engine, "commitments") as conn:
            row = conn.execute(sa.select(c.delivery_id, c.destination, c.refs, c.state)
                               .where(c.transaction_uid == report.transaction_uid)).first()
        if row is None:  # anyone who can associate may send these: logged rate-limited per peer
            self._refusals.record(PeerRefusal.COMMITMENT_REPORT_UNKNOWN, peer or calling_ae, calling_ae=calling_ae,
                                  transaction_uid=report.transaction_uid)
            return STATUS_PROCESSING_FAILURE
        dest = self._destination(row.destination)  # (outside a transaction: the check may resolve host names)
        why = ("the destination is no longer configured" if dest is None
               else foreign_reporter(dest, calling_ae, peer, dialled=dialled))
        if why:  # answered as an unknown transaction is: no hint that the UID is one of ours
            self._refusals.record(PeerRefusal.COMMITMENT_REPORT_FOREIGN, peer or calling_ae,
                                  calling_ae=calling_ae, destination=row.destination,
                                  transaction_uid=report.transaction_uid, error=why)
            return STATUS_PROCESSING_FAILURE
        with transaction(self.engine, "commitments") as conn:
            wanted = {uid for _, uid in json.loads(row.refs)}
            failed = [[uid, f"0x{reason:04X}"] for uid, reason in report.failed]
            failed += [[uid, "not in the report"] for uid in sorted(wanted - set(report.committed))
                       if uid not in {f[0] for f in failed}]
            ok = report.event_type == 1 and not failed
            state = CommitState.COMMITTED if ok else CommitState.FAILED
            error = None if ok else f"the PACS reports {len(failed)} of {len(wanted)} instances not committed"
            conn.execute(commitments.update().where(c.delivery_id == row.delivery_id,
                                                    c.transaction_uid == report.transaction_uid).values(
                state=state.value, reported_at=now, failed=json.dumps(failed) if failed else None, last_error=error))
        log = self.log.bind(delivery_id=row.delivery_id, destination=row.destination, calling_ae=calling_ae,
                            transaction_uid=report.transaction_uid, event_type=report.event_type)
        if ok:
            log.info("commitment_committed", instances=len(wanted), via="n-event-report", was=row.state)
        else:
            log.error("commitment_failed", failed=failed, error=error)
        return _STATUS_SUCCESS

    # -- reading ------------------------------------------------------------------------------------------------
    def uncommitted(self) -> dict[str, int]:
        """Destination → delivered result sets not (yet) committed, for every commitment destination."""
        out = {d.name: 0 for d in self.config.destinations if d.commitment}
        for (dest, state), n in commit_counts(self.engine).items():
            if state in UNCOMMITTED_STATES:
                out[dest] = out.get(dest, 0) + n
        return out

    # -- the loop -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.adopt()
        except Exception as exc:  # noqa: BLE001 - a failed look-back must not keep the node from starting
            self.log.error("commitment_adopt_failed", error=failure(exc))
        self._loop_thread.start(self._period(), restart=self.start)

    def stop(self, timeout: float = 10.0) -> None:
        self._loop_thread.stop(timeout)

    def _period(self) -> float:
        return max(1.0, self.config.dispatch.poll_seconds)

    def _run(self) -> None:
        loop = self._loop_thread
        errors = 0
        while not loop.stopping.is_set():
            loop.beat()
            loop.wake.clear()
            # N-ACTIONs run in parallel, each bounded by the DIMSE timeout (association + one exchange + release).
            loop.beat(busy_for=4 * self.config.dispatch.timeout_seconds + self._period())
            try:
                self.run_once()
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure (e.g. database down)
                errors += 1
                self.log.error("commitment_loop_error", error=failure(exc), consecutive_errors=errors)
            wait = backoff_seconds(self._period(), errors, cap=30.0)
            loop.beat(busy_for=wait)
            loop.wake.wait(wait)


def commit_counts(engine: Engine) -> dict[tuple[str, str], int]:
    """(destination, commitment state) → count, over rows whose delivery is still `delivered` (a re-sent delivery's
    old proof does not count)."""
    c, d = commitments.c, deliveries.c
    stmt = (sa.select(c.destination, c.state, sa.func.count())
            .select_from(commitments.join(deliveries, d.id == c.delivery_id))
            .where(d.state == DeliveryState.DELIVERED.value)
            .group_by(c.destination, c.state))
    with reading(engine, "commitments") as conn:
        return {(str(dest), str(state)): int(n) for dest, state, n in conn.execute(stmt)}


def commit_problems(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    """The latest failed or timed-out commitments of still-delivered result sets: delivery id, series, version,
    destination, state, when stored, the reason and the instances reported failed."""
    c, d = commitments.c, deliveries.c
    stmt = (sa.select(c.delivery_id, d.series_uid, d.version, c.destination, c.state, c.stored_at, c.last_error,
                      c.failed)
            .select_from(commitments.join(deliveries, d.id == c.delivery_id))
            .where(d.state == DeliveryState.DELIVERED.value,
                   c.state.in_([CommitState.FAILED.value, CommitState.TIMED_OUT.value]))
            .order_by(c.stored_at.desc(), c.delivery_id.desc()).limit(limit))
    with reading(engine, "commitments") as conn:
        return [{**dict(r._mapping), "failed": json.loads(r.failed) if r.failed else []} for r in conn.execute(stmt)]
