"""The baseline: the schema as `metadata.create_all` made it before migrations existed (releases up to 0.1.0).

`node.migrate` also uses `baseline` to adopt a database of such a release: it creates what is missing of this
snapshot (a table or a nullable column added by a later release), stamps this revision and upgrades from there.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _received(md: sa.MetaData) -> None:
    """associations, series, instances"""
    sa.Table(
        "associations",
        md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("called_ae", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float),
    )
    sa.Table(
        "series",
        md,
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False, index=True),
        sa.Column("modality", sa.String(16)),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("instance_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("expected_count", sa.Integer),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("last_association_id", sa.String(32)),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("state_changed_at", sa.Float, nullable=False),
        sa.Column("route", sa.String(64)),
        sa.Column("purged_at", sa.Float),
    )
    sa.Table(
        "instances",
        md,
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), nullable=False, index=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("image_position", sa.String(96)),
        sa.Column("image_orientation", sa.String(160)),
        sa.Column("frame_of_reference_uid", sa.String(64)),
        sa.Column("number_of_frames", sa.Integer),
        sa.Column("images_in_acquisition", sa.Integer),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("association_id", sa.String(32)),
    )


def _leased(md: sa.MetaData) -> None:
    """jobs, deliveries (the lease columns under their old names)"""
    sa.Table(
        "jobs",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("worker_id", sa.String(64)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("queue_seconds", sa.Float),
        sa.Column("inference_seconds", sa.Float),
        sa.Column("skip_reason", sa.String(64)),
        sa.Column("last_error", sa.Text),
        sa.Column("pipeline", sa.String(32)),
        sa.UniqueConstraint("series_uid", "version", name="uq_jobs_series_version"),
    )
    sa.Table(
        "deliveries",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("files", sa.Text, nullable=False),
        sa.Column("sop_uids", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("queued_at", sa.Float, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_attempt_at", sa.Float),
        sa.Column("delivered_at", sa.Float),
        sa.Column("last_error", sa.Text),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("lease_until", sa.Float),
        sa.UniqueConstraint("series_uid", "version", "destination", name="uq_deliveries_result_destination"),
        sa.Index("ix_deliveries_due", "destination", "state", "next_attempt_at"),
    )


def _outcomes(md: sa.MetaData) -> None:
    """results, commitments, destination_checks"""
    sa.Table(
        "results",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("result_series_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("series_uid", "version", "kind", name="uq_results_series_version_kind"),
    )
    sa.Table(
        "commitments",
        md,
        sa.Column("delivery_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("destination", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("refs", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("transaction_uid", sa.String(64), unique=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stored_at", sa.Float, nullable=False),
        sa.Column("deadline", sa.Float, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("requested_at", sa.Float),
        sa.Column("reported_at", sa.Float),
        sa.Column("failed", sa.Text),
        sa.Column("last_error", sa.Text),
    )
    sa.Table(
        "destination_checks",
        md,
        sa.Column("destination", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reachable", sa.Boolean, nullable=False),
        sa.Column("checked_at", sa.Float, nullable=False),
        sa.Column("last_success_at", sa.Float),
        sa.Column("seconds", sa.Float),
        sa.Column("reason", sa.Text),
    )


def baseline() -> sa.MetaData:
    """This revision's schema, frozen (later revisions change the database, never this)."""
    md = sa.MetaData()
    for tables in (_received, _leased, _outcomes):
        tables(md)
    return md


def upgrade() -> None:
    baseline().create_all(op.get_bind())


def downgrade() -> None:
    baseline().drop_all(op.get_bind())
