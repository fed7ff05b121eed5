"""Initial schema: studies, jobs, instances, results, job events, heartbeats.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("first_received_at", TS, nullable=False),
        sa.Column("last_received_at", TS, nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("route", sa.String(64)),
        sa.Column("model", sa.String(64)),
        sa.Column("series_uids", sa.JSON, nullable=False),
        sa.Column("destinations", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("send_attempts", sa.Integer, nullable=False),
        sa.Column("not_before", TS),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("heartbeat_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_instance_at", TS, nullable=False),
        sa.Column("closed_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("findings", sa.JSON),
        sa.Column("inference_seconds", sa.Float),
        sa.UniqueConstraint("study_id", "generation", name="uq_jobs_study_generation"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_state_not_before", "jobs", ["state", "not_before"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("body_part", sa.String(64), nullable=False),
        sa.Column("series_number", sa.Integer),
        sa.Column("instance_number", sa.Integer),
        sa.Column("image_type", sa.String(128), nullable=False),
        sa.Column("view_position", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(128), nullable=False),
        sa.Column("series_description", sa.String(128), nullable=False),
        sa.Column("orientation", sa.String(128), nullable=False),
        sa.Column("slice_position", sa.Float),
        sa.Column("rows", sa.Integer),
        sa.Column("columns", sa.Integer),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.create_index("ix_instances_job_id", "instances", ["job_id"])
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("sent_at", TS),
        sa.Column("last_error", sa.Text),
        sa.UniqueConstraint("job_id", "destination", "sop_instance_uid"),
    )
    op.create_index("ix_results_job_id", "results", ["job_id"])
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("src", sa.String(16)),
        sa.Column("dst", sa.String(16), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.create_table(
        "heartbeats",
        sa.Column("component", sa.String(160), primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("beat_at", TS, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in ("heartbeats", "job_events", "results", "instances", "jobs", "studies"):
        op.drop_table(table)
