"""Dispatch: deliver each result set (SR, SEG files) to every configured destination, retrying, then dead-lettering.

`Dispatcher.enqueue` records one `deliveries` row per destination (inside the worker's transaction when given its
connection). `run_once` — or the background loop, one thread per destination (`start`/`wake`/`stop`) — claims due
rows atomically (pending → sending, with a lease) and hands their files to the `Sender` registered for the
destination's kind. A `TransientSendError` (peer down or busy, association refused or lost) retries after a capped
exponential backoff with full jitter until ``give_up_after_seconds``; a `PermanentSendError` (the peer refuses the
objects themselves) dead-letters at once with the reason; `retry` replays dead rows. After a transient failure the
destination backs off as a whole (in this process): until the failed row is due again only rows queued since are
tried, and the first success makes its backed-off rows due at once. Result files are only read. This module is
the only writer of delivery state.

The senders (the destination seam, keyed by the config's ``kind``) and their errors (`TransientSendError`,
`PermanentSendError`) live in `node.senders`; import them from there.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.config import DestinationKind, DispatchSection, NodeConfig
from node.db import insert_for, metadata, reading, transaction
from node.errors import DatabaseError, SendError
from node.logs import get_logger
from node.senders import (
    PermanentSendError,
    Sender,
)
from node.states import DeliveryState
from node.supervise import Heartbeats, failure

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("destination", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("files", sa.Text, nullable=False),  # JSON list of Part 10 paths, in sending order
    sa.Column("sop_uids", sa.Text, nullable=False),  # JSON list, sop_uids[i] is the instance in files[i]
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float, nullable=False),  # enqueue or last `retry`: the give-up clock's start
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_attempt_at", sa.Float),
    sa.Column("delivered_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("claimed_by", sa.String(64)),  # the dispatcher sending it (state sending)
    sa.Column("lease_until", sa.Float),  # past this, a sending row is presumed orphaned and may be reclaimed
    sa.UniqueConstraint("series_uid", "version", "destination", name="uq_deliveries_result_destination"),
    sa.Index("ix_deliveries_due", "destination", "state", "next_attempt_at"),
)

_MAX_ERROR_CHARS = 2000
_MAX_ERROR_BACKOFF = 30.0  # seconds between a loop's turns while every turn fails (e.g. the database is down)
SWEEP_LOOP = "dispatch-sweep"  # loop names in the heartbeat registry; a destination's is "dispatch:<name>"


def _loop_name(destination: str) -> str:
    return f"dispatch:{destination}"


# -- the dispatcher -----------------------------------------------------------------------------------------------


def backoff_delay(attempts: int, settings: DispatchSection, rng: Callable[[], float]) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: full jitter, ``rng() * min(max, initial *
    2**(attempts-1))``."""
    exponent = min(max(attempts, 1) - 1, 64)
    return rng() * min(settings.max_backoff_seconds, settings.initial_backoff_seconds * 2.0**exponent)


@dataclass(frozen=True)
class _Claimed:
    id: int
    series_uid: str
    version: int
    destination: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    attempts: int
    queued_at: float


class _Next(Enum):
    CONTINUE = "continue"  # delivered or dead-lettered: go on with the destination's next row
    BACK_OFF = "back_off"  # transient failure: the destination is probably down, leave the rest for later


@dataclass
class _DestinationThread:
    """One destination's delivery thread and the events that wake and stop it (not a `node.worker.Worker`)."""

    name: str
    thread: threading.Thread | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


def _running(worker: _DestinationThread) -> bool:
    return worker.thread is not None and worker.thread.is_alive()


