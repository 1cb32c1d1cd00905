"""Group commit: concurrent submits share commits; nobody is answered before, or other than, its own batch's commit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.groupcommit import GroupCommitter
from peers.process import wait_until


class Ledger:
    """A commit function that records what it has committed, and can hold a batch open until released."""

    def __init__(self, fail_batch: int | None = None) -> None:
        self.committed: set[int] = set()
        self.batches: list[list[int]] = []
        self.fail_batch = fail_batch
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self.lock = threading.Lock()

    def commit(self, items: list[int]) -> list[str | BaseException]:
        self.holding.set()
        self.hold.wait(10)
        with self.lock:
            self.batches.append(items)
            if len(self.batches) == self.fail_batch:
                raise OSError("disk gone")
            self.committed.update(i for i in items if i >= 0)
        return [f"ok {i}" if i >= 0 else ValueError(f"item {i} refused") for i in items]


def test_one_caller_commits_its_own_item_in_its_own_thread():
    seen: list[str] = []
    committer = GroupCommitter(lambda items: [seen.append(threading.current_thread().name) or f"ok {items[0]}"])
    assert committer.submit(7) == "ok 7"
    assert seen == [threading.current_thread().name]  # no hand-off to another thread
    assert (committer.batches, committer.items) == (1, 1)


def test_callers_arriving_during_a_commit_share_the_next_one():
    ledger = Ledger()
    committer = GroupCommitter(ledger.commit)
    ledger.hold.clear()
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(committer.submit, 0)
        assert ledger.holding.wait(10)
        rest = [pool.submit(committer.submit, i) for i in range(1, 7)]
        wait_until(lambda: len(committer._queue) == 6, 10, "six callers queued behind the first commit")
        ledger.hold.set()
        assert [f.result(10) for f in [first, *rest]] == [f"ok {i}" for i in range(7)]
    assert ledger.batches == [[0], [1, 2, 3, 4, 5, 6]]
    assert (committer.batches, committer.items) == (2, 7)


def test_every_caller_is_answered_only_after_its_item_is_committed():
    ledger = Ledger()
    committer = GroupCommitter(ledger.commit, max_batch=4)
    early: list[int] = []

    def submit(i: int) -> None:
        committer.submit(i)
        with ledger.lock:
            if i not in ledger.committed:
                early.append(i)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, range(200)))
    assert early == []
    assert ledger.committed == set(range(200))
    assert max(len(b) for b in ledger.batches) <= 4
    assert committer.items == 200


def test_a_failed_commit_fails_every_caller_of_that_batch_and_no_other():
    ledger = Ledger(fail_batch=2)
    committer = GroupCommitter(ledger.commit)
    ledger.hold.clear()
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(committer.submit, 0)
        assert ledger.holding.wait(10)
        doomed = [pool.submit(committer.submit, i) for i in range(1, 5)]
        wait_until(lambda: len(committer._queue) == 4, 10, "four callers queued behind the first commit")
        ledger.hold.set()
        assert first.result(10) == "ok 0"
        for future in doomed:
            with pytest.raises(OSError, match="disk gone"):
                future.result(10)
    assert ledger.committed == {0}  # the failed batch's items were never committed, and none was acknowledged
    assert committer.submit(9) == "ok 9"  # the next batch commits as usual


def test_an_item_refused_on_its_own_fails_only_its_caller():
    ledger = Ledger()
    committer = GroupCommitter(ledger.commit)
    ledger.hold.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(committer.submit, 0)
        assert ledger.holding.wait(10)
        good, bad = pool.submit(committer.submit, 1), pool.submit(committer.submit, -1)
        wait_until(lambda: len(committer._queue) == 2, 10, "two callers queued")
        ledger.hold.set()
        assert (first.result(10), good.result(10)) == ("ok 0", "ok 1")
        with pytest.raises(ValueError, match="item -1 refused"):
            bad.result(10)


def test_a_commit_returning_the_wrong_number_of_results_fails_the_batch():
    committer: GroupCommitter[int, str] = GroupCommitter(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        committer.submit(1)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitter(lambda items: items, max_batch=0)
