"""State roots: incremental Merkle fingerprints of deployment states (issue 19).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Adds ``base_models.state_root``, ``deployments.state_root``, ``deployment_events.state_root`` and
``deployment_events.measured``; ``deployment_events.state_fingerprint`` becomes nullable (from now on it is
recorded only where known without reading the model).

Existing rows: every event before this revision hashed the whole model, so ``measured`` is set to true and
``state_fingerprint`` kept; ``state_root`` stays NULL — computed lazily, not here (a migration must not read
gigabytes of weights): a base's root at its next ``deploy create``, a deployment's at its next operation,
which then measures the folder once, checks the identity-style hash against the recorded
``state_fingerprint`` exactly as before, and records the root (docs/deployments.md).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as b:
        b.add_column(sa.Column("state_root", sa.String(64), nullable=True))
    with op.batch_alter_table("deployments") as b:
        b.add_column(sa.Column("state_root", sa.String(64), nullable=True))
    with op.batch_alter_table("deployment_events") as b:
        b.add_column(sa.Column("state_root", sa.String(64), nullable=True))
        b.add_column(sa.Column("measured", sa.Boolean(), nullable=True))
    events = sa.table("deployment_events", sa.column("measured", sa.Boolean()))
    op.execute(events.update().values(measured=True))
    with op.batch_alter_table("deployment_events") as b:
        b.alter_column("measured", existing_type=sa.Boolean(), nullable=False)
        b.alter_column("state_fingerprint", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    # Events recorded after 0004 may lack an identity-style fingerprint: they get their state root there, so the
    # column can be NOT NULL again (a downgraded catalog compares it with a full hash and refuses until verified).
    ev = sa.table("deployment_events", sa.column("state_fingerprint", sa.String(64)),
                  sa.column("state_root", sa.String(64)))
    op.execute(ev.update().where(ev.c.state_fingerprint.is_(None)).values(state_fingerprint=ev.c.state_root))
    dep = sa.table("deployments", sa.column("state_fingerprint", sa.String(64)), sa.column("state_root", sa.String(64)))
    op.execute(dep.update().where(dep.c.state_fingerprint.is_(None)).values(state_fingerprint=dep.c.state_root))
    with op.batch_alter_table("deployment_events") as b:
        b.alter_column("state_fingerprint", existing_type=sa.String(64), nullable=False)
        b.drop_column("measured")
        b.drop_column("state_root")
    # plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch copy would drop and recreate these tables, which
    # SQLite refuses while other tables' rows reference them (foreign keys are on)
    op.drop_column("deployments", "state_root")
    op.drop_column("base_models", "state_root")
