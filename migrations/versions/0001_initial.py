"""Initial catalog schema: bases, adapters, versions, lineage, tags, deployments and their events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("revision", sa.String(200), nullable=True),
        sa.Column("architecture", sa.String(200), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("num_params", sa.BigInteger(), nullable=True),
        sa.Column("local_path", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_index(op.f("ix_base_models_fingerprint"), "base_models", ["fingerprint"])
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("kind IN ('expert','merge','unlearning')", name=op.f("ck_adapters_kind")),
        sa.ForeignKeyConstraint(["base_id"], ["base_models.id"], name=op.f("fk_adapters_base_id_base_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", name=op.f("uq_adapters_name")),
    )
    op.create_index(op.f("ix_adapters_base_id"), "adapters", ["base_id"])
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("task", sa.String(100), nullable=True),
        sa.Column("mask_method", sa.String(50), nullable=True),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("granularity", sa.String(20), nullable=True),
        sa.Column("block_size", sa.Integer(), nullable=True),
        sa.Column("target_modules", JSONType, nullable=True),
        sa.Column("nnz", sa.BigInteger(), nullable=False),
        sa.Column("nnz_per_param", JSONType, nullable=True),
        sa.Column("dtype", sa.String(20), nullable=True),
        sa.Column("mask_hash", sa.String(64), nullable=True),
        sa.Column("training_config", JSONType, nullable=True),
        sa.Column("metrics", JSONType, nullable=True),
        sa.Column("card", JSONType, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("hub_repo", sa.String(300), nullable=True),
        sa.Column("hub_commit", sa.String(64), nullable=True),
        sa.Column("hub_tag", sa.String(100), nullable=True),
        sa.Column("hub_endpoint", sa.String(300), nullable=True),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_versions_adapter_id_adapters"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("adapter_id", "number", name=op.f("uq_adapter_versions_adapter_id")),
    )
    op.create_index(op.f("ix_adapter_versions_content_hash"), "adapter_versions", ["content_hash"])
    op.create_index("ix_adapter_versions_task_created", "adapter_versions", ["task", "created_at"])
    op.create_table(
        "lineage_edges",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("child_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("relation", sa.String(20), nullable=False),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("params", JSONType, nullable=True),
        sa.CheckConstraint("relation IN ('finetuned_from','merged_from','unlearns','imported_from')",
                           name=op.f("ck_lineage_edges_relation")),
        sa.ForeignKeyConstraint(["child_id"], ["adapter_versions.id"],
                                name=op.f("fk_lineage_edges_child_id_adapter_versions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_id"], ["adapter_versions.id"],
                                name=op.f("fk_lineage_edges_parent_id_adapter_versions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage_edges")),
    )
    op.create_index(op.f("ix_lineage_edges_child_id"), "lineage_edges", ["child_id"])
    op.create_index(op.f("ix_lineage_edges_parent_id"), "lineage_edges", ["parent_id"])
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_tags_adapter_id_adapters"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"],
                                name=op.f("fk_tags_version_id_adapter_versions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("adapter_id", "name", name=op.f("uq_tags_adapter_id")),
    )
    op.create_index(op.f("ix_tags_version_id"), "tags", ["version_id"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state_fingerprint", sa.String(64), nullable=True),
        sa.Column("stack", JSONType, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["base_models.id"], name=op.f("fk_deployments_base_id_base_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint("name", name=op.f("uq_deployments_name")),
    )
    op.create_index(op.f("ix_deployments_base_id"), "deployments", ["base_id"])
    op.create_table(
        "deployment_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("scale", sa.Float(), nullable=True),
        sa.Column("stack", JSONType, nullable=True),
        sa.Column("state_fingerprint", sa.String(64), nullable=False),
        sa.Column("details", JSONType, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("action IN ('create','apply','revert','rollback','recover')",
                           name=op.f("ck_deployment_events_action")),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"],
                                name=op.f("fk_deployment_events_deployment_id_deployments"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"],
                                name=op.f("fk_deployment_events_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment_events")),
        sa.UniqueConstraint("deployment_id", "seq", name=op.f("uq_deployment_events_deployment_id")),
    )
    op.create_index(op.f("ix_deployment_events_version_id"), "deployment_events", ["version_id"])


def downgrade() -> None:
    op.drop_table("deployment_events")
    op.drop_table("deployments")
    op.drop_table("tags")
    op.drop_table("lineage_edges")
    op.drop_table("adapter_versions")
    op.drop_table("adapters")
    op.drop_table("base_models")
