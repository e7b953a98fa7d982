"""failure signatures and their hits; the quarantined machine state (issue 13)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # SQLite keeps enums as plain strings; PostgreSQL's native type needs the value.
        op.execute("ALTER TYPE machinestate ADD VALUE IF NOT EXISTS 'quarantined'")
    op.create_table(
        "signatures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("signature", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_seen", _TS, nullable=False),
        sa.Column("last_seen", _TS, nullable=False),
        sa.Column("sample", sa.String(), nullable=False),
        sa.Column("normalized", sa.String(), nullable=False),
        sa.Column("fixed_by", sa.String(), nullable=True),
        sa.Column("fixed_at", _TS, nullable=True),
        sa.Column("fix_excerpt", sa.String(), nullable=True),
        sa.UniqueConstraint("signature", "repo", "stage", name="uq_signatures_repo_stage"),
    )
    with op.batch_alter_table("signatures") as batch:
        batch.create_index("ix_signatures_signature", ["signature"])
        batch.create_index("ix_signatures_kind", ["kind"])
        batch.create_index("ix_signatures_repo", ["repo"])
        batch.create_index("ix_signatures_last_seen", ["last_seen"])
    op.create_table(
        "signature_hits",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("signature", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.String(), nullable=True),
        sa.Column("at", _TS, nullable=False),
    )
    with op.batch_alter_table("signature_hits") as batch:
        for column in ("signature", "repo", "run_id", "machine_id", "at"):
            batch.create_index(f"ix_signature_hits_{column}", [column])


def downgrade() -> None:
    op.drop_table("signature_hits")
    op.drop_table("signatures")
