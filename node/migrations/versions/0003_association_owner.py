"""Node identity on associations: ``associations.node_id`` names the process that holds an association
(node.roles.Identity), so a node starting on a shared database closes only its own dangling associations.

Nullable; rows from before keep NULL (treated as ownerless: any starting instance may close them).

Revision ID: 0003_association_owner
Revises: 0002_lease_columns
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_association_owner"
down_revision = "0002_lease_columns"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("associations", sa.Column("node_id", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("node_id")
