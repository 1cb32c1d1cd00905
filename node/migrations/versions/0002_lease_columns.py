"""One naming scheme for leased work (node/leases.py): jobs and deliveries name their lease columns alike.

jobs: worker_id → holder, lease_expires_at → lease_until, not_before → due_at;
deliveries: claimed_by → holder, next_attempt_at → due_at (lease_until kept). ``ALTER TABLE ... RENAME COLUMN``
on both backends (SQLite ≥ 3.25 renames the column in its indexes too, as PostgreSQL does); no data is copied.

Revision ID: 0002_lease_columns
Revises: 0001_baseline
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0002_lease_columns"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

RENAMES = (
    ("jobs", "worker_id", "holder"),
    ("jobs", "lease_expires_at", "lease_until"),
    ("jobs", "not_before", "due_at"),
    ("deliveries", "claimed_by", "holder"),
    ("deliveries", "next_attempt_at", "due_at"),
)


def upgrade() -> None:
    for table, old, new in RENAMES:
        op.alter_column(table, old, new_column_name=new)


def downgrade() -> None:
    for table, old, new in reversed(RENAMES):
        op.alter_column(table, new, new_column_name=old)
