"""Alembic's environment for the node's migrations: run by `node.migrate` (Alembic's command API) on the connection
it passes in ``config.attributes["connection"]``; the target schema is `node.schema.metadata`."""

from __future__ import annotations

from alembic import context

from node.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("node/migrations runs through node.migrate (pacsnode db upgrade), which passes a connection")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
