"""Shared spools: ``instances.spool_id`` names the spool holding each file (node.spools); its ``path`` is then
relative to that spool's root, so a worker on another host resolves it through its ``[spools]`` mount points.

Nullable; rows from before keep NULL and their absolute path, which readers use as it is.

Revision ID: 0004_instance_spool
Revises: 0003_association_owner
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_instance_spool"
down_revision = "0003_association_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("spool_id", sa.String(40)))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("spool_id")
