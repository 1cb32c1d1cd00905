"""The database schema in one place: every table the node uses, on one `MetaData` (SQLAlchemy Core).

The stages import their tables from here (`node.index`, `node.queue`, `node.dispatch`, ... re-export theirs), so
the whole schema exists as soon as this module is imported, whichever stage runs. Changes to it are made by an
Alembic revision in ``node/migrations/versions`` (`node.migrate` applies them; ``pacsnode db upgrade``), and
tests/unit/test_migrate.py checks that the migrations build exactly this schema on SQLite and PostgreSQL.

Leased work (`node.leases`) — ``jobs`` and ``deliveries`` — share one naming scheme: ``state``, ``holder`` (who
holds the lease), ``lease_until`` (epoch seconds; past it the row may be taken over), ``due_at`` (not claimed
before), ``attempts`` (claims so far) and ``last_error``.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

associations = sa.Table(
    "associations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("called_ae", sa.String(16), nullable=False),
    sa.Column("peer", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("closed_at", sa.Float),
    sa.Column("node_id", sa.String(64)),  # the process that holds it (node.roles.Identity); NULL: older rows
)

series = sa.Table(
    "series",
    metadata,
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
    sa.Column("route", sa.String(64)),  # the route (or built-in rule) that decided at the last completion
    sa.Column("purged_at", sa.Float),  # when retention deleted its instances (the row stays: version, route)
    # node.index.instance_set_digest of the instances retention deleted: the same series sent again unchanged
    # (a PACS re-sending a prior) completes as it was, no new version that would withdraw its results
    sa.Column("purged_digest", sa.String(64)),
    # node.index.instance_members of every instance retention ever deleted from it (8 bytes each): a re-send of
    # part of the series, each instance unchanged, completes as it was too
    sa.Column("purged_members", sa.LargeBinary),
    # The status page's "recent series" (newest first, LIMIT) and its series-per-route counts read these, not the
    # table: series rows are never deleted, so the table only grows (migration 0007)
    sa.Index("ix_series_recent", "last_received_at", "series_uid"),
    sa.Index("ix_series_route", "route"),
)

instances = sa.Table(
    "instances",
    metadata,
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
    # The spool holding the file (node.spools); ``path`` is then relative to that spool's root. NULL: an older row
    # whose ``path`` is absolute.
    sa.Column("spool_id", sa.String(40)),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("holder", sa.String(64)),  # the worker holding the lease (state running)
    sa.Column("lease_until", sa.Float),
    sa.Column("due_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("queue_seconds", sa.Float),
    sa.Column("inference_seconds", sa.Float),
    sa.Column("skip_reason", sa.String(64)),
    sa.Column("last_error", sa.Text),
    sa.Column("pipeline", sa.String(32)),  # the routed pipeline (PipelineName); NULL in rows from before routes
    sa.UniqueConstraint("series_uid", "version", name="uq_jobs_series_version"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("destination", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("files", sa.Text, nullable=False),  # JSON list of Part 10 paths, in sending order
    sa.Column("sop_uids", sa.Text, nullable=False),  # JSON list, sop_uids[i] is the instance in files[i]
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float, nullable=False),  # enqueue or last `retry`: the give-up clock's start
    sa.Column("due_at", sa.Float, nullable=False),  # the next attempt, not before
    sa.Column("last_attempt_at", sa.Float),
    sa.Column("delivered_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("holder", sa.String(64)),  # the dispatcher sending it (state sending)
    sa.Column("lease_until", sa.Float),  # past this, a sending row is presumed orphaned and may be reclaimed
    sa.UniqueConstraint("series_uid", "version", "destination", name="uq_deliveries_result_destination"),
    sa.Index("ix_deliveries_due", "destination", "state", "due_at"),
    sa.Index("ix_deliveries_state", "state", "id"),  # dead letters, newest first (status page, retry all; 0007)
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),  # the source series
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # sr | seg | key-images | skipped-sr | kos
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("result_series_uid", sa.String(64), nullable=False),
    sa.Column("sop_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("series_uid", "version", "kind", name="uq_results_series_version_kind"),
)

commitments = sa.Table(
    "commitments",
    metadata,
    sa.Column("delivery_id", sa.Integer, primary_key=True, autoincrement=False),  # deliveries.id
    sa.Column("destination", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("study_uid", sa.String(64)),
    sa.Column("refs", sa.Text, nullable=False),  # JSON [[sop_class_uid, sop_instance_uid], ...]
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("transaction_uid", sa.String(64), unique=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("stored_at", sa.Float, nullable=False),
    sa.Column("deadline", sa.Float, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("requested_at", sa.Float),
    sa.Column("reported_at", sa.Float),
    sa.Column("failed", sa.Text),  # JSON [[sop_instance_uid, reason], ...] the PACS reported or QIDO-RS missed
    sa.Column("last_error", sa.Text),
)

destination_checks = sa.Table(
    "destination_checks",
    metadata,
    sa.Column("destination", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("reachable", sa.Boolean, nullable=False),
    sa.Column("checked_at", sa.Float, nullable=False),
    sa.Column("last_success_at", sa.Float),
    sa.Column("seconds", sa.Float),  # how long the check took
    sa.Column("reason", sa.Text),  # why not reachable (None when reachable)
)
