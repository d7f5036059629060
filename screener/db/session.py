"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing, contextmanager
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


class DatabaseMissingError(DatabaseUnavailableError):
    """The configured database does not exist, or holds no pacs-screener schema.

    Raised instead of creating it for commands that only read or administer an
    installation: a mistyped URL must not become a new, empty, healthy-looking database.
    """


def ensure_schema(url: str, *, create: bool = True) -> None:
    """Migrate to head (idempotent); a clear error instead of a driver traceback on failure.

    ``create=False``: refuse (:class:`DatabaseMissingError`) a database that does not exist
    yet (a SQLite file that is not there) or has no pacs-screener schema (no recorded
    Alembic revision), and create nothing, not even the SQLite file's folder. A database
    with an older schema is migrated either way.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from screener.settings import mask_url

    try:
        if not create:
            missing = _missing_schema(url)
            if missing:
                raise DatabaseMissingError(f"database {mask_url(url)} {missing}")
        upgrade(url)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DatabaseUnavailableError(f"database {mask_url(url)} is not usable: {detail}") from exc


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names; None for other backends and in-memory databases."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database.startswith("file:"):  # a URI filename (?uri=true): file:PATH?mode=...
        if "mode=memory" in database or parsed.query.get("mode") == "memory":
            return None
        database = database.removeprefix("file:").split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return Path(database)


def _missing_schema(url: str) -> str:
    """Why ``url`` is not an existing pacs-screener database ("" when it is one).

    Looks without creating anything: a SQLite file is opened read-only (connecting
    normally would create it), other backends are asked whether ``alembic_version`` holds
    a revision. An in-memory SQLite database always starts empty and is never refused.
    """
    import sqlite3

    from sqlalchemy import inspect, text

    from screener.settings import mask_url

    found: object = None
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is None:
            return ""
        where = "" if path.is_absolute() else f" (file {path.resolve()})"
        if not path.exists():
            return f"does not exist{where}"
        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
                if conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
                ).fetchone():
                    found = conn.execute("SELECT 1 FROM alembic_version").fetchone()
        except sqlite3.Error as exc:
            raise DatabaseUnavailableError(
                f"database {mask_url(url)} is not usable: {exc}{where}"
            ) from exc
    else:
        with get_engine(url).connect() as conn:
            if inspect(conn).has_table("alembic_version"):
                found = conn.execute(text("SELECT 1 FROM alembic_version")).first()
    return "" if found else "has no pacs-screener schema (no alembic_version revision)"
