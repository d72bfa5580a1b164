"""The first schema of the study store: studies, architectures, devices, evaluations, metrics, front, exports.

Revision ID: v0.1.0_initial
Revises:
Create Date: 2026-05-20

Named by release, as Optuna names its revisions. Kept frozen: it does not import the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "v0.1.0_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nas_architectures",
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=True),
        sa.Column("flops", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_nas_architectures")),
    )
    op.create_table(
        "nas_devices",
        sa.Column("key", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_nas_devices")),
    )
    op.create_table(
        "nas_studies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("budget", sa.Text(), nullable=False),
        sa.Column("used_seconds", sa.Double(), nullable=False),
        sa.Column("trials_done", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=True),
        sa.Column("stop_requested", sa.Boolean(), nullable=False),
        sa.Column("driver_pid", sa.Integer(), nullable=True),
        sa.Column("driver_host", sa.String(length=255), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nas_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_nas_studies_name")),
    )
    op.create_table(
        "nas_evaluations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arch_hash", sa.String(length=64), nullable=True),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("trial", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("device_key", sa.String(length=16), nullable=True),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["arch_hash"], ["nas_architectures.hash"],
                                name=op.f("fk_nas_evaluations_arch_hash_nas_architectures")),
        sa.ForeignKeyConstraint(["device_key"], ["nas_devices.key"],
                                name=op.f("fk_nas_evaluations_device_key_nas_devices")),
        sa.ForeignKeyConstraint(["study_id"], ["nas_studies.id"],
                                name=op.f("fk_nas_evaluations_study_id_nas_studies"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nas_evaluations")),
        sa.UniqueConstraint("study_id", "key", name=op.f("uq_nas_evaluations_study_id_key")),
    )
    op.create_index(op.f("ix_nas_evaluations_arch_hash"), "nas_evaluations", ["arch_hash"], unique=False)
    op.create_index(op.f("ix_nas_evaluations_device_key"), "nas_evaluations", ["device_key"], unique=False)
    op.create_index(op.f("ix_nas_evaluations_study_id_stage"), "nas_evaluations", ["study_id", "stage"], unique=False)
    op.create_table(
        "nas_exports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arch_hash", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["arch_hash"], ["nas_architectures.hash"],
                                name=op.f("fk_nas_exports_arch_hash_nas_architectures")),
        sa.ForeignKeyConstraint(["study_id"], ["nas_studies.id"],
                                name=op.f("fk_nas_exports_study_id_nas_studies"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nas_exports")),
    )
    op.create_index(op.f("ix_nas_exports_arch_hash"), "nas_exports", ["arch_hash"], unique=False)
    op.create_index(op.f("ix_nas_exports_study_id"), "nas_exports", ["study_id"], unique=False)
    op.create_table(
        "nas_front",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arch_hash", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["arch_hash"], ["nas_architectures.hash"],
                                name=op.f("fk_nas_front_arch_hash_nas_architectures")),
        sa.ForeignKeyConstraint(["study_id"], ["nas_studies.id"],
                                name=op.f("fk_nas_front_study_id_nas_studies"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id", "arch_hash", name=op.f("pk_nas_front")),
    )
    op.create_index(op.f("ix_nas_front_arch_hash"), "nas_front", ["arch_hash"], unique=False)
    op.create_table(
        "nas_metrics",
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["evaluation_id"], ["nas_evaluations.id"],
                                name=op.f("fk_nas_metrics_evaluation_id_nas_evaluations"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("evaluation_id", "metric", name=op.f("pk_nas_metrics")),
    )


def downgrade() -> None:
    op.drop_table("nas_metrics")
    op.drop_index(op.f("ix_nas_front_arch_hash"), table_name="nas_front")
    op.drop_table("nas_front")
    op.drop_index(op.f("ix_nas_exports_study_id"), table_name="nas_exports")
    op.drop_index(op.f("ix_nas_exports_arch_hash"), table_name="nas_exports")
    op.drop_table("nas_exports")
    op.drop_index(op.f("ix_nas_evaluations_study_id_stage"), table_name="nas_evaluations")
    op.drop_index(op.f("ix_nas_evaluations_device_key"), table_name="nas_evaluations")
    op.drop_index(op.f("ix_nas_evaluations_arch_hash"), table_name="nas_evaluations")
    op.drop_table("nas_evaluations")
    op.drop_table("nas_studies")
    op.drop_table("nas_devices")
    op.drop_table("nas_architectures")
