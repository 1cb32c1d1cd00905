"""Indexes for the status page (node/admin.py), whose reads must not grow with the history: series rows are never
deleted, so "recent series" (newest first) reads ``ix_series_recent`` backwards instead of sorting the whole table,
the series-per-route counts read ``ix_series_route``, and the dead letters (newest first; also ``POST /admin/retry
all=deliveries``) read ``ix_deliveries_state`` instead of scanning every delivery.

Revision ID: 0007_admin_indexes
Revises: 0006_purged_members
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0007_admin_indexes"
down_revision = "0006_purged_members"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_series_recent", "series", ["last_received_at", "series_uid"])
    op.create_index("ix_series_route", "series", ["route"])
    op.create_index("ix_deliveries_state", "deliveries", ["state", "id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_state", table_name="deliveries")
    op.drop_index("ix_series_route", table_name="series")
    op.drop_index("ix_series_recent", table_name="series")
