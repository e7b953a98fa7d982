"""every JUnit result per repo and test, and what they say of each test (issue 13)

Revision ID: 0009
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "test_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("test", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("commit", sa.String(), nullable=True),
        sa.Column("clean", sa.Boolean(), nullable=True),
        sa.Column("retry", sa.Boolean(), nullable=False),
        sa.Column("artifact_id", sa.String(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("test_results") as batch:
        batch.create_index("ix_test_results_run_id", ["run_id"])
        batch.create_index("ix_test_results_repo_test", ["repo", "test"])
        batch.create_index("ix_test_results_repo_commit", ["repo", "commit"])

    op.create_table(
        "test_stats",
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("test", sa.String(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("clean_passes", sa.Integer(), nullable=False),
        sa.Column("clean_failures", sa.Integer(), nullable=False),
        sa.Column("retry_passes", sa.Integer(), nullable=False),
        sa.Column("same_tree", sa.Boolean(), nullable=False),
        sa.Column("fail_streak", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.String(), nullable=False),
        sa.Column("last_commit", sa.String(), nullable=True),
        sa.Column("last_run_id", sa.String(), nullable=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("repo", "test"),
    )
    with op.batch_alter_table("test_stats") as batch:
        batch.create_index("ix_test_stats_last_seen", ["last_seen"])


def downgrade() -> None:
    op.drop_table("test_stats")
    op.drop_table("test_results")
