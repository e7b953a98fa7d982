"""lease secrets (issue 12): a lease's token is a secret stored hashed, apart from its fence

``leases.token`` (the machine's fence at the grant, which was also the credential) becomes
``leases.fence``; ``token_hash`` holds the SHA-256 of the secret, ``claim_hash`` and
``claimed_by`` a remote stage's claim made under the lease.

Leases active at the upgrade are ended (``expired``): their holders only know the old
number, which is no longer a credential, and no secret can be handed to them. Their
machines are then leased by nobody, and the reaper brings them back per their pool's reset
policy within a tick; a run in flight takes a fresh lease (a context re-creation).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.alter_column("token", new_column_name="fence", existing_type=sa.Integer())
        batch_op.add_column(sa.Column("token_hash", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("claim_hash", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(), nullable=True))
    op.execute(
        "UPDATE leases SET state = 'expired', ended_at = CURRENT_TIMESTAMP WHERE state = 'active'"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE leases SET state = 'expired', ended_at = CURRENT_TIMESTAMP WHERE state = 'active'"
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("claim_hash")
        batch_op.drop_column("token_hash")
        batch_op.alter_column("fence", new_column_name="token", existing_type=sa.Integer())
