"""Schema migrations: Alembic revisions in ``node/migrations/versions`` (shipped inside the package), applied through
Alembic's own API (`alembic.command`, `MigrationContext`) on the node's engine.

`inspect(engine)` says where a database stands (`SchemaState`: empty, current, behind, unversioned — tables made by
a release before migrations —, or unknown — a revision a newer release wrote). `upgrade(engine)` is ``pacsnode db
upgrade``: it adopts an unversioned database (creates what is missing of the baseline revision's snapshot: a table,
or a nullable column a later release added; then stamps the baseline) and runs every revision up to the newest.
`prepare(engine)` is what ``serve`` and the other commands run first: an empty database gets the schema at the
newest revision (``create_all`` + stamp, which tests/unit/test_migrate.py checks is the same schema the revisions
build); an older or unversioned one is upgraded on SQLite (the embedded database has one node) and refused on
PostgreSQL (other nodes of an older release may still use it: run ``pacsnode db upgrade`` when they are stopped);
an unknown revision is always refused. Each runs under a lock (PostgreSQL advisory lock, SQLite ``BEGIN
IMMEDIATE``), so processes starting together on one database create or upgrade it once.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.errors import DatabaseError, SchemaError
from node.logs import get_logger
from node.schema import metadata
from node.states import SchemaState

SCRIPT_LOCATION = "node:migrations"
BASELINE = "0001_baseline"
_LOCK_KEY = 0x7061_6373  # "pacs": the advisory lock migrations take on PostgreSQL
_SQLITE_LOCKED_RETRY_SECONDS = 30.0  # how long `prepare` retries SQLite's immediate "database is locked"
UPGRADE_COMMAND = "pacsnode db upgrade"
DOWNGRADE_COMMAND = "pacsnode db downgrade"


@dataclass(frozen=True)
class SchemaStatus:
    state: SchemaState
    revision: str | None  # the database's alembic_version (None: no version table)
    head: str  # this release's newest revision

    def describe(self) -> str:
        """One line for ``pacsnode db current`` and the refusals."""
        rev = self.revision or "none"
        return {
            SchemaState.EMPTY: f"{rev} (empty database; serve creates the schema at {self.head})",
            SchemaState.CURRENT: f"{rev} (head)",
            SchemaState.BEHIND: f"{rev} (behind this release's {self.head}: run `{UPGRADE_COMMAND}`)",
            SchemaState.UNVERSIONED: f"{rev} (tables from a release before migrations: `{UPGRADE_COMMAND}` adopts "
                                     f"them and upgrades to {self.head})",
            SchemaState.UNKNOWN: f"{rev} (unknown to this release, whose newest revision is {self.head}: a newer "
                                 "release wrote it)",
        }[self.state]


def _config(conn: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["connection"] = conn
    return config


@functools.cache
def script() -> ScriptDirectory:
    """The revisions shipped with this release."""
    return ScriptDirectory.from_config(_config())


def head() -> str:
    revision = script().get_current_head()
    assert revision is not None
    return revision


def inspect(engine: Engine) -> SchemaStatus:
    """Where ``engine``'s database stands; raises `DatabaseError` if it cannot be read."""
    try:
        with engine.connect() as conn:
            return _status(conn)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"schema: {type(exc).__name__}: {exc}") from exc


def _status(conn: sa.Connection) -> SchemaStatus:
    revision = MigrationContext.configure(conn).get_current_revision()
    newest = head()
    if revision is None:
        ours = set(sa.inspect(conn).get_table_names()) & set(metadata.tables)
        return SchemaStatus(SchemaState.UNVERSIONED if ours else SchemaState.EMPTY, None, newest)
    try:
        script().get_revision(revision)
    except CommandError:
        return SchemaStatus(SchemaState.UNKNOWN, revision, newest)
    return SchemaStatus(SchemaState.CURRENT if revision == newest else SchemaState.BEHIND, revision, newest)


def _unknown(status: SchemaStatus) -> SchemaError:
    return SchemaError(
        f"the database schema is at revision {status.revision}, which this release of pacsnode does not know (its "
        f"newest is {status.head}): a newer release has upgraded it; run that release, or, to go back to this one, "
        f"stop every node and run that release's `{DOWNGRADE_COMMAND} {status.head}` (`pacsnode db current` shows "
        "the revision)"
    )


