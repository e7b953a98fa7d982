"""snapshots; a machine's pause, snapshot and fork source (issue 15)

Revision ID: 0012
Revises: 0010 (the merger re-chains it after 0011)
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # SQLite keeps enums as plain strings; PostgreSQL's native type needs the value.
        op.execute("ALTER TYPE machinestate ADD VALUE IF NOT EXISTS 'paused'")
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("paused_from", sa.String(), nullable=True))
        batch.add_column(sa.Column("snapshot_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("forked_from", sa.String(), nullable=True))
        batch.create_index("ix_machines_snapshot_id", ["snapshot_id"], unique=False)
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("state", sa.Enum("taking", "ready", name="snapshotstate"), nullable=False),
        sa.Column("machine_id", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False, server_default="local"),
        sa.Column("image", sa.String(), nullable=False),
        sa.Column("base_image", sa.String(), nullable=False),
        sa.Column("volume_snapshot", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=True),
        sa.Column("repo_name", sa.String(), nullable=True),
        sa.Column("ref", sa.String(), nullable=True),
        sa.Column("commit", sa.String(), nullable=True),
        sa.Column("branch", sa.String(), nullable=True),
        sa.Column("cpus", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("network", sa.String(), nullable=False),
        sa.Column("setup", sa.JSON(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("has_memory", sa.Boolean(), nullable=False),
        sa.Column("memory_reason", sa.String(), nullable=True),
        sa.Column("shared_blocks", sa.Boolean(), nullable=False),
        sa.Column("took_ms", sa.Float(), nullable=False),
        sa.Column("paused_ms", sa.Float(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("snapshots") as batch:
        for column in ("state", "machine_id", "created_at"):
            batch.create_index(f"ix_snapshots_{column}", [column], unique=False)


def downgrade() -> None:
    op.drop_table("snapshots")
    with op.batch_alter_table("machines") as batch:
        batch.drop_index("ix_machines_snapshot_id")
        batch.drop_column("forked_from")
        batch.drop_column("snapshot_id")
        batch.drop_column("paused_from")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TYPE IF EXISTS snapshotstate")
