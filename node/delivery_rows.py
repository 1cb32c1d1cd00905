"""The deliveries table's rows seen from outside the state machine: the payload codec (result files and their SOP
Instance UIDs as two JSON lists) and the read-only queries `node.dispatch.Dispatcher` answers for status, /admin
and tests, which rows a newer version of the same series supersedes, and `make_due` (a destination's waiting
rows due now). Nothing here claims or finishes a delivery (`node.dispatch` does, through `node.leases`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.db import reading
from node.leases import cut
from node.schema import commitments, deliveries, results
from node.states import CommitState, DeliveryState


def checked_payload(
    series_uid: object, version: object, files: Sequence[Path], sop_uids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """`Dispatcher.enqueue`'s arguments checked: the files as path strings and their SOP Instance UIDs; raises
    `ValueError` naming the bad argument."""
    if not isinstance(series_uid, str) or not 0 < len(series_uid) <= 64:
        raise ValueError(f"series_uid must be a UID string of 1-64 characters, got {series_uid!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")
    paths = [str(Path(f)) for f in files]
    uids = [str(u) for u in sop_uids]
    if not paths:
        raise ValueError("files must name at least one result file")
    if len(uids) != len(paths) or not all(uids):
        raise ValueError(f"sop_uids must name one SOP Instance UID per file ({len(paths)}), got {uids!r}")
    return paths, uids


NOT_CONFIGURED = "destination not configured"  # a reload removed (or renamed) the row's destination


def give_up_reason(seconds: float, last_error: str | None, configured: bool) -> str:
    """The dead letter of a row given up after ``seconds``: its last error, or when its destination is no longer
    ``configured`` that first (what the operator must act on), with the send error from before the reload after."""
    last = last_error or ("none (not attempted)" if configured else NOT_CONFIGURED)
    if not configured and not last.startswith(NOT_CONFIGURED):
        last = f"{NOT_CONFIGURED} (removed by a reload; before it: {last})"
    return cut(f"gave up after {seconds:g} s; last error: {last}")


def decode_payload(files: str, sop_uids: str) -> tuple[tuple[Path, ...], tuple[str, ...]] | None:
    """A row's files and SOP instance UIDs, or None when they are not two equally long JSON lists of strings."""
    try:
        paths, uids = json.loads(files), json.loads(sop_uids)
    except (TypeError, ValueError):
        return None
    lists = isinstance(paths, list) and isinstance(uids, list) and len(paths) == len(uids) > 0
    if not lists or not all(isinstance(v, str) for v in [*paths, *uids]):
        return None
    return tuple(Path(p) for p in paths), tuple(uids)



def counts(engine: Engine) -> dict[tuple[str, str], int]:
    """Number of deliveries per (destination, state)."""
    d = deliveries.c
    with reading(engine, "deliveries") as conn:
        stmt = sa.select(d.destination, d.state, sa.func.count()).group_by(d.destination, d.state)
        return {(str(dest), str(state)): int(n) for dest, state, n in conn.execute(stmt)}


def last_errors(engine: Engine, limit: int) -> list[sa.Row[Any]]:
    """Undelivered rows with an error, most recently attempted first."""
    d = deliveries.c
    stmt = (
        sa.select(
            d.id, d.series_uid, d.version, d.destination, d.state, d.attempts,
            d.last_attempt_at, d.due_at, d.last_error,
        )
        .where(d.last_error.is_not(None), d.state != DeliveryState.DELIVERED.value)
        .order_by(sa.func.coalesce(d.last_attempt_at, d.created_at).desc(), d.id.desc())
        .limit(limit)
    )
    with reading(engine, "deliveries") as conn:
        return list(conn.execute(stmt))


def get(engine: Engine, delivery_id: int) -> sa.Row[Any] | None:
    with reading(engine, "deliveries") as conn:
        return conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).first()


def for_series(engine: Engine, series_uid: str) -> list[sa.Row[Any]]:
    """Every delivery of every version of ``series_uid``, oldest first."""
    d = deliveries.c
    with reading(engine, "deliveries") as conn:
        return list(conn.execute(sa.select(deliveries).where(d.series_uid == series_uid).order_by(d.id)))


