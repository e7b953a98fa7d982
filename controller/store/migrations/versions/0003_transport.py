"""SSH transport, sessions (issue 4): no tables.

Sessions, port forwards and the SSH connection pool live in the controller process (a
shell cannot outlive the connection it runs on), and the key pair is a file in the data
dir, so this revision changes nothing; it stays to keep the revision chain whole.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa  # noqa: F401
import sqlmodel  # noqa: F401
from alembic import op  # noqa: F401

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