def _checked_payload(
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


def _payload(files: str, sop_uids: str) -> tuple[tuple[Path, ...], tuple[str, ...]] | None:
    """A row's files and SOP instance UIDs, or None when they are not two equally long JSON lists of strings."""
    try:
        paths, uids = json.loads(files), json.loads(sop_uids)
    except (TypeError, ValueError):
        return None
    lists = isinstance(paths, list) and isinstance(uids, list) and len(paths) == len(uids) > 0
    if not lists or not all(isinstance(v, str) for v in [*paths, *uids]):
        return None
    return tuple(Path(p) for p in paths), tuple(uids)


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


class Dispatcher:
    """Delivery of result sets to the configured destinations; see the module docstring.

    ``clock`` returns epoch seconds (all timestamps and due times), ``rng`` a float in [0, 1) (backoff jitter);
    both are injected for tests. Database failures raise `DatabaseError`.
    """

    def __init__(
        self,
        config: NodeConfig,
        engine: Engine,
        senders: Mapping[DestinationKind, Sender],
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        on_delivered: Callable[[str, int, str], None] | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(config).__name__}")
        self._config = config
        self._engine = engine
        self._senders = self._checked(senders)
        self._clock = clock
        self._rng = rng
        self._on_delivered = on_delivered  # (series_uid, version, destination): metrics only, never raises through
        self._token = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._log = get_logger(component="dispatch")
        self._lock = threading.Lock()  # start/stop/apply_config and the worker set
        self._pause_lock = threading.Lock()
        self._paused: dict[str, tuple[float, float]] = {}  # destination -> (failed_at, until)
        self._workers: dict[str, _DestinationThread] = {}
        self._sweeper: threading.Thread | None = None
        self._running = False
        self._stopping = threading.Event()
        self._insert = insert_for(engine)
        self._heartbeats = heartbeats or Heartbeats()

    @staticmethod
    def _checked(senders: Mapping[DestinationKind, Sender]) -> dict[DestinationKind, Sender]:
        for kind, sender in senders.items():
            if not isinstance(kind, DestinationKind):
                raise TypeError(f"senders keys must be DestinationKind values, got {kind!r}")
            if not isinstance(sender, Sender):
                raise TypeError(f"senders[{kind.value!r}] must be a Sender, got {type(sender).__name__}")
        return dict(senders)

    @property
    def config(self) -> NodeConfig:
        return self._config

    # -- queueing -------------------------------------------------------------------------------------------------
    def enqueue(
        self,
        series_uid: str,
        version: int,
        files: Sequence[Path],
        sop_uids: Sequence[str],
        conn: sa.Connection | None = None,
    ) -> list[int]:
        """Queue one pending delivery of ``files`` (``sop_uids[i]`` is the instance in ``files[i]``) per configured
        destination and return their ids, in the config's destination order.

        With ``conn`` the rows are written in the caller's transaction (call `wake` after it commits); without, they
        are committed here and the loop is woken. Queueing the same (series, version) with the same files again
        returns the existing rows unchanged; with other files it replaces their payload and makes them pending.
        Raises `ValueError` for bad arguments, `DatabaseError` if the database fails.
        """
        paths, uids = _checked_payload(series_uid, version, files, sop_uids)
        config = self._config
        log = self._log.bind(series_uid=series_uid, version=version, sop_uids=uids)
        if not config.destinations:
            log.warning("delivery_no_destinations")
            return []
        now = self._clock()
        rows = [
            dict(
                series_uid=series_uid,
                version=version,
                destination=d.name,
                kind=d.kind.value,
                files=json.dumps(paths),
                sop_uids=json.dumps(uids),
                state=DeliveryState.PENDING.value,
                attempts=0,
                created_at=now,
                queued_at=now,
                next_attempt_at=now,
            )
            for d in config.destinations
        ]
        names = [d.name for d in config.destinations]
        d = deliveries.c
        with self._transaction(conn) as c:
            for row in rows:
                self._upsert(c, row, now)
            found = {
                r.destination: r.id
                for r in c.execute(
                    sa.select(d.destination, d.id).where(
                        d.series_uid == series_uid, d.version == version, d.destination.in_(names)
                    )
                )
            }
        ids = [int(found[name]) for name in names]
        log.info("delivery_queued", delivery_ids=ids, destinations=names)
        if conn is None:
            self.wake()
        return ids

    def _upsert(self, c: sa.Connection, row: dict[str, Any], now: float) -> None:
        """Insert one pending delivery row. Same files again (a crash re-run: deterministic UIDs) leave an existing
        row as it is; other files for the same version (e.g. real results after a "processing failed" report, on a
        replayed job) replace the row's payload and send it afresh."""
        ins = self._insert(deliveries).values(**row)
        c.execute(
            ins.on_conflict_do_update(
                index_elements=["series_uid", "version", "destination"],
                set_={
                    "files": ins.excluded.files,
                    "sop_uids": ins.excluded.sop_uids,
                    "state": DeliveryState.PENDING.value,
                    "attempts": 0,
                    "queued_at": now,
                    "next_attempt_at": now,
                    "last_error": None,
                    "delivered_at": None,
                },
                where=deliveries.c.files != ins.excluded.files,
            )
        )

    # -- sending --------------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Dead-letter rows past their give-up time, then send every due delivery, each destination in its own
        thread (a slow or failing destination never holds up another). Returns how many were attempted."""
        self._sweep()
        names = [d.name for d in self._config.destinations]
        if len(names) <= 1:
            return sum(self._drain(name, self._stopping) for name in names)
        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="pacsnode-dispatch") as pool:
            return sum(pool.map(lambda name: self._drain(name, self._stopping), names))

    def _drain(self, name: str, stop: threading.Event, beat: Callable[[float], None] | None = None) -> int:
        """Send ``name``'s due deliveries in order until none is due or one fails transiently; ``beat(seconds)``
        is called before each send with the longest it may take (its lease)."""
        handled = 0
        while not (stop.is_set() or self._stopping.is_set()):
            claimed = self._claim(name)
            if claimed is None:
                break
            handled += 1
            if beat is not None:
                beat(self._lease_seconds(len(claimed.files)))
            if self._attempt(claimed) is _Next.BACK_OFF:
                break
        return handled

    def _claim(self, name: str) -> _Claimed | None:
        """Atomically move the destination's next due row to `sending` under this dispatcher's lease.

        Due: pending with next_attempt_at reached, or sending with an expired lease (its dispatcher died). While the
        destination backs off after a failure, only rows queued after that failure are due. The UPDATE re-checks
        the condition its subquery read, so two dispatchers never claim one row (SKIP LOCKED on PostgreSQL).
        """
        now = self._clock()
        d = deliveries.c
        due = sa.or_(
            sa.and_(d.state == DeliveryState.PENDING.value, d.next_attempt_at <= now),
            sa.and_(d.state == DeliveryState.SENDING.value, d.lease_until <= now),
        )
        with self._pause_lock:
            pause = self._paused.get(name)
        if pause is not None and now < pause[1]:
            due = sa.and_(due, d.queued_at > pause[0])
        try:
            with self._engine.connect() as conn:  # a read first: idle polls never take the write lock
                if conn.execute(sa.select(d.id).where(d.destination == name, due).limit(1)).first() is None:
                    return None
            with self._engine.begin() as conn:
                pick = (
                    sa.select(d.id)
                    .where(d.destination == name, due)
                    .order_by(d.next_attempt_at, d.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                    .scalar_subquery()
                )
                row = conn.execute(
                    deliveries.update()
                    .where(d.id == pick, due)
                    .values(
                        state=DeliveryState.SENDING.value,
                        attempts=d.attempts + 1,
                        last_attempt_at=now,
                        claimed_by=self._token,
                    )
                    .returning(d.id, d.series_uid, d.version, d.files, d.sop_uids, d.attempts, d.queued_at)
                ).first()
                if row is None:
                    return None
                payload = _payload(row.files, row.sop_uids)
                if payload is None:
                    # Dead at once, never re-claimed on every poll: nothing can be sent from this row.
                    reason = "delivery row unreadable: files/sop_uids are not matching JSON lists of strings"
                    conn.execute(deliveries.update().where(d.id == row.id).values(
                        state=DeliveryState.DEAD.value, claimed_by=None, lease_until=None, last_error=reason))
                    self._log.error("delivery_unreadable", delivery_id=int(row.id), series_uid=row.series_uid,
                                    destination=name)
                    return None
                files, sop_uids = payload
                conn.execute(
                    deliveries.update()
                    .where(d.id == row.id)
                    .values(lease_until=now + self._lease_seconds(len(files)))
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"deliveries: claim failed: {type(exc).__name__}: {exc}") from exc
        return _Claimed(
            id=int(row.id),
            series_uid=row.series_uid,
            version=int(row.version),
            destination=name,
            files=files,
            sop_uids=sop_uids,
            attempts=int(row.attempts),
            queued_at=float(row.queued_at),
        )

    def _lease_seconds(self, n_files: int) -> float:
        # Generous: association + one DIMSE exchange per file, each bounded by the sender's timeout, twice over.
        return 2.0 * self._config.dispatch.timeout_seconds * (n_files + 2)

    def _attempt(self, claimed: _Claimed) -> _Next:
        config = self._config
        log = self._log.bind(
            delivery_id=claimed.id,
            series_uid=claimed.series_uid,
            version=claimed.version,
            destination=claimed.destination,
            sop_uids=list(claimed.sop_uids),
            attempt=claimed.attempts,
        )
        destination = next((x for x in config.destinations if x.name == claimed.destination), None)
        if destination is None:  # removed by a config reload after the claim
            error = f"destination {claimed.destination!r} is not configured"
            return self._failed(claimed, error, config, log)
        sender = self._senders.get(destination.kind)
        if sender is None:
            return self._dead(claimed, f"no sender for kind '{destination.kind.value}'", log)
        started = time.monotonic()
        try:
            sender.send(destination, claimed.files)
        except PermanentSendError as exc:
            return self._dead(claimed, _message(exc), log)
        except SendError as exc:
            return self._failed(claimed, _message(exc), config, log)
        except Exception as exc:  # a sender bug must not kill the loop; the row records it and is retried
            log.exception("delivery_sender_error")
            return self._failed(claimed, f"unexpected {type(exc).__name__}: {_message(exc)}", config, log)
        now = self._clock()
        self._finish(claimed, log, state=DeliveryState.DELIVERED, delivered_at=now, last_attempt_at=now)
        log.info("delivery_sent", seconds=round(time.monotonic() - started, 3))
        if self._on_delivered is not None:
            try:
                self._on_delivered(claimed.series_uid, claimed.version, claimed.destination)
            except Exception:  # an observer's failure must not turn a delivered row into a failed one
                log.exception("delivery_observer_failed")
        self._resume(claimed.destination, now, log)
        return _Next.CONTINUE

    def _failed(self, claimed: _Claimed, error: str, config: NodeConfig, log: Any) -> _Next:
        now = self._clock()
        settings = config.dispatch
        if now - claimed.queued_at >= settings.give_up_after_seconds:
            reason = f"gave up after {settings.give_up_after_seconds:g} s; last error: {error}"
            self._dead(claimed, reason[:_MAX_ERROR_CHARS], log)
            return _Next.BACK_OFF
        delay = backoff_delay(claimed.attempts, settings, self._rng)
        self._finish(claimed, log, state=DeliveryState.PENDING, next_attempt_at=now + delay, last_error=error)
        with self._pause_lock:
            self._paused[claimed.destination] = (now, now + delay)
        log.warning("delivery_failed", next_attempt_in=round(delay, 3), error=error)
        return _Next.BACK_OFF

    def _dead(self, claimed: _Claimed, reason: str, log: Any) -> _Next:
        self._finish(claimed, log, state=DeliveryState.DEAD, last_error=reason)
        log.error("delivery_dead", error=reason)
        return _Next.CONTINUE

    def _finish(self, claimed: _Claimed, log: Any, *, state: DeliveryState, **values: Any) -> None:
        """End this dispatcher's claim; a lost claim (lease expired, row taken over) is logged, not written."""
        d = deliveries.c
        with self._transaction(None) as conn:
            result = conn.execute(
                deliveries.update()
                .where(
                    d.id == claimed.id,
                    d.state == DeliveryState.SENDING.value,
                    d.claimed_by == self._token,
                )
                .values(state=state.value, claimed_by=None, lease_until=None, **values)
            )
        if not result.rowcount:
            log.warning("delivery_claim_lost", outcome=state.value)

    def _resume(self, name: str, now: float, log: Any) -> None:
        """After a success on a destination that was failing: clear its pause and make its backed-off rows due."""
        with self._pause_lock:
            was_paused = self._paused.pop(name, None) is not None
        if not was_paused:
            return
        d = deliveries.c
        with self._transaction(None) as conn:
            n = conn.execute(
                deliveries.update()
                .where(d.destination == name, d.state == DeliveryState.PENDING.value, d.next_attempt_at > now)
                .values(next_attempt_at=now)
            ).rowcount
        log.info("destination_recovered", deliveries_due=int(n or 0))

    def _sweep(self) -> int:
        """Dead-letter pending rows whose give-up time has passed; returns how many."""
        config = self._config
        give_up = config.dispatch.give_up_after_seconds
        now = self._clock()
        configured = {x.name for x in config.destinations}
        d = deliveries.c
        expired = sa.and_(d.state == DeliveryState.PENDING.value, d.queued_at <= now - give_up)
        dead = 0
        with self._transaction(None) as conn:
            rows = conn.execute(
                sa.select(d.id, d.series_uid, d.version, d.destination, d.sop_uids, d.last_error)
                .where(expired)
                .order_by(d.id)
            ).all()
            for row in rows:
                last = row.last_error or (
                    "none (not attempted)" if row.destination in configured else "destination not configured"
                )
                reason = f"gave up after {give_up:g} s; last error: {last}"[:_MAX_ERROR_CHARS]
                if conn.execute(
                    deliveries.update()
                    .where(d.id == row.id, expired)
                    .values(state=DeliveryState.DEAD.value, last_error=reason)
                ).rowcount:
                    dead += 1
                    self._log.error(
                        "delivery_dead",
                        delivery_id=row.id,
                        series_uid=row.series_uid,
                        version=row.version,
                        destination=row.destination,
                        sop_uids=json.loads(row.sop_uids),
                        error=reason,
                    )
        return dead

    # -- operations -----------------------------------------------------------------------------------------------
    def recover(self, *, all_claims: bool = False) -> int:
        """Return rows left in `sending` by a dispatcher that died to `pending`, due now; returns how many.

        By default only rows whose lease has expired (safe while other dispatchers share the database; such rows are
        also reclaimed by the loop itself). ``all_claims=True`` takes every `sending` row: only for a node that
        knows it is the database's one dispatcher.
        """
        now = self._clock()
        d = deliveries.c
        cond: sa.ColumnElement[bool] = d.state == DeliveryState.SENDING.value
        if not all_claims:
            cond = sa.and_(cond, sa.or_(d.lease_until.is_(None), d.lease_until <= now))
        with self._transaction(None) as conn:
            n = int(
                conn.execute(
                    deliveries.update()
                    .where(cond)
                    .values(
                        state=DeliveryState.PENDING.value, next_attempt_at=now, claimed_by=None, lease_until=None
                    )
                ).rowcount
                or 0
            )
        if n:
            self._log.warning("deliveries_recovered", count=n)
        return n

    def retry(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Put dead (and pending) deliveries back to pending, due now, attempts and error cleared, give-up clock
        restarted; ``ids`` and ``destination`` narrow the set. Returns how many."""
        d = deliveries.c
        cond: sa.ColumnElement[bool] = d.state.in_([DeliveryState.DEAD.value, DeliveryState.PENDING.value])
        if ids is not None:
            wanted = [int(i) for i in ids]
            if not wanted:
                return 0
            cond = sa.and_(cond, d.id.in_(wanted))
        if destination is not None:
            cond = sa.and_(cond, d.destination == destination)
        now = self._clock()
        with self._transaction(None) as conn:
            n = int(
                conn.execute(
                    deliveries.update()
                    .where(cond)
                    .values(
                        state=DeliveryState.PENDING.value,
                        attempts=0,
                        next_attempt_at=now,
                        queued_at=now,
                        last_error=None,
                    )
                ).rowcount
                or 0
            )
        with self._pause_lock:
            if destination is None:
                self._paused.clear()
            else:
                self._paused.pop(destination, None)
        self._log.info("deliveries_retried", count=n, destination=destination)
        self.wake()
        return n

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of deliveries per (destination, state)."""
        d = deliveries.c
        with self._reading() as conn:
            stmt = sa.select(d.destination, d.state, sa.func.count()).group_by(d.destination, d.state)
            rows = conn.execute(stmt)
            return {(str(dest), str(state)): int(n) for dest, state, n in rows}

    def last_errors(self, limit: int = 10) -> list[sa.Row[Any]]:
        """Undelivered rows with an error, most recently attempted first."""
        d = deliveries.c
        stmt = (
            sa.select(
                d.id, d.series_uid, d.version, d.destination, d.state, d.attempts,
                d.last_attempt_at, d.next_attempt_at, d.last_error,
            )
            .where(d.last_error.is_not(None), d.state != DeliveryState.DELIVERED.value)
            .order_by(sa.func.coalesce(d.last_attempt_at, d.created_at).desc(), d.id.desc())
            .limit(limit)
        )
        with self._reading() as conn:
            return list(conn.execute(stmt))

    def get(self, delivery_id: int) -> sa.Row[Any] | None:
        with self._reading() as conn:
            return conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).first()

    def for_series(self, series_uid: str) -> list[sa.Row[Any]]:
        """Every delivery of every version of ``series_uid``, oldest first."""
        d = deliveries.c
        with self._reading() as conn:
            return list(conn.execute(sa.select(deliveries).where(d.series_uid == series_uid).order_by(d.id)))

    def apply_config(self, config: NodeConfig, senders: Mapping[DestinationKind, Sender] | None = None) -> None:
        """Swap destinations and backoff settings atomically (config hot reload), and the senders when given (a
        sender's own settings, e.g. `DimseSender`'s calling AE and timeout, are fixed at its construction). Rows of
        a removed destination stay pending (a later reload may bring it back) until their give-up time."""
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(config).__name__}")
        new_senders = self._senders if senders is None else self._checked(senders)
        with self._lock:
            old = {x.name: x for x in self._config.destinations}
            self._config = config
            self._senders = new_senders
            with self._pause_lock:
                for dest in config.destinations:
                    if old.get(dest.name) != dest:  # new or changed: don't keep waiting on the old address
                        self._paused.pop(dest.name, None)
                for name in set(self._paused) - {x.name for x in config.destinations}:
                    del self._paused[name]
            if self._running:
                self._sync_workers()
        self._log.info("dispatch_config_applied", destinations=[x.name for x in config.destinations])
        self.wake()

    # -- background loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one sending thread per destination and a sweeper; returns at once. Each is a supervised loop
        (``dispatch:<destination>``, ``dispatch-sweep``) that beats the heartbeat registry."""
        with self._lock:
            if self._running:
                raise RuntimeError("the dispatcher is already running")
            self._running = True
            self._stopping.clear()
            self._sync_workers()
            self._heartbeats.register(SWEEP_LOOP, self._sweep_period(), alive=self._sweeper_alive,
                                      restart=self._revive_sweeper)
            self._start_sweeper()
        self._log.info("dispatch_started", destinations=sorted(self._workers))

    def _start_sweeper(self) -> None:
        """(Caller holds ``_lock``.)"""
        self._sweeper = threading.Thread(target=self._sweep_loop, name="pacsnode-dispatch-sweep", daemon=True)
        self._sweeper.start()

    def _sweeper_alive(self) -> bool:
        sweeper = self._sweeper
        return sweeper is not None and sweeper.is_alive()

    def _revive_sweeper(self) -> None:
        """The supervisor's restart: a new sweep thread if the dispatcher runs and the old one ended."""
        with self._lock:
            if self._running and not self._sweeper_alive():
                self._start_sweeper()

    def _revive(self, name: str) -> None:
        """The supervisor's restart: a new thread for destination ``name`` if its old one ended."""
        with self._lock:
            worker = self._workers.get(name)
            if self._running and worker is not None and not _running(worker):
                self._start_worker(worker)

    def wake(self) -> None:
        """Look for due work now instead of at the next poll (call after committing new deliveries)."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.wake.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop claiming, let each thread finish the delivery it holds, wait up to ``timeout`` seconds. Returns
        whether every thread ended; a row still held stays `sending` until its lease expires (or `recover`)."""
        with self._lock:
            if not self._running:
                return True
            self._running = False
            self._stopping.set()
            workers = list(self._workers.values())
            for name in [*self._workers, None]:
                self._heartbeats.unregister(SWEEP_LOOP if name is None else _loop_name(name))
            self._workers.clear()
            threads = [w.thread for w in workers if w.thread is not None]
            if self._sweeper is not None:
                threads.append(self._sweeper)
                self._sweeper = None
        for worker in workers:
            worker.stop.set()
            worker.wake.set()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in threads if t.is_alive()]
        self._log.info("dispatch_stopped", unfinished=unfinished)
        return not unfinished

    def _sync_workers(self) -> None:
        """Threads for the configured destinations (caller holds ``_lock``)."""
        wanted = [x.name for x in self._config.destinations]
        for name in set(self._workers) - set(wanted):
            self._heartbeats.unregister(_loop_name(name))
            worker = self._workers.pop(name)
            worker.stop.set()
            worker.wake.set()
        for name in wanted:
            if name not in self._workers:
                worker = _DestinationThread(name)
                self._workers[name] = worker
                self._heartbeats.register(
                    _loop_name(name), self._config.dispatch.poll_seconds,
                    alive=partial(_running, worker), restart=partial(self._revive, name),
                )
                self._start_worker(worker)

    def _start_worker(self, worker: _DestinationThread) -> None:
        """(Caller holds ``_lock``.)"""
        worker.thread = threading.Thread(
            target=self._worker_loop, args=(worker,), name=f"pacsnode-dispatch-{worker.name}", daemon=True
        )
        worker.thread.start()

    def _worker_loop(self, worker: _DestinationThread) -> None:
        """Drain the destination, wait for a wake-up or the poll; no exception ends it (a failed send is the row's
        outcome, see `_attempt`; a database failure is logged and retried with a growing pause, a row it held is
        reclaimed when its lease expires)."""
        loop = _loop_name(worker.name)
        errors = 0
        while not (worker.stop.is_set() or self._stopping.is_set()):
            self._heartbeats.beat(loop)
            worker.wake.clear()
            try:
                self._drain(worker.name, worker.stop, lambda seconds: self._heartbeats.beat(loop, busy_for=seconds))
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure, see the docstring
                errors += 1
                self._log.error("dispatch_loop_error", destination=worker.name, error=failure(exc),
                                consecutive_errors=errors)
            wait = self._pause(self._config.dispatch.poll_seconds, errors)
            self._heartbeats.beat(loop, busy_for=wait)
            worker.wake.wait(wait)

    def _sweep_loop(self) -> None:
        """Dead-letter expired rows every poll; no exception ends it."""
        errors = 0
        while not self._stopping.is_set():
            self._heartbeats.beat(SWEEP_LOOP)
            try:
                self._sweep()
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
                errors += 1
                self._log.error("dispatch_sweep_error", error=failure(exc), consecutive_errors=errors)
            wait = self._pause(self._sweep_period(), errors)
            self._heartbeats.beat(SWEEP_LOOP, busy_for=wait)
            self._stopping.wait(wait)

    def _sweep_period(self) -> float:
        return max(1.0, self._config.dispatch.poll_seconds)

    @staticmethod
    def _pause(period: float, errors: int) -> float:
        """The wait before a loop's next turn: its period, doubling with each further failed turn (at most 30 s)."""
        return min(_MAX_ERROR_BACKOFF, period * 2.0 ** max(0, errors - 1))

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _reading(self) -> AbstractContextManager[sa.Connection]:
        return reading(self._engine, "deliveries")

    def _transaction(self, conn: sa.Connection | None) -> AbstractContextManager[sa.Connection]:
        return transaction(self._engine, "deliveries", conn)
