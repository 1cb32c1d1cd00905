"""The index: SQL rows for associations, series and instances (SQLAlchemy Core, SQLite or PostgreSQL).

`Index.record_instance(rec)` commits one instance row and updates its series in a single transaction and tells
whether the instance was new, an identical duplicate, or a conflicting re-send kept as the latest. The receive
path calls it after the spool write and before answering Success. Series rows start (or re-open) here; the
completion stage moves them on. Database errors become `StoreFailedError` (C-STORE 0xA701) or `DatabaseError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.db import insert_for, reading, transaction
from node.errors import StoreFailedError
from node.schema import associations, instances, series  # noqa: F401 - re-exported: the stages' old import path
from node.states import AssociationState, SeriesState

_CLOSED = (SeriesState.COMPLETE, SeriesState.IGNORED)


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


class Index:
    """Index operations over one engine; ``clock`` returns epoch seconds (injected for tests)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time, node_id: str | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.node_id = node_id  # recorded on the associations this process opens; its crash cleanup's scope
        self._insert = insert_for(engine)

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
        """Mark associations left open by a previous run of this process as aborted (run at start-up): those
        whose ``node_id`` is this index's (or starts with ``prefix``: every process of one node instance), and
        those without an owner (written before owners were recorded). Other nodes' rows on a shared database are
        left alone. Returns how many."""
        owner = associations.c.node_id
        mine = owner.startswith(prefix, autoescape=True) if prefix is not None else owner == self.node_id
        with self._begin() as conn:
            result = conn.execute(
                associations.update()
                .where(associations.c.state == AssociationState.OPEN, sa.or_(mine, owner.is_(None)))
                .values(state=AssociationState.ABORTED, closed_at=self.clock())
            )
            return int(result.rowcount or 0)

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
        now = self.clock()
        row = {k: v for k, v in rec.__dict__.items()} | {"received_at": now}
        expected = rec.images_in_acquisition
        try:
            with self.engine.begin() as conn:
                # The series upsert goes first so the transaction holds the write lock before it reads.
                ins = self._insert(series).values(
                    series_uid=rec.series_uid,
                    study_uid=rec.study_uid,
                    modality=rec.modality,
                    state=SeriesState.RECEIVING,
                    instance_count=0,
                    expected_count=expected,
                    first_received_at=now,
                    last_received_at=now,
                    calling_ae=rec.calling_ae,
                    last_association_id=rec.association_id,
                    state_changed_at=now,
                )
                conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=[series.c.series_uid],
                        set_={
                            "last_received_at": now,
                            "calling_ae": rec.calling_ae,
                            "last_association_id": rec.association_id,
                            "expected_count": sa.func.coalesce(expected, series.c.expected_count),
                        },
                    )
                )
                old = conn.execute(
                    sa.select(instances.c.sha256, instances.c.series_uid).where(instances.c.sop_uid == rec.sop_uid)
                ).first()
                if old is None:
                    conn.execute(instances.insert().values(**row))
                    self._count_and_reopen(conn, rec.series_uid, +1, now)
                    return RecordOutcome.NEW
                conn.execute(instances.update().where(instances.c.sop_uid == rec.sop_uid).values(**row))
                if old.series_uid != rec.series_uid:
                    self._count_and_reopen(conn, old.series_uid, -1, now)
                    self._count_and_reopen(conn, rec.series_uid, +1, now)
                    return RecordOutcome.REPLACED
                if old.sha256 == rec.sha256:
                    return RecordOutcome.DUPLICATE
                self._count_and_reopen(conn, rec.series_uid, 0, now)
                return RecordOutcome.REPLACED
        except SQLAlchemyError as exc:
            raise StoreFailedError(f"index write failed for {rec.sop_uid}: {type(exc).__name__}") from exc

    def _count_and_reopen(self, conn: sa.Connection, series_uid: str, delta: int, now: float) -> None:
        """Changed content re-opens a completed or ignored series (it is routed again; a result made for it
        gets a new version)."""
        conn.execute(
            series.update()
            .where(series.c.series_uid == series_uid)
            .values(
                instance_count=series.c.instance_count + delta,
                state=sa.case(
                    (series.c.state.in_(_CLOSED), SeriesState.REOPENED),
                    else_=series.c.state,
                ),
                state_changed_at=sa.case(
                    (series.c.state.in_(_CLOSED), now),
                    else_=series.c.state_changed_at,
                ),
            )
        )

    # -- reads ----------------------------------------------------------------------------------------------
    def get_series(self, series_uid: str) -> sa.Row[Any] | None:
        return self._read_one(sa.select(series).where(series.c.series_uid == series_uid))

    def list_instances(self, series_uid: str) -> list[sa.Row[Any]]:
        with self._connect() as conn:
            stmt = sa.select(instances).where(instances.c.series_uid == series_uid).order_by(instances.c.sop_uid)
            return list(conn.execute(stmt))

    def get_instance(self, sop_uid: str) -> sa.Row[Any] | None:
        return self._read_one(sa.select(instances).where(instances.c.sop_uid == sop_uid))

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
