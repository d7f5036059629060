"""users of the web console, process heartbeats for /healthz, stage timings for /metrics

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('password_hash', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_login_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_name'), ['name'], unique=True)
    op.create_table('process_heartbeats',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('queues', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('beat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('process_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_process_heartbeats_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_process_heartbeats_beat_at'), ['beat_at'], unique=False)
    op.create_table('stage_timings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('stage_timings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stage_timings_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_stage_timings_stage'), ['stage'], unique=False)


def downgrade() -> None:
    op.drop_table('stage_timings')
    op.drop_table('process_heartbeats')
    op.drop_table('users')
