"""In-flight trials: what a driver launched and has not recorded yet, so that a resume after a
crash records each as ``interrupted`` with the device time it ran.

Revision ID: v0.2.0_inflight
Revises: v0.1.0_initial
Create Date: 2026-11-30

Named by release, as Optuna names its revisions. Kept frozen: it does not import the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "v0.2.0_inflight"
down_revision = "v0.1.0_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nas_inflight",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("arch_hash", sa.String(length=64), nullable=True),
        sa.Column("trial", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("alive_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["nas_studies.id"], name=op.f("fk_nas_inflight_study_id_nas_studies"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["arch_hash"], ["nas_architectures.hash"],
                                name=op.f("fk_nas_inflight_arch_hash_nas_architectures")),
        sa.PrimaryKeyConstraint("study_id", "key", name=op.f("pk_nas_inflight")),
    )


def downgrade() -> None:
    op.drop_table("nas_inflight")