def newer_version(conn: sa.Connection, series_uid: str, version: int) -> int | None:
    """The newest version of ``series_uid`` after ``version`` with a delivery or recorded results, else None. Such a
    row's objects were withdrawn, or are about to be, by that version's rejection note (node.versions): sent after
    it, they would be live again at the PACS. A newer version queued to other destinations only, or to none
    (the row's destination was out of the config when it was made), supersedes it too: sent, its verdict would be live
    there and never withdrawn."""
    newest = int(conn.execute(sa.select(_newest(series_uid))).scalar_one())
    return None if newest <= version else newest


def _newest(series_uid: Any) -> sa.ColumnElement[Any]:
    """The series' newest version with a delivery or recorded results (a version made while no destination was
    configured has no delivery: its results supersede the versions before it all the same); -1 without either."""
    d, r = deliveries.alias("newest_delivery").c, results.c
    by_delivery = sa.func.coalesce(sa.select(sa.func.max(d.version)).where(d.series_uid == series_uid)
                                   .scalar_subquery(), -1)
    by_result = sa.func.coalesce(sa.select(sa.func.max(r.version)).where(r.series_uid == series_uid)
                                 .scalar_subquery(), -1)
    return sa.case((by_delivery >= by_result, by_delivery), else_=by_result)


def unconfirmed() -> sa.ColumnElement[bool]:
    """Delivered rows whose storage commitment failed or timed out: the PACS did not confirm it holds them, so a
    retry sends them again (and a new commitment is asked for once they are stored)."""
    bad = (CommitState.FAILED.value, CommitState.TIMED_OUT.value)
    return deliveries.c.id.in_(sa.select(commitments.c.delivery_id).where(commitments.c.state.in_(bad)))


def not_superseded() -> sa.ColumnElement[bool]:
    """Rows with no newer version of their series (a delivery to any destination, or results: `newer_version`)."""
    d = deliveries.c
    return _newest(d.series_uid) <= d.version


def no_older_in_flight(now: float) -> sa.ColumnElement[bool]:
    """Rows with no delivery of an older version of their series to the same destination still waiting or being
    sent at ``now`` (held under a live lease, by another dispatcher on a shared database): sent meanwhile, this
    version's rejection note would reach the PACS before the objects it withdraws. A waiting older row blocks too:
    under PostgreSQL's READ COMMITTED another dispatcher's claim of it, not yet committed, still reads as waiting.
    `supersede_waiting` dead-letters waiting older rows first, so only a claim in flight holds a newer row up."""
    d, older = deliveries.c, deliveries.alias("older").c
    in_flight = sa.or_(older.state == DeliveryState.PENDING.value,
                       sa.and_(older.state == DeliveryState.SENDING.value, older.lease_until > now))
    return ~sa.exists().where(older.series_uid == d.series_uid, older.destination == d.destination,
                              older.version < d.version, in_flight)


def supersede_waiting(conn: sa.Connection, destination: str, now: float) -> list[Any]:
    """Dead-letter the waiting deliveries to ``destination`` whose series has a newer version (a delivery to any
    destination, or results: `newer_version`) ("superseded": never to be sent after that one); returns them (id,
    series_uid, version, newest). A row another dispatcher is claiming at this moment is locked by it and, once claimed, no
    longer waiting: left alone."""
    d = deliveries.c
    newest = _newest(d.series_uid)
    stale = sa.and_(d.destination == destination, d.state == DeliveryState.PENDING.value, newest > d.version)
    rows = conn.execute(sa.select(d.id, d.series_uid, d.version, newest.label("newest")).where(stale)).all()
    for r in rows:
        conn.execute(deliveries.update().where(d.id == r.id, stale).values(
            state=DeliveryState.DEAD.value, holder=None, lease_until=None, last_attempt_at=now,
            last_error=f"superseded by version {r.newest} of the series"))
    return list(rows)


def make_due(conn: sa.Connection, destination: str, now: float) -> int:
    """Make the waiting deliveries to ``destination`` due at ``now`` (it recovered, or a reload re-pointed it);
    returns how many were waiting out a backoff."""
    d = deliveries.c
    return int(conn.execute(deliveries.update().values(due_at=now).where(
        d.destination == destination, d.state == DeliveryState.PENDING.value, d.due_at > now)).rowcount or 0)
