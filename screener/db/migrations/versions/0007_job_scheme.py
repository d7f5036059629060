"""screening_jobs: the classifier scheme and the threshold value a job was screened with

``reprocess`` decides whether a study's outputs would change from what its latest job
recorded. Model name, version and threshold version were not enough: switching
``model.scheme`` (crop -> segment: another classifier of the same model version) or
pinning ``threshold.default_value`` (version 0 with another value) left every study
"unchanged". Rows written before this revision have NULL in both: unknown, so reprocess
judges them by what they do record (as before) and ``--force`` re-screens them.

Downgrade drops the two columns.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('screening_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheme', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('threshold_value', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('screening_jobs', schema=None) as batch_op:
        batch_op.drop_column('threshold_value')
        batch_op.drop_column('scheme')
