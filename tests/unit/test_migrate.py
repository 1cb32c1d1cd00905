"""node/migrate.py on SQLite and PostgreSQL: the Alembic revisions build exactly the schema `node.schema` declares,
a database from before migrations is adopted, and `serve` / `pacsnode db` act on each schema state."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from structlog.testing import capture_logs

from node import migrate
from node.cli import main
from node.config import QueueSection
from node.db import create_engine_for, init_schema
from node.errors import SchemaError
from node.queue import JobQueue
from node.schema import metadata
from node.states import JobState, SchemaState

OLDER = "0001_baseline"


@pytest.fixture
def new_url(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Callable[[], str]:
    """More fresh, empty databases of ``db_url``'s backend."""
    count = iter(range(1, 100))
    if db_url.startswith("sqlite"):
        return lambda: f"sqlite:///{tmp_path / f'other{next(count)}.db'}"
    server = request.getfixturevalue("postgres_server")
    return lambda: str(server.create_database())


@pytest.fixture
def engines() -> Iterator[Callable[[str], sa.Engine]]:
    made: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        made.append(create_engine_for(url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Tables with their columns (name, type, nullable, default), primary key, indexes and unique constraints."""
    insp = sa.inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in
                              insp.get_columns(table)),
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in
                              insp.get_indexes(table)),
            "unique": sorted((str(u["name"]), tuple(u["column_names"])) for u in insp.get_unique_constraints(table)),
            "foreign_keys": insp.get_foreign_keys(table),
        }
    return out


def set_revision(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def printed(capsys: pytest.CaptureFixture[str]) -> str:
    """The last line a command printed (log lines may come before it)."""
    return capsys.readouterr().out.strip().splitlines()[-1]


def write_config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[database]\nurl = "{url}"\n')
    return str(path)


def test_the_revisions_build_exactly_the_schema_create_all_builds(db_url, new_url, engines):
    migrated, created = engines(db_url), engines(new_url())
    assert migrate.upgrade(migrated).state is SchemaState.EMPTY  # every revision run, from nothing
    assert migrate.prepare(created).state is SchemaState.EMPTY  # create_all + stamp head
    assert snapshot(migrated) == snapshot(created)
    assert set(snapshot(created)) == set(metadata.tables) | {"alembic_version"}
    assert migrate.inspect(migrated) == migrate.inspect(created) == migrate.SchemaStatus(
        SchemaState.CURRENT, migrate.head(), migrate.head())
    jobs = {c[0] for c in snapshot(migrated)["jobs"]["columns"]}
    assert {"holder", "lease_until", "due_at"} <= jobs and not {"worker_id", "not_before"} & jobs


def test_downgrade_to_the_baseline_and_back(db_url, engines):
    engine = engines(db_url)
    init_schema(engine)
    fresh = snapshot(engine)
    with engine.begin() as conn:
        command.downgrade(migrate._config(conn), OLDER)
    columns = {c[0] for c in snapshot(engine)["deliveries"]["columns"]}
    assert {"claimed_by", "next_attempt_at"} <= columns and "holder" not in columns
    assert migrate.inspect(engine).state is SchemaState.BEHIND
    migrate.upgrade(engine)
    assert snapshot(engine) == fresh


def old_release_database(engine: sa.Engine) -> None:
    """What `create_all` of an early release made: the baseline without the later tables and nullable columns,
    holding a running job and a sending delivery (lease columns under their old names)."""
    migrate.script().get_revision(OLDER).module.baseline().create_all(engine)
    with engine.begin() as conn:
        for table in ("commitments", "destination_checks", "results"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        for table, column in (("jobs", "pipeline"), ("series", "route"), ("series", "purged_at")):
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(sa.text(
            "INSERT INTO jobs (series_uid, version, priority, state, attempts, worker_id, lease_expires_at, "
            "not_before, created_at) VALUES ('1.2.3', 1, 1, 'running', 1, 'gone:worker:1:x', 5.0, 1.0, 1.0)"))
        conn.execute(sa.text(
            "INSERT INTO deliveries (series_uid, version, destination, kind, files, sop_uids, state, attempts, "
            "created_at, queued_at, next_attempt_at, claimed_by, lease_until) VALUES ('1.2.3', 1, 'pacs', 'dimse', "
            "'[\"/a\"]', '[\"1.9\"]', 'sending', 1, 1.0, 1.0, 2.0, 'gone:dispatch:1:x', 5.0)"))


def test_a_database_from_before_migrations_is_adopted_and_keeps_its_rows(db_url, new_url, engines):
    engine = engines(db_url)
    old_release_database(engine)
    assert migrate.inspect(engine).state is SchemaState.UNVERSIONED
    if engine.dialect.name == "postgresql":  # other nodes may run the old release: never upgraded behind them
        with pytest.raises(SchemaError, match="pacsnode db upgrade"):
            migrate.prepare(engine)
        assert migrate.inspect(engine).state is SchemaState.UNVERSIONED
        assert migrate.upgrade(engine).state is SchemaState.UNVERSIONED
    else:
        with capture_logs() as logs:
            assert migrate.prepare(engine).state is SchemaState.UNVERSIONED
        assert {"event": "schema_upgraded", "from_revision": None, "to_revision": migrate.head(), "adopted": True,
                "component": "schema", "log_level": "warning"} in logs
    assert migrate.inspect(engine).state is SchemaState.CURRENT
    fresh = engines(new_url())
    init_schema(fresh)
    assert snapshot(engine) == snapshot(fresh)
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT holder, lease_until, due_at, pipeline FROM jobs")).one()
        delivery = conn.execute(sa.text("SELECT holder, lease_until, due_at FROM deliveries")).one()
    assert tuple(job) == ("gone:worker:1:x", 5.0, 1.0, None)
    assert tuple(delivery) == ("gone:dispatch:1:x", 5.0, 2.0)
    claimed = JobQueue(engine, QueueSection(max_attempts=3), clock=lambda: 10.0).claim("w")  # lease ran out at 5
    assert claimed is not None and (claimed.series_uid, claimed.attempts) == ("1.2.3", 2)


def test_serve_refuses_a_revision_it_does_not_know(db_url, engines, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("node.cli.configure_logging", lambda level: None)  # keep the test run's own log setup
    engine = engines(db_url)
    init_schema(engine)
    set_revision(engine, "9999_future")
    config = write_config(tmp_path, db_url)
    assert main(["serve", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "9999_future" in err and "does not know" in err and "pacsnode db current" in err
    assert main(["db", "current", "--config", config]) == 0
    assert printed(capsys).startswith("9999_future (unknown to this release")
    assert main(["db", "upgrade", "--config", config]) == 1
    assert "9999_future" in capsys.readouterr().err
    assert migrate.inspect(engine).revision == "9999_future"  # untouched


def test_an_older_revision_is_upgraded_on_sqlite_and_refused_on_postgresql(db_url, engines, tmp_path, capsys):
    engine = engines(db_url)
    init_schema(engine)
    with engine.begin() as conn:
        command.downgrade(migrate._config(conn), OLDER)
    config = write_config(tmp_path, db_url)
    assert main(["db", "current", "--config", config]) == 0
    assert printed(capsys).startswith(f"{OLDER} (behind this release's {migrate.head()}")
    if engine.dialect.name == "postgresql":
        with pytest.raises(SchemaError, match=f"{OLDER}.*pacsnode db upgrade"):
            init_schema(engine)  # what serve runs first
        assert main(["db", "upgrade", "--config", config]) == 0
        assert printed(capsys) == f"schema {OLDER} -> {migrate.head()}"
    else:
        with capture_logs() as logs:
            init_schema(engine)
        assert [e["from_revision"] for e in logs if e["event"] == "schema_upgraded"] == [OLDER]
    assert main(["db", "current", "--config", config]) == 0
    assert printed(capsys) == f"{migrate.head()} (head)"
    assert main(["db", "upgrade", "--config", config]) == 0
    assert "already at" in printed(capsys)


def test_processes_starting_together_create_the_schema_once(db_url, engines):
    made = [engines(db_url) for _ in range(4)]
    start = threading.Barrier(len(made))
    before: list[SchemaState] = []
    errors: list[BaseException] = []

    def starting(engine: sa.Engine) -> None:
        start.wait()
        try:
            before.append(migrate.prepare(engine).state)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=starting, args=(e,)) for e in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(before) == sorted([SchemaState.EMPTY] + [SchemaState.CURRENT] * 3)
    queue = JobQueue(made[0], QueueSection())
    with made[0].begin() as conn:
        queue.enqueue(conn, "1.2.3", 1, "routine")  # type: ignore[arg-type]
    assert queue.counts() == {JobState.QUEUED.value: 1}
