"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_DETAIL = re.compile(r"\nDETAIL:.*?(?=\n[A-Z]+:|\n\[SQL|\Z)", re.S)
DETAIL_HIDDEN = "\nDETAIL:  hidden (it may quote a patient's data)"


def _hide_details(context: ExceptionContext) -> None:
    """Drop PostgreSQL's DETAIL from a database error before anyone logs it.

    DETAIL quotes what a constraint refused: the key (``Key (patient_id)=(...)``) or the
    whole row (``Failing row contains (...)``), patient IDs and names included. The
    statement's parameters are hidden by ``hide_parameters``; the primary message and
    the SQL stay, which is what an operator needs.
    """
    for exc in (context.original_exception, context.sqlalchemy_exception):
        if exc is not None and exc.args and isinstance(exc.args[0], str):
            exc.args = (_DETAIL.sub(DETAIL_HIDDEN, exc.args[0]), *exc.args[1:])


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the listener write while workers read; busy_timeout rides out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One pooled engine per URL and process."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,  # statement parameters hold patient names and IDs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, hide_parameters=True
    )
    event.listen(engine, "handle_error", _hide_details)
    return engine


def dispose_engines() -> None:
    """Forget pooled engines (after fork, or at the end of a test); new ones are made lazily."""
    get_engine.cache_clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = Session(get_engine(url), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade(url: str, revision: str = "heads") -> None:
    """Apply Alembic migrations up to ``revision`` (``screener db upgrade``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["engine"] = get_engine(url)
    command.upgrade(cfg, revision)


class DatabaseUnavailableError(RuntimeError):
    """The configured database cannot be reached or migrated (message is operator-facing)."""


def ensure_schema(url: str) -> None:
    """Migrate to head (idempotent); a clear error instead of a driver traceback on failure."""
    from sqlalchemy.exc import SQLAlchemyError

    from screener.settings import mask_url

    try:
        upgrade(url)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DatabaseUnavailableError(f"database {mask_url(url)} is not usable: {detail}") from exc
