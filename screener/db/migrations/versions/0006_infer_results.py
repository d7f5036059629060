"""infer_results: the infer stage's per-job results move from a spool file into the database

The infer stage used to write ``job-<id>/results.bin`` in the tensor spool (two fsyncs per
job) before committing the job's move to ``inferred``; the same bytes now go into
``infer_results`` in that transaction. A job that is ``inferred`` or ``reporting`` during
the upgrade has a file and no row: report finds no row and sends the job back to infer
(its prepared inputs are still in the spool), as for a lost results file.

Downgrade drops the table: jobs between infer and report then go back to infer the same
way under the old code.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 02:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'infer_results',
        sa.Column('job_id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('written_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['screening_jobs.id']),
        sa.PrimaryKeyConstraint('job_id'),
    )


def downgrade() -> None:
    op.drop_table('infer_results')
