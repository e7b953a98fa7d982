"""leases, pools, runs and stages (issue 3)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("template", sa.JSON(), nullable=True),
        sa.Column("min_ready", sa.Integer(), nullable=False),
        sa.Column("max_machines", sa.Integer(), nullable=False),
        sa.Column("reset", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("machine_id", sa.String(), nullable=False),
        sa.Column("pool", sa.String(), nullable=True),
        sa.Column("holder", sa.String(), nullable=False),
        sa.Column("owner_token_id", sa.String(), nullable=True),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column(
            "state", sa.Enum("active", "released", "expired", name="leasestate"), nullable=False
        ),
        sa.Column("ttl_s", sa.Float(), nullable=False),
        sa.Column("wait_ms", sa.Float(), nullable=False),
        sa.Column("requested_at", _TS, nullable=False),
        sa.Column("acquired_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("ended_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("leases") as batch_op:
        batch_op.create_index("ix_leases_machine_id", ["machine_id"])
        batch_op.create_index("ix_leases_pool", ["pool"])
        batch_op.create_index("ix_leases_state", ["state"])
        batch_op.create_index("ix_leases_acquired_at", ["acquired_at"])
        batch_op.create_index("ix_leases_expires_at", ["expires_at"])
    op.create_table(
        "runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("task", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("ref", sa.String(), nullable=False),
        sa.Column("pool", sa.String(), nullable=True),
        sa.Column(
            "status",
            sa.Enum("queued", "running", "passed", "failed", "cancelled", name="runstatus"),
            nullable=False,
        ),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("machine_id", sa.String(), nullable=True),
        sa.Column("lease_id", sa.String(), nullable=True),
        sa.Column("context_recreations", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("runs") as batch_op:
        batch_op.create_index("ix_runs_status", ["status"])
        batch_op.create_index("ix_runs_created_at", ["created_at"])
        batch_op.create_index("ix_runs_finished_at", ["finished_at"])
    op.create_table(
        "stages",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "running",
                "passed",
                "failed",
                "cancelled",
                "skipped",
                name="stagestatus",
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("summary", sa.String(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("history", sa.JSON(), nullable=True),
        sa.Column("machine_id", sa.String(), nullable=True),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("stages") as batch_op:
        batch_op.create_index("ix_stages_run_id", ["run_id"])


def downgrade() -> None:
    op.drop_table("stages")
    op.drop_table("runs")
    op.drop_table("leases")
    op.drop_table("pools")
    for enum in ("stagestatus", "runstatus", "leasestate"):
        sa.Enum(name=enum).drop(op.get_bind(), checkfirst=True)
