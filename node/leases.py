"""Leased work: the one claim/lease/finish scheme under both the job queue (`node.queue`) and the deliveries
(`node.dispatch`).

A leased table has the columns ``id``, ``state``, ``holder``, ``lease_until``, ``due_at``, ``attempts`` and
``last_error`` (`node.schema`) and three states of its own: *waiting* (due at ``due_at``), *held* (``holder``
works on it until ``lease_until``) and *dead*. `Leases` is the only code that moves a row between them:

- `claim` takes the first due row — waiting with ``due_at`` reached, or held with its lease run out (the holder
  died) — in one guarded ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) AND <still due> RETURNING``: on PostgreSQL
  the inner SELECT is ``FOR UPDATE SKIP LOCKED``, so concurrent claimers take different rows without waiting on
  each other; on SQLite the UPDATE is one statement that holds the database's write lock from its first read to
  its write (the busy timeout queues claimers), and its re-checked condition is the compare-and-set. Each claim
  counts an attempt. A cheap read comes first, so idle polls never take a write lock.
- `extend` (the heartbeat), `finish`, `retry_later` and `dead_letter` act only while the caller still holds the
  lease — same holder, same attempt — and say whether they did; a holder whose lease ran out and was taken over
  learns it there and drops its outcome.
- `reap` dead-letters held rows whose lease ran out ``max_attempts`` times (a job that kills its worker each
  time), `expire` any rows past a caller's give-up condition (deliveries queued too long); `release` is crash
  cleanup: rows of the caller's own earlier process (``holder`` prefix) or with an
  expired lease go back to waiting, never another live holder's.
- `backoff` is the retry delay: capped exponential with full jitter.

One error policy: every database failure surfaces as `DatabaseError` naming the table and the operation; error
texts stored in ``last_error`` are cut to `MAX_ERROR_CHARS`.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.db import reading, transaction

MAX_ERROR_CHARS = 2000


def holder_id(component: str, identity: str | None = None) -> str:
    """A lease holder's name, ``<identity>:<component>:<pid>:<random>`` (≤ 64 characters). ``identity`` names the
    node (default: the host name); `Leases.release` with `own_prefix` of the same identity and component takes
    back what an earlier process of this node left held."""
    return f"{own_prefix(component, identity)}{os.getpid()}:{uuid.uuid4().hex[:8]}"[:64]


def own_prefix(component: str, identity: str | None = None) -> str:
    """The holder prefix every process of this node's ``component`` shares (see `holder_id`)."""
    return f"{(identity or socket.gethostname())[:32]}:{component[:12]}:"


