"""Settings sources and the database schema on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from screener.cli import app
from screener.db.models import AuditLog, Instance, JobState, ScreeningJob, Series, Study
from screener.db.session import session_scope
from screener.settings import Settings, mask_url

REPO = Path(__file__).resolve().parents[2]


def test_env_overrides_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    extra = tmp_path / "site.toml"
    extra.write_text('study_quiet_seconds = 5\n[listener]\nae_title = "SITEAE"\nport = 2000\n')
    monkeypatch.setenv("SCREENER_CONFIG", str(extra))
    monkeypatch.setenv("SCREENER_LISTENER__PORT", "4000")
    monkeypatch.setenv("SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES", '["PACS1","PACS2"]')
    s = Settings()
    assert s.listener.ae_title == "SITEAE"  # from the file
    assert s.listener.port == 4000  # env beats file
    assert s.study_quiet_seconds == 5
    assert s.listener.allowed_calling_ae_titles == ["PACS1", "PACS2"]
    assert s.listener.max_spool_fill == 0.95  # embedded default kept


def test_defaults_are_embedded(tmp_path: Path) -> None:
    s = Settings()
    assert s.listener.ae_title == "SCREENER"
    assert s.listener.port == 11112
    assert s.study_quiet_seconds == 30
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'screener.sqlite3'}"


def test_packaged_defaults_match_config_dir() -> None:
    assert (REPO / "config" / "default.toml").read_text() == (
        REPO / "screener" / "default.toml"
    ).read_text()


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENER_CONFIG", "/nonexistent/screener.toml")
    from screener.settings import ConfigError

    with pytest.raises(ConfigError, match="SCREENER_CONFIG names /nonexistent/screener.toml"):
        Settings()


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENER_DATABASE_URL", "postgresql+psycopg://u:s3cret@127.0.0.1/db")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "s3cret" not in result.stdout
    assert data["database_url"] == "postgresql+psycopg://u:***@127.0.0.1/db"
    assert mask_url("sqlite:///x") == "sqlite:///x"


def test_schema_round_trip(settings: Settings) -> None:
    with session_scope(settings.database_url) as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.3.4", modality="CR")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid="1.2.3.4.5",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                file_path="/x",
                content_digest="blake3:" + "0" * 64,
            )
        )
        s.add(ScreeningJob(study_id=study.id, state=JobState.QUEUED, result={"a": 1}))
        s.add(AuditLog(action="test", detail={"k": [1, 2]}))
    with session_scope(settings.database_url) as s:
        job = s.exec(select(ScreeningJob)).one()
        assert job.state == "queued" and job.result == {"a": 1}
        assert s.exec(select(AuditLog)).one().detail == {"k": [1, 2]}


def test_db_upgrade_command_is_idempotent(tmp_path: Path) -> None:
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "screener.sqlite3").exists()


def test_shipped_default_threshold_is_the_validation_threshold_rounded_down() -> None:
    from engines.manifest import SHIPPED_WEIGHTS_DIR, read_manifest_json
    from engines.model_card import shipped_threshold
    from screener.thresholds import embedded_info

    manifest = read_manifest_json(SHIPPED_WEIGHTS_DIR)
    settings = Settings()
    scheme = manifest["production_scheme"]
    assert settings.model.scheme == scheme
    assert settings.threshold.default_value is None  # no site value pinned by default
    value = embedded_info(settings).value
    assert value == shipped_threshold(manifest["thresholds"][scheme])
    assert value <= manifest["thresholds"][scheme]
