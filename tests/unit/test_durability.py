"""The ingest group commit against a real spool and index: rows are committed before callers are answered,
concurrent accepts share commits, and a failing folder sync or row fails exactly what it should."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import sqlalchemy as sa
from pydicom.uid import ExplicitVRLittleEndian

from node.durability import InstanceCommitter
from node.errors import StoreFailedError
from node.index import Index, InstanceRecord, RecordOutcome
from node.ingest import Ingestor, Origin
from node.spool import Spool
from peers.process import wait_until
from tests.ctgen import write_ct_series
from tests.dicomfiles import dataset_bytes


def committed_sops(url: str) -> set[str]:
    """What another connection (another engine: not a session of ours) sees as committed."""
    other = sa.create_engine(url)
    try:
        with other.connect() as conn:
            return {r[0] for r in conn.execute(sa.text("select sop_uid from instances"))}
    finally:
        other.dispose()


def test_concurrent_accepts_are_committed_before_they_return_and_share_commits(tmp_path, engine, db_url):
    series = write_ct_series(tmp_path / "in", slices=24, size=16, seed=3)
    ingestor = Ingestor(Spool(tmp_path / "spool"), Index(engine))
    late: list[str] = []

    def accept(i: int) -> None:
        accepted = ingestor.accept(dataset_bytes(series.paths[i]), ExplicitVRLittleEndian,
                                   Origin(calling_ae=f"CT{i % 4}", association_id=f"a{i % 4}"))
        assert accepted.outcome is RecordOutcome.NEW
        if accepted.record.sop_uid not in committed_sops(db_url):
            late.append(accepted.record.sop_uid)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(accept, range(24)))
    assert late == []
    assert committed_sops(db_url) == set(series.sop_uids)
    assert Index(engine).get_series(series.series_uid).instance_count == 24
    assert ingestor.committer.group.items == 24
    assert sorted(p.name for p in (tmp_path / "spool").rglob("*") if p.is_file()) == sorted(
        f"{sop}.dcm" for sop in series.sop_uids)


def rec(sop: str, **kw: object) -> InstanceRecord:
    base = InstanceRecord(sop_uid=sop, series_uid="1.2.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm", size=1, sha256="a" * 64)
    return replace(base, **kw)


def held_batch(committer: InstanceCommitter, items: list[tuple[InstanceRecord, object]]) -> list[object]:
    """Submit ``items`` from threads while a first commit is held, so they form one batch; return each result or
    exception, in order."""
    release, holding = threading.Event(), threading.Event()
    real = committer.group._commit

    def first_held(batch):  # only the first batch waits: the rest queue up behind it meanwhile
        if not holding.is_set():
            holding.set()
            release.wait(10)
        return real(batch)

    committer.group._commit = first_held
    folder = committer.spool.root

    def submit(item):
        record, where = item
        try:
            return committer.commit(record, where or folder)
        except StoreFailedError as exc:
            return exc

    with ThreadPoolExecutor(len(items) + 1) as pool:
        first = pool.submit(committer.commit, rec("9.9.9"), folder)
        assert holding.wait(10)
        futures = [pool.submit(submit, item) for item in items]
        wait_until(lambda: len(committer.group._queue) == len(items), 10, "the callers queued behind the first")
        release.set()
        assert first.result(10) is RecordOutcome.NEW
        return [f.result(10) for f in futures]


def test_a_row_the_database_refuses_fails_only_its_own_instance(tmp_path, engine, db_url):
    committer = InstanceCommitter(Spool(tmp_path / "spool"), Index(engine))
    results = held_batch(committer, [(rec("1.1"), None), (rec("1.2", path=None), None), (rec("1.3"), None)])
    assert results[0] is RecordOutcome.NEW and results[2] is RecordOutcome.NEW
    assert isinstance(results[1], StoreFailedError)
    assert committer.group.batches == 2  # the three shared one batch, retried one by one after the refusal
    assert committed_sops(db_url) == {"9.9.9", "1.1", "1.3"}


def test_a_folder_that_does_not_sync_fails_the_whole_batch_and_commits_nothing(tmp_path, engine, db_url):
    committer = InstanceCommitter(Spool(tmp_path / "spool"), Index(engine))
    gone = tmp_path / "spool" / "vanished"
    results = held_batch(committer, [(rec("1.1"), None), (rec("1.2"), gone)])
    assert all(isinstance(r, StoreFailedError) for r in results)
    assert committed_sops(db_url) == {"9.9.9"}