def backoff(attempts: int, initial: float, maximum: float, rng: Callable[[], float]) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: full jitter, ``rng() * min(maximum, initial *
    2**(attempts-1))``."""
    exponent = min(max(attempts, 1) - 1, 64)
    return rng() * min(maximum, initial * 2.0**exponent)


def cut(error: str) -> str:
    """An error text as stored in ``last_error``."""
    return error[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class Lease:
    """What a holder holds: the row, who, and which attempt (a re-claim by the same holder is another lease)."""

    id: int
    holder: str
    attempts: int


class Leases:
    """Lease operations on one table; ``clock`` returns epoch seconds (injected in tests)."""

    def __init__(self, engine: Engine, table: sa.Table, *, waiting: str, held: str, dead: str,
                 clock: Callable[[], float] = time.time) -> None:
        missing = {"id", "state", "holder", "lease_until", "due_at", "attempts", "last_error"} - set(table.c.keys())
        if missing:
            raise ValueError(f"table {table.name} lacks the lease columns {sorted(missing)}")
        self.engine = engine
        self.table = table
        self.waiting, self.held, self.dead = waiting, held, dead
        self.clock = clock

    # -- conditions -------------------------------------------------------------------------------------------
    def due(self, now: float, max_attempts: int | None = None) -> sa.ColumnElement[bool]:
        """Rows a claim may take at ``now``: waiting and due, or held with an expired lease (and, with
        ``max_attempts``, fewer attempts than that: `reap` takes the others)."""
        c = self.table.c
        expired = sa.and_(c.state == self.held, c.lease_until <= now)
        if max_attempts is not None:
            expired = sa.and_(expired, c.attempts < max_attempts)
        return sa.or_(sa.and_(c.state == self.waiting, c.due_at <= now), expired)

    def holds(self, lease: Lease) -> sa.ColumnElement[bool]:
        """The row is still ``lease``'s: held, by its holder, at its attempt."""
        c = self.table.c
        return sa.and_(c.id == lease.id, c.state == self.held, c.holder == lease.holder,
                       c.attempts == lease.attempts)

    # -- claiming ---------------------------------------------------------------------------------------------
    def claim(self, holder: str, lease_seconds: float, *, order_by: Iterable[sa.ColumnElement[Any]],
              where: sa.ColumnElement[bool] | None = None, values: dict[str, Any] | None = None,
              max_attempts: int | None = None, conn: sa.Connection | None = None) -> sa.Row[Any] | None:
        """Lease the first due row in ``order_by`` order (narrowed by ``where``) to ``holder`` for
        ``lease_seconds``, setting ``values`` too (SQL expressions see the row before the claim); returns the
        claimed row as it is now (``attempts`` counted), or None when nothing is due or another claimer won
        the row (look again). With ``conn`` the claim is part of the caller's transaction."""
        now = self.clock()
        t = self.table
        due = self.due(now, max_attempts)
        if where is not None:
            due = sa.and_(due, where)
        with reading(self.engine, f"{t.name}: claim") as probe:  # a read first: idle polls take no write lock
            if probe.execute(sa.select(t.c.id).where(due).limit(1)).first() is None:
                return None
        pick = (sa.select(t.c.id).where(due).order_by(*order_by).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())
        stmt = (
            t.update()
            .where(t.c.id == pick, due)
            .values(state=self.held, holder=holder, lease_until=now + lease_seconds, attempts=t.c.attempts + 1,
                    **(values or {}))
            .returning(*t.c)
        )
        with transaction(self.engine, f"{t.name}: claim", conn) as c:
            return c.execute(stmt).first()

    def reap(self, max_attempts: int, reason: Callable[[sa.Row[Any]], str],
             **values: Any) -> list[sa.Row[Any]]:
        """Dead-letter held rows whose lease expired with ``max_attempts`` attempts spent (the holder died each
        time); ``reason(row)`` is stored as ``last_error``. Returns the rows dead-lettered."""
        c = self.table.c
        lost = sa.and_(c.state == self.held, c.lease_until <= self.clock(), c.attempts >= max_attempts)
        return self.expire(lost, reason, **values)

    def expire(self, cond: sa.ColumnElement[bool], reason: Callable[[sa.Row[Any]], str],
               **values: Any) -> list[sa.Row[Any]]:
        """Dead-letter every row matching ``cond`` (a condition no live lease can meet: a held row is taken only
        with an expired lease), each with ``reason(row)`` as ``last_error``, re-checking ``cond`` as it writes;
        returns the rows dead-lettered, in id order. Nothing is written when no row matches (a read first)."""
        t = self.table
        with reading(self.engine, f"{t.name}: expire") as probe:
            rows = list(probe.execute(sa.select(t).where(cond).order_by(t.c.id)))
        if not rows:
            return []
        expired = []
        with transaction(self.engine, f"{t.name}: expire") as conn:
            for row in rows:
                done = conn.execute(
                    t.update().where(t.c.id == row.id, t.c.attempts == row.attempts, cond)
                    .values(state=self.dead, holder=None, lease_until=None, last_error=cut(reason(row)), **values)
                ).rowcount
                if done:
                    expired.append(row)
        return expired

    # -- while held -------------------------------------------------------------------------------------------
    def extend(self, lease: Lease, seconds: float, conn: sa.Connection | None = None) -> bool:
        """The heartbeat: the lease runs ``seconds`` from now; False if it is no longer held."""
        return self._update(lease, conn, "extend", lease_until=self.clock() + seconds)

    def finish(self, lease: Lease, state: str, conn: sa.Connection | None = None, **values: Any) -> bool:
        """End the lease in ``state`` with ``values``; False (nothing written) if it is no longer held."""
        return self._update(lease, conn, "finish", state=state, holder=None, lease_until=None, **values)

    def retry_later(self, lease: Lease, delay: float, error: str, conn: sa.Connection | None = None,
                    **values: Any) -> bool:
        """Back to waiting, due in ``delay`` seconds, with ``error``; False if the lease is no longer held."""
        return self.finish(lease, self.waiting, conn, due_at=self.clock() + delay, last_error=cut(error), **values)

    def dead_letter(self, lease: Lease, error: str, conn: sa.Connection | None = None, **values: Any) -> bool:
        """Dead with ``error`` (replayed only by an operator); False if the lease is no longer held."""
        return self.finish(lease, self.dead, conn, last_error=cut(error), **values)

    # -- operations -------------------------------------------------------------------------------------------
    def release(self, *, own_prefix: str | None = None, everything: bool = False,
                where: sa.ColumnElement[bool] | None = None) -> int:
        """Crash cleanup: held rows whose lease expired — and, with ``own_prefix``, those held by an earlier
        process of this node (`holder_id`) — go back to waiting, due now. ``everything`` takes every held row
        (only for a node that knows it is the database's one user); ``where`` narrows it. Returns how many."""
        now = self.clock()
        c = self.table.c
        cond: sa.ColumnElement[bool] = c.state == self.held if where is None else sa.and_(c.state == self.held, where)
        if not everything:
            mine = [c.lease_until.is_(None), c.lease_until <= now]
            if own_prefix:
                mine.append(c.holder.startswith(own_prefix, autoescape=True))
            cond = sa.and_(cond, sa.or_(*mine))
        with reading(self.engine, f"{self.table.name}: release") as probe:  # a sweep's idle poll: no write lock
            if probe.execute(sa.select(c.id).where(cond).limit(1)).first() is None:
                return 0
        with transaction(self.engine, f"{self.table.name}: release") as conn:
            stmt = self.table.update().where(cond).values(state=self.waiting, due_at=now, holder=None,
                                                          lease_until=None)
            return int(conn.execute(stmt).rowcount or 0)

    def replay(self, cond: sa.ColumnElement[bool], states: Iterable[str] | None = None, **values: Any) -> int:
        """Put rows in ``states`` (default: dead) matching ``cond`` back to waiting, due now, with a fresh attempt
        budget and ``values``; returns how many."""
        c = self.table.c
        wanted = list(states) if states is not None else [self.dead]
        with transaction(self.engine, f"{self.table.name}: replay") as conn:
            stmt = self.table.update().where(c.state.in_(wanted), cond).values(
                state=self.waiting, attempts=0, due_at=self.clock(), holder=None, lease_until=None, **values)
            return int(conn.execute(stmt).rowcount or 0)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _update(self, lease: Lease, conn: sa.Connection | None, what: str, **values: Any) -> bool:
        with self._writing(conn, what) as c:
            return c.execute(self.table.update().where(self.holds(lease)).values(**values)).rowcount == 1

    @contextmanager
    def _writing(self, conn: sa.Connection | None, what: str) -> Iterator[sa.Connection]:
        with transaction(self.engine, f"{self.table.name}: {what}", conn) as c:
            yield c
