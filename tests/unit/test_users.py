"""Users and roles: argon2id hashes, the users CLI, 401/redirects without a login, CSRF on
forms, admin-only actions refused to viewers on the server, /healthz naming what fails."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from starlette.testclient import TestClient

from screener.db.models import AuditLog, User
from screener.db.session import session_scope, upgrade
from screener.settings import Settings
from screener.users import Role, add_user, authenticate, list_users, remove_user
from screener.web.app import create_app
from tests.web_support import login

SCREENER = str(Path(sys.executable).parent / "screener")


def _settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings


def test_users_cli_and_hashes(tmp_path: Path) -> None:
    settings = _settings(tmp_path)  # installed: `users` never creates the database
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    env["SCREENER_DATA_DIR"] = str(tmp_path / "data")
    add = [SCREENER, "users", "add", "ann", "--role", "admin", "--password-stdin"]
    done = subprocess.run(add, input="long-password\n", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(add, input="long-password\n", env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    listed = subprocess.run([SCREENER, "users", "list"], env=env, capture_output=True, text=True)
    assert "ann" in listed.stdout and "admin" in listed.stdout
    with session_scope(settings.database_url) as session:
        (row,) = session.query(User).all()
    assert row.password_hash.startswith("$argon2id$") and "long-password" not in row.password_hash
    assert authenticate(settings.database_url, "ann", "long-password") is not None
    assert authenticate(settings.database_url, "ann", "wrong-password") is None
    gone = subprocess.run(
        [SCREENER, "users", "remove", "ann"], env=env, capture_output=True, text=True
    )
    assert gone.returncode == 0 and list_users(settings.database_url) == []
    with session_scope(settings.database_url) as session:
        actions = [a.action for a in session.query(AuditLog).all()]
    assert actions == ["user.added", "user.removed"]


def test_login_roles_and_csrf(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    add_user(settings.database_url, "adm", Role.ADMIN, "admin-password", "test")
    add_user(settings.database_url, "view", Role.VIEWER, "viewer-password", "test")
    app = create_app(settings)
    anonymous = TestClient(app, follow_redirects=False)
    for path in ("/studies", "/deliveries", "/thresholds", "/model", "/monitoring", "/audit"):
        reply = anonymous.get(path)
        assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
    for path in ("/api/studies", "/api/deliveries", "/api/anything"):
        assert anonymous.get(path).status_code == 401
    assert anonymous.get("/metrics").status_code == 200
    assert anonymous.get("/healthz").status_code in (200, 503)
    basic = base64.b64encode(b"view:viewer-password").decode()
    assert anonymous.get("/api/studies", headers={"Authorization": f"Basic {basic}"}).json() == []

    # a login without the form's CSRF token is refused
    assert anonymous.post("/login", data={"username": "adm", "password": "x"}).status_code == 403

    viewer = TestClient(app, follow_redirects=False)
    csrf = login(viewer, "view", "viewer-password")
    refused = viewer.post("/thresholds", data={"value": "0.5", "reason": "r", "csrf_token": csrf})
    assert refused.status_code == 403 and "only admins" in refused.text

    admin = TestClient(app, follow_redirects=False)
    csrf = login(admin, "adm", "admin-password")
    no_token = admin.post("/thresholds", data={"value": "0.5", "reason": "why"})
    assert no_token.status_code == 403
    done = admin.post("/thresholds", data={"value": "0.5", "reason": "why", "csrf_token": csrf})
    assert done.status_code == 303
    assert "0.5000" in admin.get("/thresholds").text
    with session_scope(settings.database_url) as session:
        audit = [(a.actor, a.action) for a in session.query(AuditLog).all()]
    assert ("web:adm", "threshold.set") in audit

    remove_user(settings.database_url, "adm", "test")  # a removed user's session ends
    assert admin.get("/studies").status_code == 303


def test_healthz_names_the_failing_checks(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    reply = TestClient(create_app(settings)).get("/healthz")
    assert reply.status_code == 503
    body = reply.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["listener"] == "no listener heartbeat"
    assert body["checks"]["workers"].startswith("no live worker for queue(s) prepare")
    assert set(body["failing"]) == {"listener", "workers"}
