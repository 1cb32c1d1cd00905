"""The index: SQL rows for associations, series and instances (SQLAlchemy Core, SQLite or PostgreSQL).

`Index.record_instance(rec)` commits one instance row and updates its series in a single transaction and tells
whether the instance was new, an identical duplicate, or a conflicting re-send kept as the latest;
`Index.record_instances(recs)` does the same for a batch in one transaction, as if one after another. The receive
path calls it (through the group commit, `node.durability`) after the spool write and before answering Success. Series rows start (or re-open) here; the
completion stage moves them on. Database errors become `StoreFailedError` (C-STORE 0xA701) or `DatabaseError`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.db import insert_for, reading, transaction
from node.errors import StoreFailedError
from node.schema import associations, instances, series  # noqa: F401 - re-exported: the stages' old import path
from node.states import AssociationState, SeriesState

_CLOSED = (SeriesState.COMPLETE, SeriesState.IGNORED)


def instance_set_digest(rows: Iterable[Any]) -> str:
    """SHA-256 over a series' instances as the duplicate check sees them, (SOP Instance UID, sha256) pairs in UID
    order: equal for the same series sent again unchanged, whatever the order or associations it came in."""
    h = hashlib.sha256()
    for sop_uid, sha256 in sorted((str(r.sop_uid), str(r.sha256)) for r in rows):
        h.update(f"{sop_uid}:{sha256}\n".encode())
    return h.hexdigest()


MEMBER_BYTES = 8  # of SHA-256 per instance: a false match needs a 2^-64 collision


def _member(sop_uid: object, sha256: object) -> bytes:
    return hashlib.sha256(f"{sop_uid}:{sha256}".encode()).digest()[:MEMBER_BYTES]


def instance_members(rows: Iterable[Any], known: bytes | None = None) -> bytes:
    """The instances ``rows`` as (SOP Instance UID, sha256) keys of `MEMBER_BYTES`, sorted, joined with the keys
    already in ``known``: what retention keeps of the instances it deletes (`series.purged_members`)."""
    keys = {_member(r.sop_uid, r.sha256) for r in rows}
    if known:
        keys.update(known[i:i + MEMBER_BYTES] for i in range(0, len(known), MEMBER_BYTES))
    return b"".join(sorted(keys))


def all_members(rows: Sequence[Any], members: bytes | None) -> bool:
    """Whether every one of ``rows`` (a series' instances now) is an instance retention deleted, unchanged."""
    if not members or not rows:
        return False
    known = {members[i:i + MEMBER_BYTES] for i in range(0, len(members), MEMBER_BYTES)}
    return all(_member(r.sop_uid, r.sha256) in known for r in rows)


class RecordOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: idempotent
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: kept as the latest


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one received instance (UIDs and geometry only, never patient attributes)."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    modality: str | None = None
    instance_number: int | None = None
    image_position: str | None = None
    image_orientation: str | None = None
    frame_of_reference_uid: str | None = None
    number_of_frames: int | None = None
    images_in_acquisition: int | None = None
    calling_ae: str | None = None
    association_id: str | None = None
    spool_id: str | None = None  # the spool holding ``path`` (then relative to its root; node.spools)


STOW_REQUEST_AE = "STOW-RS"  # the calling AE of a STOW-RS request's row (node.dicomweb.STOW_CALLING_AE)


@dataclass(frozen=True)
class DanglingAssociation:
    """An association a process left open when it ended (crash, kill -9, OOM), closed at the next start; or a
    STOW-RS request (`stow`), whose row node.dicomweb opens like an association's."""

    id: str
    calling_ae: str
    called_ae: str
    peer: str

    @property
    def stow(self) -> bool:
        """A STOW-RS request's row: an HTTP request, which has no login or logout of its own."""
        return self.calling_ae == STOW_REQUEST_AE


class Index:
    """Index operations over one engine; ``clock`` returns epoch seconds (injected for tests)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time, node_id: str | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.node_id = node_id  # recorded on the associations this process opens; its crash cleanup's scope
        self._insert = insert_for(engine)
        self._statements = _Statements(self._insert)

    # -- associations ---------------------------------------------------------------------------------------
    def association_opened(self, assoc_id: str, calling_ae: str, called_ae: str, peer: str) -> None:
        self._write(
            associations.insert().values(
                id=assoc_id,
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer=peer,
                state=AssociationState.OPEN,
                opened_at=self.clock(),
                node_id=self.node_id,
            )
        )

    def association_closed(self, assoc_id: str, state: AssociationState) -> None:
        self._write(
            associations.update()
            .where(associations.c.id == assoc_id, associations.c.state == AssociationState.OPEN)
            .values(state=state, closed_at=self.clock())
        )

    def close_dangling_associations(self, *, prefix: str | None = None) -> int:
        """`abort_dangling_associations`, counted: how many it closed."""
        return len(self.abort_dangling_associations(prefix=prefix))

    def abort_dangling_associations(self, *, prefix: str | None = None) -> list[DanglingAssociation]:
        """Mark associations left open by a previous run of this process as aborted (run at start-up): those
        whose ``node_id`` is this index's (or starts with ``prefix``: every process of one node instance), and
        those without an owner (written before owners were recorded). Other nodes' rows on a shared database are
        left alone. Returns the rows it closed (in one statement: two processes starting at once never both
        claim one), for the audit trail's record of what each stored (`node.auditdb.audit_dangling_closed`)."""
        a = associations.c
        mine = a.node_id.startswith(prefix, autoescape=True) if prefix is not None else a.node_id == self.node_id
        with self._begin() as conn:
            rows = conn.execute(
                associations.update()
                .where(a.state == AssociationState.OPEN, sa.or_(mine, a.node_id.is_(None)))
                .values(state=AssociationState.ABORTED, closed_at=self.clock())
                .returning(a.id, a.calling_ae, a.called_ae, a.peer)
            ).all()
        return [DanglingAssociation(str(r.id), str(r.calling_ae), str(r.called_ae), str(r.peer)) for r in rows]

    def retime_open_series(self) -> int:
        """At start-up, restart the quiet timer of series still receiving: a sender may resume where it was cut
        off, and the time the node was down says nothing about whether the series is whole."""
        now = self.clock()
        with self._begin() as conn:
            result = conn.execute(
                series.update()
                .where(
                    series.c.state.in_([SeriesState.RECEIVING, SeriesState.REOPENED]),
                    series.c.last_received_at < now,
                )
                .values(last_received_at=now)
            )
            return int(result.rowcount or 0)

    # -- instances ------------------------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord) -> RecordOutcome:
        """Commit ``rec`` and its series' counters; raises `StoreFailedError` if the database fails."""
        return self.record_instances([rec])[0]

    def record_instances(self, recs: Sequence[InstanceRecord]) -> list[RecordOutcome]:
        """Commit ``recs`` (in order, as if recorded one after another) and their series' counters in one
        transaction; one outcome per record. Raises `StoreFailedError` if the database fails: then none is
        committed. The group commit (`node.durability`, `node.groupcommit`) calls this with one batch of
        concurrent associations' instances; the statements are built once (`_Statements`)."""
        if not recs:
            return []
        now = self.clock()
        st = self._statements
        try:
            with self.engine.begin() as conn:
                # The series upserts go first so the transaction holds the write lock before it reads; rows in
                # key order, so concurrent batches (PostgreSQL, several listeners) lock in the same order.
                conn.execute(st.upsert_series, _series_rows(recs, now))
                sops = sorted({r.sop_uid for r in recs})
                stored = {row.sop_uid: (row.sha256, row.series_uid)
                          for row in conn.execute(st.select_existing, {"sops": sops})}
                outcomes, deltas, rows = _walk(recs, dict(stored), now)
                if new := [row for sop, row in rows.items() if sop not in stored]:
                    conn.execute(st.insert_instance, new)
                if old := [{"b_sop": sop, **row} for sop, row in rows.items() if sop in stored]:
                    conn.execute(st.update_instance, old)
                if deltas:
                    conn.execute(st.count_and_reopen, [{"b_series": uid, "b_delta": delta, "b_now": now}
                                                       for uid, delta in sorted(deltas.items())])
            return outcomes
        except SQLAlchemyError as exc:
            first = recs[0].sop_uid if len(recs) == 1 else f"{len(recs)} instances"
            raise StoreFailedError(f"index write failed for {first}: {type(exc).__name__}") from exc

    # -- reads ----------------------------------------------------------------------------------------------
    def get_series(self, series_uid: str) -> sa.Row[Any] | None:
        return self._read_one(sa.select(series).where(series.c.series_uid == series_uid))

    def list_instances(self, series_uid: str) -> list[sa.Row[Any]]:
        with self._connect() as conn:
            stmt = sa.select(instances).where(instances.c.series_uid == series_uid).order_by(instances.c.sop_uid)
            return list(conn.execute(stmt))

    def get_instance(self, sop_uid: str) -> sa.Row[Any] | None:
        return self._read_one(sa.select(instances).where(instances.c.sop_uid == sop_uid))

    def sample_files(self, root: Path, spool_id: str | None, limit: int = 8) -> list[Path]:
        """Up to ``limit`` files the index holds in the spool at ``root`` (rows of ``spool_id``, or without one under
        ``root``), any ones: `node.spool` asks before it marks a root that has no marker. Raises `DatabaseError`."""
        prefix = f"{root}/"
        if spool_id is not None:
            where = instances.c.spool_id == spool_id
        else:
            where = sa.and_(instances.c.spool_id.is_(None),
                            sa.func.substr(instances.c.path, 1, len(prefix)) == prefix)
        with self._connect() as conn:
            paths = conn.execute(sa.select(instances.c.path).where(where).limit(limit)).scalars()
            return [root / p if spool_id is not None else Path(p) for p in paths]

    def get_association(self, assoc_id: str) -> sa.Row[Any] | None:
        return self._read_one(sa.select(associations).where(associations.c.id == assoc_id))

    def series_counts(self) -> dict[str, int]:
        """Number of series per state."""
        with self._connect() as conn:
            rows = conn.execute(sa.select(series.c.state, sa.func.count()).group_by(series.c.state))
            return {str(state): int(n) for state, n in rows}

    def route_counts(self) -> dict[str, int]:
        """Number of completed or ignored series per deciding route (built-in rules in brackets)."""
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(series.c.route, sa.func.count()).where(series.c.route.is_not(None)).group_by(series.c.route)
            )
            return {str(route): int(n) for route, n in rows}

    # -- plumbing -------------------------------------------------------------------------------------------
    def _read_one(self, stmt: sa.Select[Any]) -> sa.Row[Any] | None:
        with self._connect() as conn:
            return conn.execute(stmt).first()

    def _write(self, stmt: sa.Executable) -> None:
        with self._begin() as conn:
            conn.execute(stmt)

    def _connect(self) -> AbstractContextManager[sa.Connection]:
        return reading(self.engine, "index read failed")

    def _begin(self) -> AbstractContextManager[sa.Connection]:
        return transaction(self.engine, "index write failed")


