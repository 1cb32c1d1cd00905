"""Index: new/duplicate/replaced instances, series counters and re-opening, association bookkeeping."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from node.db import create_engine_for, init_schema
from node.index import Index, InstanceRecord, RecordOutcome
from node.states import AssociationState, SeriesState
from tests.fakeclock import FakeClock


@pytest.fixture
def index(db_url):
    engine = create_engine_for(db_url)
    init_schema(engine)
    yield Index(engine, clock=FakeClock())
    engine.dispose()


def rec(sop: str, series: str = "1.2.3", sha: str = "a" * 64, **kw) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop, series_uid=series, study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm", size=10, sha256=sha, modality="CT", **kw,
    )


def test_new_duplicate_and_replaced(index):
    assert index.record_instance(rec("1.1")) is RecordOutcome.NEW
    assert index.record_instance(rec("1.1")) is RecordOutcome.DUPLICATE
    assert index.record_instance(rec("1.1", sha="b" * 64)) is RecordOutcome.REPLACED
    assert index.record_instance(rec("1.2")) is RecordOutcome.NEW
    series = index.get_series("1.2.3")
    assert series.instance_count == 2
    assert index.get_instance("1.1").sha256 == "b" * 64


def test_series_times_and_expected_count(index):
    index.clock.now = 10.0
    index.record_instance(rec("1.1", images_in_acquisition=3))
    index.clock.now = 12.5
    index.record_instance(rec("1.2"))
    series = index.get_series("1.2.3")
    assert (series.first_received_at, series.last_received_at) == (10.0, 12.5)
    assert series.expected_count == 3  # kept when a later instance lacks it
    assert series.state == SeriesState.RECEIVING


def test_changed_content_reopens_a_complete_series_but_a_duplicate_does_not(index):
    index.record_instance(rec("1.1"))
    with index.engine.begin() as conn:
        conn.execute(sa.text("update series set state = 'complete'"))
    index.record_instance(rec("1.1"))
    assert index.get_series("1.2.3").state == SeriesState.COMPLETE
    index.record_instance(rec("1.2"))
    assert index.get_series("1.2.3").state == SeriesState.REOPENED


def test_instance_moving_series_moves_the_count(index):
    index.record_instance(rec("1.1", series="9.1"))
    assert index.record_instance(rec("1.1", series="9.2")) is RecordOutcome.REPLACED
    assert index.get_series("9.1").instance_count == 0
    assert index.get_series("9.2").instance_count == 1


def test_concurrent_writers_lose_nothing(index):
    def worker(n: int) -> None:
        for i in range(25):
            index.record_instance(rec(f"{n}.{i}", series=f"7.{n % 2}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.get_series("7.0").instance_count + index.get_series("7.1").instance_count == 100
    assert index.series_counts() == {"receiving": 2}


def test_a_batch_leaves_what_the_same_records_one_by_one_leave(db_url, index, request, tmp_path):
    """`record_instances` (the group commit's one transaction) against `record_instance` in a loop: same
    outcomes, same rows, same series counters, states and expected counts."""
    index.record_instance(rec("0.1", series="5.1"))
    index.record_instance(rec("0.2", series="5.2"))
    with index.engine.begin() as conn:
        conn.execute(sa.text("update series set state = 'complete'"))
    batch = [rec("1.1", images_in_acquisition=4), rec("1.1"), rec("1.1", sha="b" * 64), rec("0.1", series="5.1"),
             rec("0.2", series="5.3"), rec("1.2", series="5.1", sha="c" * 64), rec("1.2", series="1.2.3")]
    second = (f"sqlite:///{tmp_path / 'seq.db'}" if db_url.startswith("sqlite")
              else str(request.getfixturevalue("postgres_server").create_database()))
    engine = create_engine_for(second)
    init_schema(engine)
    one_by_one = Index(engine, clock=FakeClock())
    one_by_one.record_instance(rec("0.1", series="5.1"))
    one_by_one.record_instance(rec("0.2", series="5.2"))
    with engine.begin() as conn:
        conn.execute(sa.text("update series set state = 'complete'"))
    try:
        assert index.record_instances(batch) == [one_by_one.record_instance(r) for r in batch]

        def snapshot(idx: Index) -> tuple[list, list]:
            with idx.engine.connect() as conn:
                return (list(conn.execute(sa.text("select sop_uid, series_uid, sha256 from instances order by 1"))),
                        list(conn.execute(sa.text("select series_uid, instance_count, state, expected_count "
                                                  "from series order by 1"))))
        assert snapshot(index) == snapshot(one_by_one)
    finally:
        engine.dispose()


def test_association_lifecycle_and_dangling_cleanup(index):
    index.association_opened("a1", "CT1", "PACSNODE", "127.0.0.1:1")
    index.association_opened("a2", "CT2", "PACSNODE", "127.0.0.1:2")
    index.association_closed("a1", AssociationState.RELEASED)
    index.association_closed("a1", AssociationState.ABORTED)  # a later close does not overwrite
    assert index.get_association("a1").state == AssociationState.RELEASED
    assert index.close_dangling_associations() == 1
    assert index.get_association("a2").state == AssociationState.ABORTED


def test_dangling_cleanup_touches_only_this_node_s_rows(tmp_path):
    """On a shared database a starting node closes what it (or a pre-identity release) left open, never the open
    associations of another node; a supervisor closes every process of its own instance."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'shared.db'}")
    init_schema(engine)
    mine = Index(engine, node_id="ct-a:listener-0")
    sibling = Index(engine, node_id="ct-a:listener-1")
    other = Index(engine, node_id="ct-b:listener-0")
    legacy = Index(engine)
    for i, index in enumerate((mine, sibling, other, legacy)):
        index.association_opened(f"a{i}", "CT", "PACSNODE", "p")
    assert mine.get_association("a0").node_id == "ct-a:listener-0"
    assert mine.close_dangling_associations() == 2  # its own and the ownerless one
    assert [mine.get_association(f"a{i}").state for i in range(4)] == [
        AssociationState.ABORTED, AssociationState.OPEN, AssociationState.OPEN, AssociationState.ABORTED]
    other_like = Index(engine, node_id="ct_a:listener-0")  # LIKE wildcards in an instance id match nothing else
    other_like.association_opened("a4", "CT", "PACSNODE", "p")
    assert Index(engine).close_dangling_associations(prefix="ct-a:") == 1  # the sibling
    assert mine.get_association("a2").state == AssociationState.OPEN
    assert mine.get_association("a4").state == AssociationState.OPEN
    engine.dispose()
