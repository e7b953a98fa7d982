"""hosts: the engines of a fleet, and the host each machine was placed on (issue 14)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

HOST_STATES = ("ready", "unreachable", "cordoned", "draining")


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("url", sa.String(), nullable=False),
        sa.Column("tls", sa.JSON(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("cpus", sa.Float(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("disk_gb", sa.Float(), nullable=True),
        sa.Column("max_machines", sa.Integer(), nullable=True),
        sa.Column("state", sa.Enum(*HOST_STATES, name="hoststate"), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("state_before", sa.Enum(*HOST_STATES, name="hoststate"), nullable=True),
        sa.Column("engine_version", sa.String(), nullable=True),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("images", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("hosts") as batch:
        batch.create_index("ix_hosts_state", ["state"], unique=False)
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("host", sa.String(), nullable=False, server_default="local"))
        batch.create_index("ix_machines_host", ["host"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_index("ix_machines_host")
        batch.drop_column("host")
    op.drop_table("hosts")
    sa.Enum(name="hoststate").drop(op.get_bind(), checkfirst=True)
