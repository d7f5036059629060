"""instances: content_digest ("<algorithm>:<hex>", BLAKE3 from now on) replaces sha256

Existing rows keep their SHA-256 as ``sha256:<hex>``; ingest still recognises an identical
re-send of such an instance as a duplicate (it digests the received bytes with SHA-256 for
that comparison only).

Downgrade: ``sha256`` gets the hex of every ``sha256:`` digest back; rows recorded with
another algorithm (``blake3:``) get an empty ``sha256``. Their files stay in the spool and
are screened as before, but the old code cannot tell an identical re-send of such an
instance from a new version (it records one more version).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_digest', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True))
    op.execute("UPDATE instances SET content_digest = 'sha256:' || sha256")
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.alter_column('content_digest', existing_type=sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False)
        batch_op.drop_index(batch_op.f('ix_instances_sha256'))
        batch_op.drop_column('sha256')
        batch_op.create_index(batch_op.f('ix_instances_content_digest'), ['content_digest'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.execute(
        "UPDATE instances SET sha256 = CASE WHEN content_digest LIKE 'sha256:%' "
        "THEN substr(content_digest, 8) ELSE '' END"
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.alter_column('sha256', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False)
        batch_op.drop_index(batch_op.f('ix_instances_content_digest'))
        batch_op.drop_column('content_digest')
        batch_op.create_index(batch_op.f('ix_instances_sha256'), ['sha256'], unique=False)
