"""Read-only and administration commands work on an installed database, refuse one that
does not exist (a mistyped URL must not become a new, empty, healthy-looking database) and
fail clearly without a reachable one; the service path still creates it."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from screener.cli import app
from tests.cli_support import Cli, in_process_cli

UNREACHABLE = "postgresql+psycopg://screener:hunter2@127.0.0.1:1/screener"

# every command that reads or administers an installation (none may create its database)
READ_ONLY_COMMANDS = [
    ["status"],
    ["status", "--check"],
    ["status", "--json"],
    ["deliveries", "list"],
    ["deliveries", "destinations"],
    ["deliveries", "retry", "--all-dead"],
    ["retention", "prune", "--dry-run"],
    ["users", "list"],
    ["users", "add", "ann", "--role", "admin", "--password-stdin"],
    ["users", "remove", "ann"],
    ["threshold", "show"],
    ["threshold", "history"],
    ["threshold", "set", "0.5", "--reason", "test"],
    ["web"],
]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    """The in-process CLI; `web` would serve (it never does here) and `users add` reads
    its password from stdin."""
    import screener.web.server

    served: list[object] = []
    monkeypatch.setattr(screener.web.server, "run_server", served.append)
    monkeypatch.setattr(sys, "stdin", io.StringIO("long-password\n"))
    return in_process_cli(capsys, monkeypatch, tmp_path)


def _use(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("SCREENER_DATABASE_URL", url)
    from screener.settings import get_settings

    get_settings.cache_clear()


def test_status_after_db_upgrade_shows_zeros(cli: Cli) -> None:
    assert cli("db", "upgrade").code == 0  # a new installation: `serve` or `db upgrade`
    done = cli("status", "--json")
    assert done.code == 0, done.err
    data = json.loads(done.out)
    assert data["instances"] == 0
    assert not data["jobs_by_state"] or not any(data["jobs_by_state"].values())
    assert cli("status", "--check").code == 0


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=" ".join)
def test_a_missing_sqlite_database_is_refused_and_not_created(
    command: list[str], cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    typo = tmp_path / "sq" / "typo" / "db.sqlite3"
    _use(monkeypatch, f"sqlite:///{typo}")
    done = cli(*command)
    assert done.code == 4, (done.out, done.err)
    line = done.error_line()
    assert f"sqlite:///{typo} does not exist" in line
    assert "SCREENER_DATABASE_URL" in line and "screener db upgrade" in line
    assert not (tmp_path / "sq").exists()  # neither the file nor its folder
    assert not (tmp_path / "data").exists()  # nor the data folders of a typo's install
    assert done.out == ""  # no all-zero table


def test_the_default_database_of_a_fresh_data_dir_is_not_created(cli: Cli, tmp_path: Path) -> None:
    """No SCREENER_DATABASE_URL: the SQLite file in a (maybe mistyped) SCREENER_DATA_DIR."""
    done = cli("status", "--check")
    assert done.code == 4
    assert str(tmp_path / "data" / "screener.sqlite3") in done.error_line()
    assert not (tmp_path / "data").exists()


def test_a_relative_sqlite_path_is_named_in_full(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    _use(monkeypatch, "sqlite:///typo/db.sqlite3")
    done = cli("users", "list")
    assert done.code == 4
    assert str(tmp_path / "typo" / "db.sqlite3") in done.error_line()
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("content", ["empty", "foreign table", "no revision"])
def test_a_sqlite_file_without_our_schema_is_refused_and_left_alone(
    content: str, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "other.sqlite3"
    path.touch()
    if content != "empty":
        with sqlite3.connect(path) as conn:
            table = "alembic_version" if content == "no revision" else "patients"
            conn.execute(f"CREATE TABLE {table} (version_num TEXT)")
        conn.close()
    before = path.read_bytes()
    _use(monkeypatch, f"sqlite:///{path}")
    for command in (["status", "--check"], ["threshold", "show"], ["deliveries", "list"]):
        done = cli(*command)
        assert done.code == 4, (command, done.out, done.err)
        assert "has no pacs-screener schema" in done.error_line()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite3"]


def test_a_file_that_is_not_a_database_is_a_clear_error(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    _use(monkeypatch, f"sqlite:///{path}")
    done = cli("status")
    assert done.code == 4
    assert "not usable" in done.error_line()
    assert path.read_text() == "not a database\n" * 100


def test_an_older_schema_is_still_migrated(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from alembic.script import ScriptDirectory

    from screener.db.session import MIGRATIONS_DIR, dispose_engines, upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0003")
    dispose_engines()
    _use(monkeypatch, url)
    done = cli("status", "--json")
    assert done.code == 0, done.err
    with sqlite3.connect(tmp_path / "old.sqlite3") as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    conn.close()
    assert revision == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


@pytest.fixture
def empty_postgres_schema() -> Iterator[tuple[str, str]]:
    """(URL with a password, schema): a PostgreSQL schema without any table."""
    from sqlalchemy.engine import make_url

    from tests.conftest import _postgres_schema_url

    gen = _postgres_schema_url()
    url = next(gen)
    parsed = make_url(url)
    if parsed.password is None:  # trust authentication ignores it; it must never be shown
        url = parsed.set(password="hunter2").render_as_string(hide_password=False)
    yield url, url.rsplit("%3D", 1)[-1]
    next(gen, None)


@pytest.mark.integration
def test_an_empty_postgresql_schema_is_refused_and_left_empty(
    empty_postgres_schema: tuple[str, str], cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    from tests.conftest import POSTGRES_ADMIN_URL

    url, schema = empty_postgres_schema
    password = sa.engine.make_url(url).password
    _use(monkeypatch, url)
    for command in (["status"], ["users", "list"], ["threshold", "show"], ["web"]):
        done = cli(*command)
        assert done.code == 4, (command, done.out, done.err)
        line = done.error_line()
        assert "has no pacs-screener schema" in line and "screener db upgrade" in line
        assert str(password) not in done.err + done.out and ":***@" in line
    admin = sa.create_engine(POSTGRES_ADMIN_URL)
    try:
        with admin.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": schema},
            ).all()
    finally:
        admin.dispose()
    assert tables == []


def test_the_service_path_still_creates_the_database(tmp_path: Path) -> None:
    """serve, listen, worker and demo set up a new installation (ready_database's default)."""
    from screener.cli.app import ready_database
    from screener.db.session import dispose_engines
    from screener.settings import Settings

    path = tmp_path / "new" / "db.sqlite3"
    ready_database(Settings(database_url=f"sqlite:///{path}"))
    dispose_engines()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()
    conn.close()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:mem?mode=memory&uri=true", None),
        ("sqlite:////abs/db.sqlite3", Path("/abs/db.sqlite3")),
        ("sqlite+pysqlite:///rel/db.sqlite3", Path("rel/db.sqlite3")),
        ("sqlite:///file:/abs/db.sqlite3?mode=ro&uri=true", Path("/abs/db.sqlite3")),
        ("postgresql+psycopg://u@h/db", None),
    ],
)
def test_sqlite_path(url: str, path: Path | None) -> None:
    from screener.db.session import sqlite_path

    assert sqlite_path(url) == path


def test_an_in_memory_database_is_never_refused() -> None:
    from screener.db.session import dispose_engines, ensure_schema

    ensure_schema("sqlite://", create=False)
    dispose_engines()


@pytest.mark.parametrize("command", [["status"], ["deliveries", "list"]])
def test_unreachable_database_is_a_clear_error(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, UNREACHABLE)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 4, result.output
    assert "not usable" in result.output
    assert "hunter2" not in result.output  # the password never reaches the terminal
    assert "Traceback" not in result.output
