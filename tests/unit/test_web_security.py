"""Web console security and correctness: a short or empty session key file is never signed
with, sessions end when their account row is replaced, an empty retry form re-queues
nothing, and the studies state/call filters find matching studies however old."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import update
from sqlmodel import col, select
from starlette.testclient import TestClient

from screener.db.models import Delivery, JobState, OutputObject, ScreeningJob, Study, utcnow
from screener.db.session import session_scope, upgrade
from screener.settings import Settings
from screener.thresholds import active_record
from screener.users import Role, add_user, remove_user
from screener.web.app import create_app
from screener.web.auth import COOKIE, MIN_KEY_CHARS, secret_key
from tests.web_support import login
from tests.workers_support import make_job


def _settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings


def _key_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / "web-secret-key"


def _forge(key: str, name: str) -> str:
    return URLSafeTimedSerializer(key, salt="screener-session").dumps(
        {"u": name, "s": "", "c": "attacker"}
    )


def test_failed_key_write_leaves_no_short_key_and_forged_cookie_is_refused(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    add_user(settings.database_url, "alice", Role.ADMIN, "some-strong-password", "test")

    def no_space() -> None:  # every write fails like ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    code = "from screener.settings import Settings; from screener.web.auth import secret_key; "
    code += "secret_key(Settings())"
    env = {**os.environ, "SCREENER_DATA_DIR": str(settings.data_dir)}
    first = subprocess.run(
        [sys.executable, "-c", code], env=env, preexec_fn=no_space, capture_output=True
    )
    assert first.returncode != 0  # the first start could not write its key
    key_file = _key_file(settings)
    if not key_file.exists():  # what the reviewer saw: an empty file left behind
        key_file.write_text("")
    key_file.chmod(0o600)

    app = create_app(settings)  # the second start, space freed
    key = key_file.read_text().strip()
    assert len(key) >= MIN_KEY_CHARS and secret_key(settings) == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    client = TestClient(app, follow_redirects=False)
    client.cookies.set(COOKIE, _forge("", "alice"))
    assert client.get("/api/me").status_code == 401
    assert client.get("/studies").headers["location"].startswith("/login")
    before = active_record(settings).value
    reply = client.post(
        "/thresholds", data={"csrf_token": "attacker", "value": "0.99", "reason": "pwned"}
    )
    assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
    assert active_record(settings).value == before


def test_short_key_file_is_replaced_good_one_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    key_file = _key_file(settings)
    key_file.parent.mkdir(parents=True)
    key_file.write_text("short\n")
    fresh = secret_key(settings)
    assert len(fresh) >= MIN_KEY_CHARS and key_file.read_text().strip() == fresh
    assert secret_key(settings) == fresh  # a good key is kept across starts
    assert [p.name for p in key_file.parent.iterdir()] == ["web-secret-key"]  # no temp files


def test_key_file_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    def crash(self: Path, mode: int) -> None:  # the process dies before a later chmod
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "chmod", crash)
    old = os.umask(0)  # a permissive umask must not make the key readable by others
    try:
        key = secret_key(settings)
    except KeyboardInterrupt:
        key = ""
    finally:
        os.umask(old)
    key_file = _key_file(settings)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # private from its creation
    assert len(key) >= MIN_KEY_CHARS and key_file.read_text().strip() == key


def test_session_ends_when_the_user_is_re_added(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    add_user(settings.database_url, "alice", Role.ADMIN, "old-password-1", "test")
    app = create_app(settings)
    client = TestClient(app, follow_redirects=False)
    login(client, "alice", "old-password-1")
    stolen = client.cookies.get(COOKIE)
    assert stolen and client.get("/api/me").status_code == 200

    remove_user(settings.database_url, "alice", "test")
    add_user(settings.database_url, "alice", Role.ADMIN, "new-password-2", "test")
    old = TestClient(app, follow_redirects=False)
    old.cookies.set(COOKIE, stolen)
    assert old.get("/api/me").status_code == 401
    assert old.get("/studies").headers["location"].startswith("/login")

    fresh = TestClient(app, follow_redirects=False)
    login(fresh, "alice", "new-password-2")
    assert fresh.get("/api/me").json()["name"] == "alice"


def _dead_deliveries(settings: Settings, count: int) -> list[int]:
    job = make_job(settings.database_url, "1.2.3.100", JobState.DELIVERING)
    ids: list[int] = []
    with session_scope(settings.database_url) as session:
        for i in range(count):
            out = OutputObject(
                job_id=job,
                study_instance_uid="1.2.3.100",
                sop_instance_uid=f"1.2.3.100.9.{i}",
                sop_class_uid="x",
                kind="sr",
                file_path=f"/nonexistent/{i}",
            )
            session.add(out)
            session.flush()
            assert out.id is not None
            delivery = Delivery(output_id=out.id, destination="PACS@h:104", state="dead")
            session.add(delivery)
            session.flush()
            assert delivery.id is not None
            ids.append(delivery.id)
    return ids


def _delivery_states(settings: Settings) -> dict[int, str]:
    with session_scope(settings.database_url) as session:
        return {d.id or 0: d.state for d in session.exec(select(Delivery)).all()}


def test_retry_with_nothing_selected_requeues_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    add_user(settings.database_url, "alice", Role.ADMIN, "admin-password", "test")
    ids = _dead_deliveries(settings, 3)
    client = TestClient(create_app(settings), follow_redirects=False)
    csrf = login(client, "alice", "admin-password")

    reply = client.post("/deliveries/retry", data={"csrf_token": csrf})
    assert reply.status_code == 303
    assert "nothing selected" in client.get(reply.headers["location"]).text
    assert set(_delivery_states(settings).values()) == {"dead"}

    reply = client.post("/deliveries/retry", data={"csrf_token": csrf, "id": ["x", ""]})
    assert reply.status_code == 400  # no delivery id: refused, never "every dead letter"
    assert set(_delivery_states(settings).values()) == {"dead"}

    reply = client.post("/deliveries/retry", data={"csrf_token": csrf, "id": str(ids[1])})
    assert reply.status_code == 303 and "re-queued" in reply.headers["location"]
    assert _delivery_states(settings) == {ids[0]: "dead", ids[1]: "pending", ids[2]: "dead"}


def _age(settings: Settings, uid: str, hours: int) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Study)
            .where(col(Study.study_instance_uid) == uid)
            .values(last_received_at=utcnow() - timedelta(hours=hours))
        )


def _call(settings: Settings, job_id: int, positive: bool) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ScreeningJob)
            .where(col(ScreeningJob.id) == job_id)
            .values(result={"study_covid_positive": positive, "study_covid_score": 0.5})
        )


def test_state_and_call_filters_find_old_studies(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    add_user(settings.database_url, "victor", Role.VIEWER, "viewer-password", "test")
    failed = make_job(settings.database_url, "1.5.0", JobState.FAILED)
    _call(settings, failed, True)
    _age(settings, "1.5.0", 2)
    positive = make_job(settings.database_url, "1.6.0", JobState.DELIVERED)
    _call(settings, positive, True)
    _age(settings, "1.6.0", 1)
    for i in range(1, 31):  # 30 newer delivered, negative studies
        _call(settings, make_job(settings.database_url, f"1.5.{i}", JobState.DELIVERED), False)
    # older still: one study without a job, one in progress, one whose only job was superseded
    with session_scope(settings.database_url) as session:
        session.add(Study(study_instance_uid="1.7.0"))
    _age(settings, "1.7.0", 5)
    make_job(settings.database_url, "1.8.0", JobState.QUEUED)
    _age(settings, "1.8.0", 4)
    make_job(settings.database_url, "1.9.0", JobState.SUPERSEDED)
    _age(settings, "1.9.0", 3)
    client = TestClient(create_app(settings))
    viewer = ("victor", "viewer-password")

    def uids(query: str) -> list[str]:
        reply = client.get(f"/api/studies?{query}", auth=viewer)
        assert reply.status_code == 200
        return [row["study_instance_uid"] for row in reply.json()]

    assert uids("state=failed&limit=1") == ["1.5.0"]
    assert uids("state=failed&limit=3") == ["1.5.0"]
    assert uids("call=positive&limit=1") == ["1.6.0"]
    assert uids("call=positive&limit=5") == ["1.6.0", "1.5.0"]
    assert uids("state=delivered&call=positive&limit=1") == ["1.6.0"]
    assert len(uids("call=negative&limit=5")) == 5
    assert len(uids("state=delivered&limit=100")) == 31
    assert uids("state=receiving&limit=1") == ["1.9.0"]  # no live job: shown as receiving
    assert uids("state=receiving&limit=5") == ["1.9.0", "1.7.0"]
    assert uids("state=in_progress&limit=1") == ["1.8.0"]
    assert uids("state=no-such-state") == []
    login(client, "victor", "viewer-password")
    assert "1.5.0" in client.get("/studies?state=failed").text
