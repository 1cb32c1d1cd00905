"""An unchanged re-send after retention: ``series.purged_digest`` holds `node.index.instance_set_digest` of the
instances retention deleted, so the same series sent again completes as it was instead of becoming a new version.

Nullable; series purged before keep NULL (a re-send of one of them is a new version, as before).

Revision ID: 0005_purged_digest
Revises: 0004_instance_spool
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_purged_digest"
down_revision = "0004_instance_spool"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("series", sa.Column("purged_digest", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("purged_digest")
