"""Group commit: items that concurrent threads need made durable, committed together, each caller answered after.

`GroupCommitter(commit, max_batch).submit(item)` blocks until ``item`` is durable and returns its result, or
raises what its commit raised. There is no committer thread: the first caller that finds no commit under way
becomes the leader, takes every item queued so far (up to ``max_batch``, its own among them) and runs
``commit(batch)``; callers arriving meanwhile queue and wait; when the leader's commit returns, it hands each
waiter of that batch its result and wakes them, and one of the still-waiting callers leads the next batch. One
sender thus pays no thread hand-off at all, while several concurrent associations share one directory fsync and
one database commit per batch.

``commit(batch)`` returns one entry per item, in order: the item's result, or the exception that item alone
failed with. If ``commit`` itself raises, every item of that batch fails with that exception: nothing is ever
answered as committed unless its commit returned it as such. A caller is answered only from the batch its own
item was in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 64  # SQLite takes a 64-row batch in ~10 ms; more only lengthens the wait of the first in it


@dataclass(eq=False)
class _Waiter(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommitter(Generic[T, R]):
    """Batches `submit` calls from concurrent threads into ``commit`` calls (see the module docstring)."""

    def __init__(self, commit: Callable[[list[T]], Sequence[R | BaseException]],
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self._commit = commit
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Waiter[T, R]] = []
        self._leading = False
        self.batches = 0  # commits run, and items they carried: for tests and the benchmark's report
        self.items = 0

    def submit(self, item: T) -> R:
        """Return ``item``'s result once its batch is committed; raise its failure otherwise."""
        waiter: _Waiter[T, R] = _Waiter(item)
        with self._cond:
            self._queue.append(waiter)
            while not waiter.done:
                if self._leading:
                    self._cond.wait()
                    continue
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                self._leading = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]  # R itself may be None

    def _run(self, batch: list[_Waiter[T, R]]) -> None:
        """Commit ``batch`` outside the lock and settle every waiter in it (whatever happens)."""
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = self._commit([w.item for w in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"commit returned {len(outcomes)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiter of the batch learns it; the leader re-raises it
            outcomes = [exc] * len(batch)
        with self._cond:
            self.batches += 1
            self.items += len(batch)
            for waiter, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    waiter.error = outcome
                else:
                    waiter.result = outcome
                waiter.done = True
