"""web_sessions: console sessions kept on the server, so that logout really ends one

A session cookie used to be valid on its own until it expired (12 h), even after logout: a
copied cookie kept working. Each login now writes a row here (keyed by the SHA-256 of the
cookie's random token); logout deletes it, and a session idle longer than
``http.session_idle_minutes`` is refused. Cookies issued before this revision name no row:
everyone signs in again once.

Downgrade drops the table.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 18:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('web_sessions',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_seen_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_web_sessions_user_id'), ['user_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_web_sessions_last_seen_at'), ['last_seen_at'], unique=False)


def downgrade() -> None:
    op.drop_table('web_sessions')
