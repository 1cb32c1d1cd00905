"""Dispatch: deliver each result set (SR, SEG files) to every configured destination, retrying, then dead-lettering.

`Dispatcher.enqueue` records one `deliveries` row per destination (inside the worker's transaction when given its
connection). `run_once` — or the background threads, one per destination (`start`/`wake`/`stop`,
`node.dispatch_threads`) — claims due rows through `node.leases` (pending → sending under this dispatcher's lease;
``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and hands their files to the `Sender` registered for the destination's
kind. A `TransientSendError` (peer down or busy, association refused or lost) retries after a capped exponential
backoff with full jitter until ``give_up_after_seconds``; a `PermanentSendError` (the peer refuses the objects
themselves) dead-letters at once with the reason; `retry` replays dead rows. After a transient failure the
destination backs off as a whole (in this process): until the failed row is due again only rows queued since are
tried, and the first success makes its backed-off rows due at once. Result files are only read. This module (through
`node.leases`) is the only writer of delivery state.

The senders (the destination seam, keyed by the config's ``kind``) and their errors (`TransientSendError`,
`PermanentSendError`) live in `node.senders`. A result file missing while ``data_dir/results`` has lost its marker
(node.spool: its volume not mounted) is retried like a transient failure, not dead-lettered.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node import delivery_rows as store
from node.config import DestinationKind, DispatchSection, NodeConfig
from node.db import insert_for, transaction
from node.dispatch_threads import SWEEP_LOOP, DispatchThreads
from node.errors import SendError
from node.leases import MAX_ERROR_CHARS, Lease, Leases, backoff, holder_id, own_prefix
from node.logs import get_logger
from node.schema import deliveries
from node.senders import PermanentSendError, Sender
from node.spools import results_unmounted
from node.states import DeliveryState
from node.supervise import Heartbeats

__all__ = ["SWEEP_LOOP", "Dispatcher", "backoff_delay", "deliveries"]


def backoff_delay(attempts: int, settings: DispatchSection, rng: Callable[[], float]) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: full jitter, ``rng() * min(max, initial *
    2**(attempts-1))`` (`node.leases.backoff` with the ``[dispatch]`` settings)."""
    return backoff(attempts, settings.initial_backoff_seconds, settings.max_backoff_seconds, rng)


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
    lease: Lease


class _Next(Enum):
    CONTINUE = "continue"  # delivered or dead-lettered: go on with the destination's next row
    BACK_OFF = "back_off"  # transient failure: the destination is probably down, leave the rest for later


