"""``/healthz`` on a database not migrated yet (the first start of ``serve`` answers HTTP
before its migration ran): 503 with the checks it cannot make marked unknown, not a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from screener.settings import Settings
from screener.web.app import create_app
from workers import heartbeat


@pytest.mark.parametrize("in_serve", [False, True])
def test_healthz_before_the_migration_is_503_with_unknown_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_serve: bool
) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()  # an empty SQLite file: it answers, it has no tables
    app = create_app(settings, (lambda: True) if in_serve else None)

    reply = TestClient(app, raise_server_exceptions=False).get("/healthz")

    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"] == "ok"
    for name in ("listener", "workers"):
        assert body["checks"][name].startswith("unknown: database not migrated yet"), body
        assert name in body["failing"]
