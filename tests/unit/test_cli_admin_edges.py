"""Administrator-facing rough edges of the CLI: a non-JSON list setting, a lower-case log
level, out-of-range listener options, a data folder that cannot be created, variable
names of list items, `users add` checking before it prompts, `db upgrade`'s revisions."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from screener.settings import Settings
from tests.cli_support import Cli, in_process_cli


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


def _head() -> str:
    from alembic.script import ScriptDirectory

    from screener.db.session import MIGRATIONS_DIR

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None
    return head


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# 1. a list setting that is not JSON


def test_a_non_json_list_setting_names_the_variable_not_the_value(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES", "PACS1,SECRET2")
    monkeypatch.setenv("SCREENER_LISTENER__PORT", "11113")  # a valid sibling is not named
    done = cli("config", "show")
    assert done.code == 2, done.err
    line = done.error_line()
    assert "SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES is not valid JSON" in line
    assert '["PACS1", "PACS2"]' in line
    assert "SECRET2" not in line and "SCREENER_LISTENER__PORT" not in line


def test_a_json_list_setting_is_accepted(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES", '["PACS1", "PACS2"]')
    done = cli("config", "show")
    assert done.code == 0, done.err
    assert '"PACS2"' in done.out


# 2. log_level


def test_log_level_is_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENER_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"
    assert Settings(log_level="Warning").log_level == "WARNING"


def test_an_unknown_log_level_is_a_setting_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENER_LOG_LEVEL", "loud")
    done = cli("config", "show")
    assert done.code == 2, done.err
    line = done.error_line()
    assert (
        "setting log_level is invalid" in line and "DEBUG" in line and "SCREENER_LOG_LEVEL" in line
    )


# 3. listen --port / --processes


def test_listen_port_out_of_range_is_a_usage_error(cli: Cli) -> None:
    done = cli("listen", "--port", "99999")
    assert done.code == 2, done.err
    assert "--port" in done.error_line()


def test_listen_needs_at_least_one_process(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import screener.dicom.listener

    started: list[object] = []
    monkeypatch.setattr(
        screener.dicom.listener, "start_listener", lambda *a, **k: started.append(a)
    )
    done = cli("listen", "--processes", "0")
    assert done.code == 2, done.err
    assert "--processes" in done.error_line()
    assert started == []


# 4. a data folder that cannot be created


def test_a_data_folder_that_cannot_be_created(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SCREENER_DATA_DIR", str(blocker / "data"))
    done = cli("db", "upgrade")
    assert done.code == 2, done.err
    line = done.error_line()
    assert line.startswith(f"error: cannot create the data folder {blocker / 'data'} (")
    assert line.endswith("check SCREENER_DATA_DIR")


def test_ensure_dirs_error_is_still_an_os_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot create the data folder"):
        Settings(data_dir=blocker / "data").ensure_dirs()


# 5. variable names of list items


def test_validation_line_stops_the_variable_name_at_a_list_index() -> None:
    from screener.cli.app import _validation_line

    with pytest.raises(ValidationError) as caught:
        Settings(delivery={"destinations": [{"ae_title": "PACS", "host": "pacs"}]})
    line = _validation_line(caught.value)
    assert "setting delivery.destinations.0.port is invalid" in line
    assert "(set by SCREENER_DELIVERY__DESTINATIONS (item 0) or the config file)" in line
    assert "__0" not in line


def test_validation_line_of_a_destination_from_the_config_file(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[[delivery.destinations]]\nae_title = "PACS"\nhost = "pacs"\n')
    monkeypatch.setenv("SCREENER_CONFIG", str(config))
    done = cli("config", "show")
    assert done.code == 2, done.err
    assert "SCREENER_DELIVERY__DESTINATIONS (item 0)" in done.error_line()


# 6. users add


def test_users_add_without_a_terminal_needs_password_stdin(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("db", "upgrade").code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("long-password\nlong-password\n"))
    done = cli("users", "add", "ann", "--role", "admin")
    assert done.code == 2, done.err
    assert done.error_line() == "error: no terminal to read the password from; use --password-stdin"
    assert "aborted" not in done.err


def test_users_add_checks_the_database_before_prompting(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    prompted: list[str] = []
    monkeypatch.setattr(typer, "prompt", lambda text, **_: prompted.append(text) or "pw")
    monkeypatch.setattr(sys, "stdin", _Terminal(""))
    done = cli("users", "add", "ann", "--role", "admin")  # no database yet
    assert done.code == 4, done.err
    assert prompted == []


def test_users_add_checks_the_name_before_prompting(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    assert cli("db", "upgrade").code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("long-password\n"))
    assert cli("users", "add", "ann", "--role", "admin", "--password-stdin").code == 0
    prompted: list[str] = []
    monkeypatch.setattr(typer, "prompt", lambda text, **_: prompted.append(text) or "pw")
    monkeypatch.setattr(sys, "stdin", _Terminal(""))
    done = cli("users", "add", "ann", "--role", "viewer")
    assert done.code == 2, done.err
    assert "'ann' exists" in done.error_line()
    assert prompted == []


# 7. db upgrade reports the real revisions


def test_db_upgrade_reports_the_revisions(cli: Cli) -> None:
    head = _head()
    first = cli("db", "upgrade")
    assert first.code == 0, first.err
    assert f"migrated base -> {head}" in first.err
    again = cli("db", "upgrade")
    assert again.code == 0, again.err
    assert f"already at {head} (latest)" in again.err
    assert "heads" not in first.err + again.err


def test_db_upgrade_from_an_older_schema(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from screener.db.session import dispose_engines, upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0003")
    dispose_engines()
    monkeypatch.setenv("SCREENER_DATABASE_URL", url)
    done = cli("db", "upgrade", "0005")
    assert done.code == 0, done.err
    assert "migrated 0003 -> 0005" in done.err
    done = cli("db", "upgrade")
    assert done.code == 0, done.err
    assert f"migrated 0005 -> {_head()}" in done.err


def test_db_upgrade_refuses_a_downgrade(cli: Cli) -> None:
    head = _head()
    assert cli("db", "upgrade").code == 0
    done = cli("db", "upgrade", "0001")
    assert done.code == 2, done.err
    line = done.error_line()
    assert f"the database is at {head}, newer than 0001; downgrades are not supported" in line