def _message(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:MAX_ERROR_CHARS]


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
        identity: str | None = None,
    ) -> None:
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(config).__name__}")
        self._config = config
        self._engine = engine
        self._senders = self._checked(senders)
        self._clock = clock
        self._rng = rng
        self._on_delivered = on_delivered  # (series_uid, version, destination): metrics only, never raises through
        self._identity = identity  # the node's name in lease holders (default: the host name)
        self._token = holder_id("dispatch", identity)
        self._leases = Leases(engine, deliveries, waiting=DeliveryState.PENDING.value,
                              held=DeliveryState.SENDING.value, dead=DeliveryState.DEAD.value,
                              clock=lambda: self._clock())
        self._log = get_logger(component="dispatch")
        self._lock = threading.Lock()  # apply_config
        self._pause_lock = threading.Lock()
        self._paused: dict[str, tuple[float, float]] = {}  # destination -> (failed_at, until)
        self._repointed: set[str] = set()  # destinations a reload added or changed: their waiting rows go now
        self._stopping = threading.Event()
        self._insert = insert_for(engine)
        self._threads = DispatchThreads(lambda *args: self._drain(*args), lambda: self._sweep(),
                                        heartbeats or Heartbeats(), self._stopping, self._log)
        self.remote_wake: Callable[[], object] | None = None  # wakes dispatcher processes elsewhere (node.wakeup)

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
        paths, uids = store.checked_payload(series_uid, version, files, sop_uids)
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
                due_at=now,
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
                    "due_at": now,
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
            self._repointed_now(name)
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
        """Lease the destination's next due row to this dispatcher (`node.leases`): pending with ``due_at``
        reached, or sending with an expired lease (its dispatcher died). While the destination backs off after a
        failure, only rows queued after that failure are due. A row whose files list cannot be read is
        dead-lettered at once (never re-claimed on every poll), and so is a row whose series has a delivery of a
        newer version (to any destination: `delivery_rows.newer_version`); the next row is claimed then. A row
        whose series has an older version being sent to the destination (another dispatcher's) waits for it."""
        now = self._clock()
        d = deliveries.c
        where: sa.ColumnElement[bool] = d.destination == name
        with self._pause_lock:
            pause = self._paused.get(name)
        if pause is not None and now < pause[1]:
            where = sa.and_(where, d.queued_at > pause[0])
        where = sa.and_(where, store.no_older_in_flight(now))
        with self._transaction(None) as conn:  # waiting older versions first: superseded, never sent
            for r in store.supersede_waiting(conn, name, now):
                self._log.info("delivery_superseded", delivery_id=int(r.id), series_uid=r.series_uid,
                               version=int(r.version), newer_version=int(r.newest), destination=name)
        newer: int | None = 0
        while newer is not None:  # until a row that is not superseded (or none is due)
            with self._transaction(None) as conn:
                row = self._leases.claim(self._token, self._lease_seconds(0), where=where, order_by=(d.due_at, d.id),
                                         values={"last_attempt_at": now}, conn=conn)
                if row is None:
                    return None
                lease = Lease(int(row.id), self._token, int(row.attempts))
                payload = store.decode_payload(row.files, row.sop_uids)
                if payload is None:
                    reason = "delivery row unreadable: files/sop_uids are not matching JSON lists of strings"
                    self._leases.dead_letter(lease, reason, conn)
                    self._log.error("delivery_unreadable", delivery_id=int(row.id), series_uid=row.series_uid,
                                    destination=name)
                    return None
                files, sop_uids = payload
                newer = store.newer_version(conn, row.series_uid, int(row.version))
                if newer is None:
                    self._leases.extend(lease, self._lease_seconds(len(files)), conn)
                else:  # a later version was queued while this one waited: never send it after that one
                    self._leases.dead_letter(lease, f"superseded by version {newer} of the series", conn)
                    self._log.info("delivery_superseded", delivery_id=int(row.id), series_uid=row.series_uid,
                                   version=int(row.version), newer_version=newer, destination=name)
        assert row is not None  # the loop ends on a row that is not superseded
        return _Claimed(id=int(row.id), series_uid=row.series_uid, version=int(row.version), destination=name,
                        files=files, sop_uids=sop_uids, attempts=int(row.attempts), queued_at=float(row.queued_at),
                        lease=lease)

    def _lease_seconds(self, n_files: int) -> float:
        # Generous: association + one DIMSE exchange per file, each bounded by the sender's timeout, twice over.
        return 2.0 * self._config.dispatch.timeout_seconds * (n_files + 2)

    def _attempt(self, claimed: _Claimed) -> _Next:
        config = self._config
        log = self._log.bind(delivery_id=claimed.id, series_uid=claimed.series_uid, version=claimed.version,
                             destination=claimed.destination, sop_uids=list(claimed.sop_uids), attempt=claimed.attempts)
        destination = next((x for x in config.destinations if x.name == claimed.destination), None)
        if destination is None:  # removed by a config reload after the claim
            return self._failed(claimed, f"{store.NOT_CONFIGURED} (removed by a reload)", config, log)
        sender = self._senders.get(destination.kind)
        if sender is None:
            return self._dead(claimed, f"no sender for kind '{destination.kind.value}'", log)
        started = time.monotonic()
        try:
            sender.send(destination, claimed.files)
        except PermanentSendError as exc:
            if (root := results_unmounted(config, claimed.files)) is not None:  # e.g. "result file missing"
                return self._failed(claimed, f"{root} has no marker (volume not mounted?); {_message(exc)}", config, log)
            return self._dead(claimed, _message(exc), log)
        except SendError as exc:
            return self._failed(claimed, _message(exc), config, log)
        except Exception as exc:  # a sender bug must not kill the loop; the row records it and is retried
            log.exception("delivery_sender_error")
            return self._failed(claimed, f"unexpected {type(exc).__name__}: {_message(exc)}", config, log)
        now = self._clock()
        if not self._leases.finish(claimed.lease, DeliveryState.DELIVERED.value, delivered_at=now,
                                   last_attempt_at=now):
            log.warning("delivery_claim_lost", outcome=DeliveryState.DELIVERED.value)
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
        if now - claimed.queued_at >= settings.give_up_after_seconds:  # a reload may have removed it meanwhile
            configured = any(x.name == claimed.destination for x in self._config.destinations)
            self._dead(claimed, store.give_up_reason(settings.give_up_after_seconds, error, configured), log)
            return _Next.BACK_OFF
        delay = backoff_delay(claimed.attempts, settings, self._rng)
        if not self._leases.retry_later(claimed.lease, delay, error):
            log.warning("delivery_claim_lost", outcome=DeliveryState.PENDING.value)
        with self._pause_lock:
            self._paused[claimed.destination] = (now, now + delay)
        log.warning("delivery_failed", next_attempt_in=round(delay, 3), error=error)
        return _Next.BACK_OFF

    def _dead(self, claimed: _Claimed, reason: str, log: Any) -> _Next:
        if not self._leases.dead_letter(claimed.lease, reason):
            log.warning("delivery_claim_lost", outcome=DeliveryState.DEAD.value)
        log.error("delivery_dead", error=reason)
        return _Next.CONTINUE

    def _resume(self, name: str, now: float, log: Any) -> None:
        """After a success on a destination that was failing: clear its pause and make its backed-off rows due."""
        with self._pause_lock:
            was_paused = self._paused.pop(name, None) is not None
        if was_paused:
            with self._transaction(None) as conn:
                log.info("destination_recovered", deliveries_due=store.make_due(conn, name, now))

    def _repointed_now(self, name: str) -> None:
        """A destination a reload added or changed (`apply_config`): the waits it had (its pause, its rows'
        backoff) were earned at the old address, so its waiting rows are due now. Done in its own thread before a
        claim, so also after an attempt that was in flight at the old address during the reload has failed."""
        with self._pause_lock:
            if name not in self._repointed:
                return
            self._repointed.discard(name)
            self._paused.pop(name, None)
        with self._transaction(None) as conn:  # should it fail, the rows wait out their backoff
            self._log.info("destination_repointed", destination=name,
                           deliveries_due=store.make_due(conn, name, self._clock()))

    def _sweep(self) -> int:
        """Rows of destinations no longer configured `sending` under an expired lease back to pending (no thread
        reclaims them), then dead-letter pending rows whose give-up time has passed; returns how many died."""
        give_up = self._config.dispatch.give_up_after_seconds
        configured = {x.name for x in self._config.destinations}
        d = deliveries.c

        def reason(row: sa.Row[Any]) -> str:
            return store.give_up_reason(give_up, row.last_error, row.destination in configured)

        if released := self._leases.release(where=d.destination.not_in(configured)):
            self._log.warning("deliveries_recovered", count=released, reason="destination not configured")
        expired = sa.and_(d.state == DeliveryState.PENDING.value, d.queued_at <= self._clock() - give_up)
        dead = self._leases.expire(expired, reason)
        for row in dead:
            self._log.error("delivery_dead", delivery_id=row.id, series_uid=row.series_uid, version=row.version,
                            destination=row.destination, sop_uids=json.loads(row.sop_uids),
                            error=reason(row)[:MAX_ERROR_CHARS])
        return len(dead)

    # -- operations -----------------------------------------------------------------------------------------------
    def recover(self, *, all_claims: bool = False, own: bool = False) -> int:
        """Crash cleanup: return rows left in `sending` to `pending`, due now; returns how many.

        By default only rows whose lease has expired (safe while other dispatchers share the database; such rows are
        also reclaimed by the loop itself); ``own=True`` also those an earlier process of this node (same
        ``identity``, `node.leases.own_prefix`) left held — what `pacsnode serve` does at start. ``all_claims=True``
        takes every `sending` row: only for a node that knows it is the database's one dispatcher.
        """
        prefix = own_prefix("dispatch", self._identity) if own else None
        n = self._leases.release(own_prefix=prefix, everything=all_claims)
        if n:
            self._log.warning("deliveries_recovered", count=n)
        return n

    def retry(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Put dead (and pending) deliveries, and delivered ones whose commitment failed or timed out, back to
        pending, due now, attempts and error cleared, give-up clock restarted; ``ids`` and ``destination`` narrow the
        set; a row whose series has a newer version's delivery (to any destination) is never replayed."""
        d = deliveries.c
        cond: sa.ColumnElement[bool] = sa.true()
        if ids is not None:
            wanted = [int(i) for i in ids]
            if not wanted:
                return 0
            cond = sa.and_(cond, d.id.in_(wanted))
        if destination is not None:
            cond = sa.and_(cond, d.destination == destination)
        cond = sa.and_(cond, store.not_superseded())  # a replayed old version would outlive the newer one
        n = self._leases.replay(cond, [DeliveryState.DEAD.value, DeliveryState.PENDING.value],
                                queued_at=self._clock(), last_error=None)
        n += self._leases.replay(sa.and_(cond, store.unconfirmed()), [DeliveryState.DELIVERED.value],
                                 queued_at=self._clock(), last_error=None)
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
        return store.counts(self._engine)

    def last_errors(self, limit: int = 10) -> list[sa.Row[Any]]:
        """Undelivered rows with an error, most recently attempted first."""
        return store.last_errors(self._engine, limit)

    def get(self, delivery_id: int) -> sa.Row[Any] | None:
        return store.get(self._engine, delivery_id)

    def for_series(self, series_uid: str) -> list[sa.Row[Any]]:
        """Every delivery of every version of ``series_uid``, oldest first."""
        return store.for_series(self._engine, series_uid)

    def apply_config(self, config: NodeConfig, senders: Mapping[DestinationKind, Sender] | None = None) -> None:
        """Swap destinations and backoff settings atomically (config hot reload), and the senders when given (a
        sender's own settings, e.g. `DimseSender`'s calling AE and timeout, are fixed at its construction). Rows of
        a removed destination stay pending (a later reload may bring it back) until their give-up time; those of a
        new or changed one are due at once (`_repointed_now`, in its thread)."""
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
                        self._repointed.add(dest.name)
                for name in set(self._paused) - {x.name for x in config.destinations}:
                    del self._paused[name]
                self._repointed &= {x.name for x in config.destinations}
            self._threads.apply_config(config)
        self._log.info("dispatch_config_applied", destinations=[x.name for x in config.destinations])
        self.wake()

    # -- background threads (node.dispatch_threads) ---------------------------------------------------------------
    def start(self) -> None:
        """Start one sending thread per destination and a sweeper; returns at once. Each is a supervised loop
        (``dispatch:<destination>``, ``dispatch-sweep``) that beats the heartbeat registry."""
        with self._lock:
            names = self._threads.start(self._config)
        self._log.info("dispatch_started", destinations=names)

    def wake(self) -> None:
        """Look for due work now instead of at the next poll (call after committing new deliveries); also the
        dispatcher processes on this host when this process runs none (`remote_wake`, node.wakeup)."""
        self._threads.wake()
        if self.remote_wake is not None:
            self.remote_wake()

    def wake_local(self) -> None:
        """This process's delivery threads only (a wake-up from another process)."""
        self._threads.wake()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop claiming, let each thread finish the delivery it holds, wait up to ``timeout`` seconds. Returns
        whether every thread ended; a row still held stays `sending` until its lease expires (or `recover`)."""
        return self._threads.stop(timeout)

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _transaction(self, conn: sa.Connection | None) -> AbstractContextManager[sa.Connection]:
        return transaction(self._engine, "deliveries", conn)