# What an instance row is written from: the record's fields and the receive time (a column added to the table
# but not to `InstanceRecord` keeps its default).
_ROW_FIELDS = [f.name for f in fields(InstanceRecord)] + ["received_at"]


class _Statements:
    """The instance-recording statements, built once: executed with parameter lists (executemany), they skip
    SQLAlchemy's per-call statement construction (~0.8 ms of the ~2.7 ms an instance's index write took)."""

    def __init__(self, insert: Callable[..., Any]) -> None:
        upsert = insert(series)
        self.upsert_series = upsert.on_conflict_do_update(
            index_elements=[series.c.series_uid],
            set_={
                "last_received_at": upsert.excluded.last_received_at,
                "calling_ae": upsert.excluded.calling_ae,
                "last_association_id": upsert.excluded.last_association_id,
                "expected_count": sa.func.coalesce(upsert.excluded.expected_count, series.c.expected_count),
            },
        )
        self.select_existing = sa.select(instances.c.sop_uid, instances.c.sha256, instances.c.series_uid).where(
            instances.c.sop_uid.in_(sa.bindparam("sops", expanding=True))
        )
        self.insert_instance = instances.insert()
        self.update_instance = (
            instances.update()
            .where(instances.c.sop_uid == sa.bindparam("b_sop"))
            .values({c: sa.bindparam(c) for c in _ROW_FIELDS if c != "sop_uid"})
        )
        # Changed content re-opens a completed or ignored series (it is routed again; a result made for it gets
        # a new version).
        closed = sa.or_(*(series.c.state == state for state in _CLOSED))  # no IN: executemany can't expand it
        self.count_and_reopen = (
            series.update()
            .where(series.c.series_uid == sa.bindparam("b_series"))
            .values(
                instance_count=series.c.instance_count + sa.bindparam("b_delta"),
                state=sa.case((closed, SeriesState.REOPENED), else_=series.c.state),
                state_changed_at=sa.case((closed, sa.bindparam("b_now")), else_=series.c.state_changed_at),
            )
        )