def prepare(engine: Engine, *, upgrade_older: bool | None = None) -> SchemaStatus:
    """Make the database ready for this release (see the module docstring); returns its status before. Raises
    `SchemaError` for an unknown revision, or an older one when ``upgrade_older`` is false (default: true on SQLite
    only)."""
    if upgrade_older is None:
        upgrade_older = engine.dialect.name == "sqlite"
    deadline = time.monotonic() + _SQLITE_LOCKED_RETRY_SECONDS
    while True:
        try:
            return _prepare(engine, upgrade_older)
        except DatabaseError as exc:
            # SQLite can answer "database is locked" at once, without its busy timeout, while several processes
            # open a new database together (a connection's first read racing another's switch to WAL). Nothing was
            # written (the transaction rolled back): try again.
            if engine.dialect.name != "sqlite" or "database is locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05 + 0.2 * random.random())


def _prepare(engine: Engine, upgrade_older: bool) -> SchemaStatus:
    log = get_logger(component="schema")
    with _locked(engine) as conn:
        status = _status(conn)
        if status.state is SchemaState.UNKNOWN:
            raise _unknown(status)
        if status.state is SchemaState.EMPTY:
            metadata.create_all(conn)
            MigrationContext.configure(conn).stamp(script(), "head")
            log.info("schema_created", revision=status.head, backend=engine.dialect.name)
        elif status.state in (SchemaState.BEHIND, SchemaState.UNVERSIONED):
            if not upgrade_older:
                raise SchemaError(
                    f"the database schema is at revision {status.revision or 'none (from before migrations)'}, older "
                    f"than this release's {status.head}, and other nodes may still use it: stop them, run "
                    f"`{UPGRADE_COMMAND} --config <this config>`, then start the nodes of this release"
                )
            _upgrade(conn, status)
            log.warning("schema_upgraded", from_revision=status.revision, to_revision=status.head,
                        adopted=status.state is SchemaState.UNVERSIONED)
    return status


def upgrade(engine: Engine) -> SchemaStatus:
    """``pacsnode db upgrade``: bring the database to this release's newest revision, whatever older state it is in
    (an empty one is built by running every revision); returns its status before. Raises `SchemaError` for an
    unknown revision."""
    with _locked(engine) as conn:
        status = _status(conn)
        if status.state is SchemaState.UNKNOWN:
            raise _unknown(status)
        if status.state is not SchemaState.CURRENT:
            _upgrade(conn, status)
    get_logger(component="schema").info("schema_upgraded", from_revision=status.revision, to_revision=status.head,
                                        adopted=status.state is SchemaState.UNVERSIONED)
    return status


def downgrade(engine: Engine, revision: str) -> SchemaStatus:
    """``pacsnode db downgrade REVISION``: take the database back to ``revision``, an older revision this release
    knows (an older release's newest: the one it names when it refuses this database), running each later revision's
    ``downgrade`` under the migration lock; returns its status before. Raises `SchemaError` when the database is at a
    revision this release does not know, when ``revision`` is not one of this release's or not older than the
    database's, and `DatabaseError` when the database fails."""
    try:
        found = script().get_revision(revision)
    except CommandError:
        found = None
    if found is None or found.revision != revision:  # no prefixes or symbolic names ("base" would drop every table)
        raise SchemaError(f"{revision!r} is not a schema revision of this release (its revisions: "
                          f"{', '.join(r.revision for r in reversed(list(script().walk_revisions())))})")
    with _locked(engine) as conn:
        status = _status(conn)
        if status.state is SchemaState.UNKNOWN:
            raise _unknown(status)
        older = {r.revision for r in script().iterate_revisions(status.revision, "base")} if status.revision else set()
        if revision not in older - {status.revision}:
            raise SchemaError(f"cannot downgrade the database to {revision}: it is at "
                              f"{status.revision or 'no revision'}, which is not newer")
        command.downgrade(_config(conn), revision)
    get_logger(component="schema").warning("schema_downgraded", from_revision=status.revision, to_revision=revision)
    return status


def _upgrade(conn: sa.Connection, status: SchemaStatus) -> None:
    if status.state is SchemaState.UNVERSIONED:
        _adopt(conn)
    command.upgrade(_config(conn), "head")


def _adopt(conn: sa.Connection) -> None:
    """Stamp a database made by ``create_all`` before migrations as the baseline, after creating what a release
    before the newest pre-migration one left out (tables; nullable columns)."""
    baseline = script().get_revision(BASELINE).module.baseline()
    baseline.create_all(conn)
    inspector = sa.inspect(conn)
    for table in baseline.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise SchemaError(f"cannot adopt the database: table {table.name} lacks the required column "
                                  f"{column.name}")
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
    MigrationContext.configure(conn).stamp(script(), BASELINE)


@contextmanager
def _locked(engine: Engine) -> Iterator[sa.Connection]:
    """A transaction holding the migration lock; committed on exit. Database failures become `DatabaseError`."""
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            elif engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now: one process creates the schema
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"schema: {type(exc).__name__}: {exc}") from exc
