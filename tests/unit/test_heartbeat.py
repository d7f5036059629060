"""Liveness files never stop the loop that writes them, and belong to one install: two on one
host (two ``serve`` with their own data dirs, two test runs) never read or overwrite each
other's."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from screener.cli import app as cli
from screener.db.session import upgrade
from screener.settings import Settings
from screener.web.app import create_app
from tests.workers_support import wait_for
from workers import heartbeat, reconciler
from workers.heartbeat import Heartbeat, heartbeat_age, heartbeat_path


def test_a_heartbeat_file_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file left by another user (serve's reconciler thread died of the PermissionError
    and took study assembly and the delivery sweep with it): the beat logs and goes on."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(blocked))
    beat = Heartbeat("reconciler", tmp_path / "data", every_s=0.0)
    with caplog.at_level(logging.WARNING, logger="workers.heartbeat"):
        beat.beat()
        beat.beat()
    assert heartbeat_age("reconciler", tmp_path / "data") is None
    assert sum("heartbeat" in r.getMessage() for r in caplog.records) == 2


def test_a_beat_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    assert heartbeat_age("infer", tmp_path / "data") is None
    Heartbeat("infer", tmp_path / "data").beat()
    age = heartbeat_age("infer", tmp_path / "data")
    assert age is not None and age < 60


def test_a_reader_never_sees_a_note_with_the_other_notes_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stall's note and its back-dated time land together, and so do a beat's: a reader
    between the two writes once saw a stall dated now (the CI flake of the hung-engine
    test) or a beat dated back to the stall (a fresh consumer judged stale). Every time the
    file is dated, the file readers see must still agree with itself."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    data_dir = tmp_path / "data"
    seen: list[heartbeat.HeartbeatState] = []
    real_utime = heartbeat.os.utime

    def utime_and_read(path: object, times: tuple[float, float]) -> None:
        state = heartbeat.heartbeat_state("infer", data_dir)
        if state is not None:
            seen.append(state)
        real_utime(path, times)  # type: ignore[arg-type]

    monkeypatch.setattr(heartbeat.os, "utime", utime_and_read)
    beat = Heartbeat("infer", data_dir, every_s=0.0)
    for _ in range(3):
        beat.beat()
        beat.stall(120.0, "no batch finished for 120 s")
    beat.beat()
    assert len(seen) == 6  # every dating after the first write was checked
    for state in seen:
        assert (state.stuck is None) == (state.age_s < 60), state


def test_the_file_is_keyed_by_the_resolved_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    path = heartbeat_path("infer", data)
    assert path.parent == Path(tempfile.gettempdir())  # not in data_dir: it may be shared
    assert path == heartbeat_path("infer", tmp_path / "x" / ".." / "data")
    assert path == heartbeat_path("infer", tmp_path / "link")
    assert path != heartbeat_path("infer", tmp_path / "other")
    assert path != heartbeat_path("reconciler", data)
    assert path.name.startswith("pacs-screener-") and path.name.endswith("-infer.heartbeat")


def _install(root: Path) -> Settings:
    settings = Settings(data_dir=root)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings


def _cli_heartbeat(settings: Settings, name: str) -> int:
    env = {"SCREENER_DATA_DIR": str(settings.data_dir)}
    return CliRunner().invoke(cli, ["heartbeat", name, "--max-age", "60"], env=env).exit_code


def test_two_installs_on_one_host_keep_their_own_heartbeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler of install A beats; install B (same host, same temp dir, no
    reconciler running) must not read A's beats as its own: ``screener heartbeat`` of B
    fails and serve's ``/healthz`` of B has no reconciler heartbeat."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(reconciler, "reconcile_once", lambda *a, **k: reconciler.ReconcileReport())
    a, b = _install(tmp_path / "a"), _install(tmp_path / "b")
    stop = threading.Event()
    loop = threading.Thread(
        target=reconciler.run_reconciler,
        args=(a, lambda stage, job: None, stop),
        kwargs={"tick_s": 0.05, "sweep": False},
        daemon=True,
    )
    loop.start()
    try:
        assert wait_for(lambda: _cli_heartbeat(a, "reconciler") == 0, 10, 0.05)
        assert _cli_heartbeat(b, "reconciler") != 0
        serve_b = TestClient(create_app(b, listener_alive=lambda: True)).get("/healthz").json()
        assert serve_b["checks"]["reconciler"].startswith("no reconciler heartbeat"), serve_b
        serve_a = TestClient(create_app(a, listener_alive=lambda: True)).get("/healthz").json()
        assert not serve_a["checks"]["reconciler"].startswith("no reconciler"), serve_a
    finally:
        stop.set()
        loop.join(10)
    assert not any(p.name.endswith(".heartbeat") for d in (a, b) for p in d.data_dir.iterdir())


def test_a_stopped_process_leaves_no_row_behind_a_beat_under_way(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop()`` deleted the row while a beat was being written; that beat then put it
    back, and ``/healthz`` counted the stopped process as a live worker until its row aged
    out. A beat under way now lands before the delete."""
    from screener.db.models import ProcessHeartbeat
    from screener.db.session import session_scope
    from workers.heartbeat import ProcessBeat

    started, release = threading.Event(), threading.Event()
    real_beat = ProcessBeat.beat
    calls = 0

    def slow_second_beat(self: ProcessBeat) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the database is slow to answer this one
            started.set()
            release.wait(10)
        real_beat(self)

    monkeypatch.setattr(ProcessBeat, "beat", slow_second_beat)
    beat = ProcessBeat(sqlite_settings.database_url, "worker", "infer", every_s=0.05).start()
    assert started.wait(10)
    stopping = threading.Thread(target=beat.stop)
    stopping.start()
    threading.Timer(0.3, release.set).start()
    stopping.join(15)
    assert not stopping.is_alive()
    assert wait_for(lambda: not beat._thread.is_alive(), 10)
    with session_scope(sqlite_settings.database_url) as session:
        assert session.get(ProcessHeartbeat, beat.name) is None
