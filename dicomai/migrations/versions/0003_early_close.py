"""Early close: when the sender released its association, and the expected image counts.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("acquisition_number", sa.Integer))
        batch.add_column(sa.Column("images_in_acquisition", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("images_in_acquisition")
        batch.drop_column("acquisition_number")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("released_at")
