"""Persistence: SQLModel tables, engine/session helpers, Alembic migrations."""