def _series_rows(recs: Sequence[InstanceRecord], now: float) -> list[dict[str, Any]]:
    """One upsert row per series, as the records in order would leave it: the last record's AE and association,
    the last expected count given (an instance without one keeps the series' count)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in recs:
        row = rows.setdefault(rec.series_uid, {
            "series_uid": rec.series_uid, "study_uid": rec.study_uid, "modality": rec.modality,
            "state": SeriesState.RECEIVING, "instance_count": 0, "expected_count": None,
            "first_received_at": now, "last_received_at": now, "state_changed_at": now,
        })
        row["calling_ae"] = rec.calling_ae
        row["last_association_id"] = rec.association_id
        if rec.images_in_acquisition is not None:
            row["expected_count"] = rec.images_in_acquisition
    return [rows[uid] for uid in sorted(rows)]


def _walk(
    recs: Sequence[InstanceRecord], current: dict[str, tuple[str, str]], now: float
) -> tuple[list[RecordOutcome], dict[str, int], dict[str, dict[str, Any]]]:
    """Decide each record's outcome against ``current`` (sop → (sha256, series) stored so far, updated as the
    records are walked); return the outcomes, the count change per series to re-open (0: content changed in
    place), and the final row per SOP Instance UID."""
    outcomes: list[RecordOutcome] = []
    deltas: dict[str, int] = {}
    rows: dict[str, dict[str, Any]] = {}
    for rec in recs:
        old = current.get(rec.sop_uid)
        if old is None:
            outcomes.append(RecordOutcome.NEW)
            deltas[rec.series_uid] = deltas.get(rec.series_uid, 0) + 1
        elif old[1] != rec.series_uid:
            outcomes.append(RecordOutcome.REPLACED)
            deltas[old[1]] = deltas.get(old[1], 0) - 1
            deltas[rec.series_uid] = deltas.get(rec.series_uid, 0) + 1
        elif old[0] == rec.sha256:
            outcomes.append(RecordOutcome.DUPLICATE)
        else:
            outcomes.append(RecordOutcome.REPLACED)
            deltas.setdefault(rec.series_uid, 0)
        current[rec.sop_uid] = (rec.sha256, rec.series_uid)
        rows[rec.sop_uid] = dict(rec.__dict__, received_at=now)
    return outcomes, deltas, rows
