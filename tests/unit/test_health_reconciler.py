"""``/healthz`` checks the reconciler (in ``serve`` the only path from received studies to
jobs) by the age of its last pass: a real reconciler loop whose pass hangs fails the check
of a service that runs one; a standalone ``screener web`` is not failed for the reconciler
its host does not run."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from screener.settings import Settings
from screener.web.app import create_app
from workers import heartbeat, reconciler
from workers.heartbeat import Heartbeat, heartbeat_path

MAX_AGE_S = 1.0


@pytest.fixture
def fast_settings(
    sqlite_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    sqlite_settings.http.heartbeat_max_age_seconds = MAX_AGE_S
    sqlite_settings.reconciler.interval_seconds = 0.2
    return sqlite_settings


class Gate:
    """``reconcile_once`` replaced by a pass that waits while the gate is shut."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.waiting = threading.Event()

    def reconcile_once(self, *args: Any, **kwargs: Any) -> reconciler.ReconcileReport:
        if not self.open.is_set():
            self.waiting.set()
            self.open.wait(30)
        return reconciler.ReconcileReport()


@pytest.fixture
def running_reconciler(fast_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(reconciler, "reconcile_once", gate.reconcile_once)
    monkeypatch.setattr(reconciler, "Heartbeat", functools.partial(Heartbeat, every_s=0.1))
    stop = threading.Event()
    thread = threading.Thread(
        target=reconciler.run_reconciler,
        args=(fast_settings, lambda stage, job: None, stop),
        kwargs={"tick_s": 0.05, "sweep": False},
        daemon=True,
    )
    thread.start()
    try:
        yield gate
    finally:
        gate.open.set()
        stop.set()
        thread.join(10)


def _reconciler_check(client: TestClient) -> str | None:
    return client.get("/healthz").json()["checks"].get("reconciler")


def _until(client: TestClient, expected: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        found = _reconciler_check(client)
        if (found is not None and found.startswith(expected)) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_serve_fails_while_its_reconciler_pass_hangs(
    fast_settings: Settings, running_reconciler: Gate
) -> None:
    serve = TestClient(create_app(fast_settings, listener_alive=lambda: True))
    assert _until(serve, "ok", 5) == "ok"
    running_reconciler.open.clear()  # the next pass hangs (a lock, a peer that never answers)
    assert running_reconciler.waiting.wait(5)
    reason = _until(serve, "reconciler: last pass", MAX_AGE_S + 5)
    assert reason is not None and reason.startswith("reconciler: last pass"), reason
    reply = serve.get("/healthz")
    assert reply.status_code == 503 and "reconciler" in reply.json()["failing"]
    running_reconciler.open.set()
    assert _until(serve, "ok", 5) == "ok"


def test_serve_without_a_reconciler_heartbeat_fails(fast_settings: Settings) -> None:
    serve = TestClient(create_app(fast_settings, listener_alive=lambda: True))
    body = serve.get("/healthz").json()
    assert body["checks"]["reconciler"] == "no reconciler heartbeat"
    assert "reconciler" in body["failing"]


def _stale_file(pid: int) -> None:
    path = heartbeat_path("reconciler")
    path.write_text(json.dumps({"pid": pid, "stuck": None}) + "\n")
    long_ago = time.time() - 600
    os.utime(path, (long_ago, long_ago))


def test_a_standalone_web_checks_only_a_reconciler_running_on_its_host(
    fast_settings: Settings,
) -> None:
    web = TestClient(create_app(fast_settings))
    assert "reconciler" not in web.get("/healthz").json()["checks"]  # none on this host

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    _stale_file(int(gone.stdout))  # left by a reconciler that stopped
    assert "reconciler" not in web.get("/healthz").json()["checks"]
    heartbeat_path("reconciler").write_text("")  # an older version's file: no writer known
    assert "reconciler" not in web.get("/healthz").json()["checks"]

    _stale_file(os.getpid())  # a reconciler process of this host that stopped passing
    body = web.get("/healthz").json()
    assert body["checks"]["reconciler"].startswith("reconciler: last pass"), body
    assert "reconciler" in body["failing"]


def test_a_standalone_web_beside_a_hung_reconciler_fails(
    fast_settings: Settings, running_reconciler: Gate
) -> None:
    web = TestClient(create_app(fast_settings))
    assert _until(web, "ok", 5) == "ok"
    running_reconciler.open.clear()
    assert running_reconciler.waiting.wait(5)
    reason = _until(web, "reconciler: last pass", MAX_AGE_S + 5)
    assert reason is not None and reason.startswith("reconciler: last pass"), reason
