"""Secrets stay masked in ``config show``, ``status`` and the database error line: a
``?password=`` query parameter (libpq accepts it) and ``http.tls_private_key`` too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from screener.settings import mask_url

SCREENER = str(Path(sys.executable).parent / "screener")
SECRET = "hunter2-secret"


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    base["SCREENER_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [SCREENER, *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mask_url_query_passwords() -> None:
    url = f"postgresql+psycopg://u:{SECRET}@h/db?sslmode=require&password={SECRET}"
    assert mask_url(url) == "postgresql+psycopg://u:***@h/db?sslmode=require&password=***"
    assert mask_url(f"redis://h:6379/0?Password={SECRET}") == "redis://h:6379/0?Password=***"
    assert mask_url(f"postgresql://u@h/db?sslpassword={SECRET}").endswith("sslpassword=***")
    kept = "postgresql+psycopg://u@h/db?options=-csearch_path%3Dx"
    assert mask_url(kept) == kept
    assert mask_url("sqlite:////var/lib/screener/db.sqlite3") == (
        "sqlite:////var/lib/screener/db.sqlite3"
    )


def test_config_show_masks_query_password_and_web_key(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://screener@127.0.0.1:{closed_port()}/screener?password={SECRET}"
    done = run(
        tmp_path,
        "config",
        "show",
        SCREENER_DATABASE_URL=url,
        SCREENER_HTTP__TLS_PRIVATE_KEY="/etc/ssl/private/web.key",
        SCREENER_LISTENER__TLS__PRIVATE_KEY="/etc/ssl/private/dicom.key",
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout and "web.key" not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["database_url"].endswith("?password=***")
    assert shown["http"]["tls_private_key"] == "***"
    assert shown["listener"]["tls"]["private_key"] == "***"


def test_status_never_prints_a_query_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://screener@127.0.0.1:{closed_port()}/screener?password={SECRET}"
    done = run(tmp_path, "status", SCREENER_DATABASE_URL=url)
    assert done.returncode == 4, done.stderr  # nothing listens there: database unreachable
    assert SECRET not in done.stdout + done.stderr
    assert "password=***" in done.stderr
