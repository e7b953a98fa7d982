"""forking stages and prebuilt pools (issue 15)

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("fork", sa.JSON(), nullable=True))
    op.execute("UPDATE stages SET fork = '{}' WHERE fork IS NULL")  # stages before: not forked
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("prebuilt", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("prebuilt")
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("fork")
