"""Read-only admin commands work on a fresh install and fail clearly without a database."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from screener.cli import app

UNREACHABLE = "postgresql+psycopg://screener:hunter2@127.0.0.1:1/screener"


def test_status_on_a_fresh_data_dir_shows_zeros() -> None:
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["instances"] == 0
    assert not data["jobs_by_state"] or not any(data["jobs_by_state"].values())


@pytest.mark.parametrize("command", [["status"], ["deliveries", "list"]])
def test_unreachable_database_is_a_clear_error(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCREENER_DATABASE_URL", UNREACHABLE)
    from screener.settings import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 4, result.output
    assert "not usable" in result.output
    assert "hunter2" not in result.output  # the password never reaches the terminal
    assert "Traceback" not in result.output
