"""deliveries that survive outages: give-up horizon, circuit breaker, retention marks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('destination_health',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('down_since', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('next_probe_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('probe_started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('last_success_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('last_failure_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('first_attempt_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('output_objects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pruned_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('output_objects', schema=None) as batch_op:
        batch_op.drop_column('pruned_at')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('first_attempt_at')
        batch_op.drop_column('created_at')
    op.drop_table('destination_health')
