"""The database seam: one SQLAlchemy Core `MetaData` all stages add their tables to, and engine creation.

`create_engine_for(url)` returns an engine tuned for the backend (SQLite: WAL, synchronous=FULL so a committed
row survives power loss, busy timeout for concurrent association threads). `init_schema(engine)` creates any
missing tables. PostgreSQL URLs are passed through unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()


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
    """Create every table registered on `metadata` that does not exist yet (the modules that define tables must
    have been imported; `node.index` and the later stages register theirs at import)."""
    metadata.create_all(engine)
