"""``pacsnode db downgrade REVISION`` after a bad upgrade, on SQLite and PostgreSQL: a hospital that upgraded and must
go back to the release before cannot start that release on the upgraded database (it refuses a revision it does not
know: tests/unit/test_migrate.py), so this release takes the database back to the older release's newest revision —
the schema exactly as those revisions build it, every row of the work in flight kept — and up again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from node import migrate
from node.cli import main
from node.config import QueueSection
from node.db import create_engine_for, init_schema
from node.queue import JobQueue
from node.states import SchemaState
from tests.unit.test_migrate import printed, set_revision, snapshot, write_config

PREVIOUS = "0006_purged_members"  # the release before this one: its newest revision
BASELINE = "0001_baseline"


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = create_engine_for(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def fresh_at(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Callable[[str], dict[str, object]]:
    """The schema the revisions up to a revision build on an empty database of ``db_url``'s backend."""
    count = iter(range(100))

    def build(revision: str) -> dict[str, object]:
        url = (f"sqlite:///{tmp_path / f'fresh{next(count)}.db'}" if db_url.startswith("sqlite")
               else str(request.getfixturevalue("postgres_server").create_database()))
        other = create_engine_for(url)
        try:
            with other.begin() as conn:
                command.upgrade(migrate._config(conn), revision)
            return snapshot(other)
        finally:
            other.dispose()

    return build


def _work_in_flight(engine: sa.Engine) -> None:
    """What a node leaves in its database mid-day: a series receiving with a purge remembered, a running job and a
    queued one, a delivery being sent, one waiting and a dead letter."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO series (series_uid, study_uid, state, instance_count, version, first_received_at, "
            "last_received_at, state_changed_at, purged_digest, purged_members) VALUES ('1.2.3', '1.2', 'receiving', "
            "1, 1, 1.0, 2.0, 2.0, 'ab', :m)"), {"m": b"\x01" * 8})
        for uid, state, holder in (("1.2.3", "running", "h:worker:1:x"), ("1.2.4", "queued", None)):
            conn.execute(sa.text(
                "INSERT INTO jobs (series_uid, version, priority, state, attempts, holder, lease_until, due_at, "
                "created_at) VALUES (:u, 1, 1, :s, 1, :h, 5.0, 1.0, 1.0)"), {"u": uid, "s": state, "h": holder})
        for state in ("sending", "pending", "dead"):
            conn.execute(sa.text(
                "INSERT INTO deliveries (series_uid, version, destination, kind, files, sop_uids, state, attempts, "
                "created_at, queued_at, due_at, holder, lease_until) VALUES ('1.2.3', 1, :d, 'dimse', '[\"/a\"]', "
                "'[\"1.9\"]', :s, 1, 1.0, 1.0, 2.0, 'h:dispatch:1:x', 5.0)"), {"d": f"pacs-{state}", "s": state})


def _rows(engine: sa.Engine, job_holder: str = "holder", delivery_holder: str = "holder") -> list[tuple[object, ...]]:
    """The rows of `_work_in_flight`, the lease holders read from the columns named (renamed by 0002)."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            f"SELECT series_uid, state, {job_holder} FROM jobs UNION ALL SELECT destination, state, {delivery_holder} "
            "FROM deliveries UNION ALL SELECT series_uid, state, study_uid FROM series ORDER BY 1, 2"))]


def test_a_bad_upgrade_is_taken_back_to_the_previous_release_with_its_work_in_flight(engine, fresh_at, tmp_path,
                                                                                       capsys):
    init_schema(engine)
    _work_in_flight(engine)
    before = _rows(engine)
    config = write_config(tmp_path, engine.url.render_as_string(hide_password=False))

    assert main(["db", "downgrade", PREVIOUS, "--config", config]) == 0
    assert printed(capsys) == f"schema {migrate.head()} -> {PREVIOUS}"
    assert migrate.inspect(engine) == migrate.SchemaStatus(SchemaState.BEHIND, PREVIOUS, migrate.head())
    assert snapshot(engine) == fresh_at(PREVIOUS)  # what the previous release builds and runs on
    assert _rows(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT purged_members FROM series")).scalar_one() == b"\x01" * 8

    assert main(["db", "downgrade", BASELINE, "--config", config]) == 0  # as far back as migrations go
    assert snapshot(engine) == fresh_at(BASELINE)
    assert _rows(engine, "worker_id", "claimed_by") == before  # the lease columns under their old names

    assert main(["db", "upgrade", "--config", config]) == 0
    assert printed(capsys) == f"schema {BASELINE} -> {migrate.head()}"
    assert _rows(engine) == before
    claimed = JobQueue(engine, QueueSection(max_attempts=3), clock=lambda: 10.0).claim("w")  # the lease ran out
    assert claimed is not None and claimed.attempts == 2


@pytest.mark.parametrize("revision", ["base", "head", "0006", PREVIOUS.upper(), "9999_future", migrate.head()])
def test_a_downgrade_to_anything_but_an_older_revision_of_this_release_is_refused(engine, fresh_at, tmp_path, capsys,
                                                                                  revision):
    init_schema(engine)
    config = write_config(tmp_path, engine.url.render_as_string(hide_password=False))
    assert main(["db", "downgrade", revision, "--config", config]) == 1
    err = capsys.readouterr().err
    assert revision in err and (PREVIOUS in err or "not newer" in err), err
    assert migrate.inspect(engine).state is SchemaState.CURRENT  # untouched (no table dropped by "base")
    assert snapshot(engine) == fresh_at(migrate.head())


def test_an_older_release_names_the_command_that_takes_the_database_back(engine, tmp_path, capsys):
    """What the previous release's refusal would say if it had this one's message: this release, refusing a newer
    one's revision, names the newer release's ``db downgrade`` with its own newest revision."""
    init_schema(engine)
    set_revision(engine, "9999_future")
    config = write_config(tmp_path, engine.url.render_as_string(hide_password=False))
    assert main(["db", "downgrade", PREVIOUS, "--config", config]) == 1
    assert f"pacsnode db downgrade {migrate.head()}" in capsys.readouterr().err
    assert migrate.inspect(engine).revision == "9999_future"


def test_the_previous_release_s_revision_is_the_one_before_head() -> None:
    """PREVIOUS above must follow the releases: a new revision makes this one the previous release's."""
    assert migrate.script().get_revision(migrate.head()).down_revision == PREVIOUS
    assert Path(migrate.script().get_revision(PREVIOUS).path).name == f"{PREVIOUS}.py"
