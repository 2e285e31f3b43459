"""Deployment ownership: a per-deployment id, the owner home's id, the folder path relative to that home.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

``uid`` is written into the deployment folder's marker (``.adapterhub/deployment.json``) too, so a
folder can be told apart from another catalog's folder with the same name; ``home_id`` is the id of
the home (``<home>/home-id``) that created the deployment and alone may change it; ``rel_path`` is
the folder relative to that home when it lives inside it (a moved home keeps its deployments).
Rows made before this revision keep NULLs: the first home that writes to such a deployment (or runs
``verify --repair``) adopts it if its folder is inside that home or outside every adapterhub home
(see adapterhub.apply.deployments, "Ownership").
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as b:
        b.add_column(sa.Column("uid", sa.String(32), nullable=True))
        b.add_column(sa.Column("home_id", sa.String(32), nullable=True))
        b.add_column(sa.Column("rel_path", sa.Text(), nullable=True))
        b.create_unique_constraint(op.f("uq_deployments_uid"), ["uid"])


def downgrade() -> None:
    with op.batch_alter_table("deployments") as b:
        b.drop_constraint(op.f("uq_deployments_uid"), type_="unique")
        b.drop_column("rel_path")
        b.drop_column("home_id")
        b.drop_column("uid")
