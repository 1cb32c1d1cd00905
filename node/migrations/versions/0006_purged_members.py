"""A partial unchanged re-send after retention: ``series.purged_members`` holds `node.index.instance_members` of
every instance retention deleted from the series (8 bytes each), so a re-send of some of them, each unchanged,
completes as it was instead of becoming a new version built from the part that came back.

Nullable; series purged before keep NULL and only their whole-set ``purged_digest`` (an unchanged re-send of the
whole series still completes as it was; a partial one is a new version, as before).

Revision ID: 0006_purged_members
Revises: 0005_purged_digest
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_purged_members"
down_revision = "0005_purged_digest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("series", sa.Column("purged_members", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("purged_members")
