"""an agent's snapshots and forks are its own (issue 15 hardening)

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("reserved_for", sa.String(), nullable=True))
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("owner_token_id", sa.String(), nullable=True))
        batch.create_index("ix_snapshots_owner_token_id", ["owner_token_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_index("ix_snapshots_owner_token_id")
        batch.drop_column("owner_token_id")
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("reserved_for")
