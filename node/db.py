"""The database seam: engine creation and connection helpers; the schema itself is `node.schema` (re-exported here
as `metadata`), its migrations `node.migrate`.

`create_engine_for(url)` returns an engine tuned for the backend (SQLite: WAL, synchronous=FULL so a committed
row survives power loss, busy timeout for concurrent association threads). `init_schema(engine)` brings the
database to the schema this release runs on (`node.migrate.prepare`: creates it when empty, refuses a revision it
does not know). PostgreSQL URLs are passed through unchanged. `insert_for(engine)` gives the dialect's INSERT with
ON CONFLICT support; `reading`/`transaction` wrap a connection so SQLAlchemy errors surface as `DatabaseError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.errors import DatabaseError
from node.schema import metadata

__all__ = ["create_engine_for", "init_schema", "insert_for", "metadata", "reading", "transaction"]



def create_engine_for(url: str) -> Engine:
    """Create an engine for ``url``; for SQLite files the parent folder is created."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=8,
            max_overflow=24,
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def init_schema(engine: Engine) -> None:
    """Bring the database to this release's schema before anything uses it (`node.migrate.prepare`): an empty
    database gets the schema at the newest revision; an older one is upgraded on SQLite and refused on PostgreSQL
    (run ``pacsnode db upgrade``); a revision this release does not know is refused (`SchemaError`)."""
    from node.migrate import prepare  # alembic is imported only by what touches the schema

    prepare(engine)


def insert_for(engine: Engine) -> Callable[..., Any]:
    """The dialect's ``insert`` construct (it has ``on_conflict_do_update``/``_do_nothing``) for ``engine``."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


@contextmanager
def reading(engine: Engine, what: str) -> Iterator[sa.Connection]:
    """A connection for reads; database failures become `DatabaseError` naming ``what``."""
    try:
        with engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise DatabaseError(f"{what}: {type(exc).__name__}: {exc}") from exc


@contextmanager
def transaction(engine: Engine, what: str, conn: sa.Connection | None = None) -> Iterator[sa.Connection]:
    """``conn`` (the caller's transaction) or a new one committed on exit; failures become `DatabaseError`."""
    try:
        if conn is not None:
            yield conn
        else:
            with engine.begin() as own:
                yield own
    except SQLAlchemyError as exc:
        raise DatabaseError(f"{what}: {type(exc).__name__}: {exc}") from exc


def clock_skew_seconds(engine: Engine, clock: Callable[[], float] = time.time) -> float | None:
    """This host's clock minus the database server's (PostgreSQL; None for SQLite, which has no clock of its own),
    read around one query. Processes on several hosts compare each other's timestamps (a series' last instance,
    a lease's end), so their clocks must agree: each one's skew to the database bounds theirs. Raises
    `DatabaseError`."""
    if engine.dialect.name != "postgresql":
        return None
    with reading(engine, "clock") as conn:
        before = clock()
        server = float(conn.execute(sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())
        after = clock()
    return (before + after) / 2 - server
