"""``/healthz`` checks the reconciler (in ``serve`` the only path from received studies to
jobs) and the delivery sweep beside it by the age of their last passes: a real reconciler
loop whose pass (or sweep) hangs fails the check of a service that runs one; a standalone
``screener web`` is not failed for the reconciler its host does not run."""

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
    sqlite_settings.delivery.sweep_interval_seconds = 0.2
    return sqlite_settings


class Gate:
    """A pass replaced by one that waits while the gate is shut."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.waiting = threading.Event()

    def wait(self) -> None:
        if not self.open.is_set():
            self.waiting.set()
            self.open.wait(30)

    def reconcile_once(self, *args: Any, **kwargs: Any) -> reconciler.ReconcileReport:
        self.wait()
        return reconciler.ReconcileReport()

    def sweep_once(self, *args: Any, **kwargs: Any) -> reconciler.SweepReport:
        self.wait()
        return reconciler.SweepReport()


class Gates:
    """The reconciler's pass and the delivery sweep's, each behind a gate."""

    def __init__(self) -> None:
        self.reconciler = Gate()
        self.sweep = Gate()


@pytest.fixture
def running_reconciler(fast_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gates]:
    gates = Gates()
    monkeypatch.setattr(reconciler, "reconcile_once", gates.reconciler.reconcile_once)
    monkeypatch.setattr(reconciler, "sweep_once", gates.sweep.sweep_once)
    monkeypatch.setattr(reconciler, "Heartbeat", functools.partial(Heartbeat, every_s=0.1))
    stop = threading.Event()
    thread = threading.Thread(
        target=reconciler.run_reconciler,
        args=(fast_settings, lambda stage, job: None, stop),
        kwargs={"tick_s": 0.05},
        daemon=True,
    )
    thread.start()
    try:
        yield gates
    finally:
        gates.reconciler.open.set()
        gates.sweep.open.set()
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
    fast_settings: Settings, running_reconciler: Gates
) -> None:
    serve = TestClient(create_app(fast_settings, listener_alive=lambda: True))
    assert _until(serve, "ok", 5) == "ok"
    gate = running_reconciler.reconciler
    gate.open.clear()  # the next pass hangs (a lock, a peer that never answers)
    assert gate.waiting.wait(5)
    reason = _until(serve, "reconciler: last pass", MAX_AGE_S + 5)
    assert reason is not None and reason.startswith("reconciler: last pass"), reason
    reply = serve.get("/healthz")
    assert reply.status_code == 503 and "reconciler" in reply.json()["failing"]
    gate.open.set()
    assert _until(serve, "ok", 5) == "ok"


def test_serve_fails_while_its_delivery_sweep_hangs(
    fast_settings: Settings, running_reconciler: Gates
) -> None:
    """The reconciler still passes, but the sweep that retries deliveries hangs (a PACS that
    accepts and never answers): results stop reaching the PACS, and /healthz says so."""
    serve = TestClient(create_app(fast_settings, listener_alive=lambda: True))
    assert _until(serve, "ok", 5) == "ok"
    gate = running_reconciler.sweep
    gate.open.clear()
    assert gate.waiting.wait(5)
    reason = _until(serve, "delivery sweep: last pass", MAX_AGE_S + 5)
    assert reason is not None and reason.startswith("delivery sweep: last pass"), reason
    assert "(limit 1 s)" in reason  # http.heartbeat_max_age_seconds > 2 sweep intervals
    reply = serve.get("/healthz")
    assert reply.status_code == 503 and "reconciler" in reply.json()["failing"]
    gate.open.set()
    assert _until(serve, "ok", 5) == "ok"


def test_serve_without_a_reconciler_heartbeat_fails(fast_settings: Settings) -> None:
    serve = TestClient(create_app(fast_settings, listener_alive=lambda: True))
    body = serve.get("/healthz").json()
    assert body["checks"]["reconciler"] == ("no reconciler heartbeat; no delivery sweep heartbeat")
    assert "reconciler" in body["failing"]


def _stale_file(settings: Settings, pid: int, name: str = "reconciler") -> None:
    path = heartbeat_path(name, settings.data_dir)
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
    for name in ("reconciler", "delivery-sweep"):
        _stale_file(fast_settings, int(gone.stdout), name)  # left by a process that stopped
    assert "reconciler" not in web.get("/healthz").json()["checks"]
    # an older version's file: no writer known
    heartbeat_path("reconciler", fast_settings.data_dir).write_text("")
    assert "reconciler" not in web.get("/healthz").json()["checks"]

    _stale_file(fast_settings, os.getpid())  # a reconciler process of this host, not passing
    body = web.get("/healthz").json()
    assert body["checks"]["reconciler"].startswith("reconciler: last pass"), body
    assert "reconciler" in body["failing"]


def test_a_standalone_web_checks_only_a_delivery_sweep_running_on_its_host(
    fast_settings: Settings,
) -> None:
    web = TestClient(create_app(fast_settings))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    _stale_file(fast_settings, int(gone.stdout), "delivery-sweep")  # a stopped reconciler's
    assert "reconciler" not in web.get("/healthz").json()["checks"]

    _stale_file(fast_settings, os.getpid(), "delivery-sweep")  # its process runs, it does not
    body = web.get("/healthz").json()
    assert body["checks"]["reconciler"].startswith("delivery sweep: last pass"), body
    assert "reconciler" in body["failing"]


def test_a_standalone_web_beside_a_hung_reconciler_fails(
    fast_settings: Settings, running_reconciler: Gates
) -> None:
    web = TestClient(create_app(fast_settings))
    assert _until(web, "ok", 5) == "ok"
    gate = running_reconciler.reconciler
    gate.open.clear()
    assert gate.waiting.wait(5)
    reason = _until(web, "reconciler: last pass", MAX_AGE_S + 5)
    assert reason is not None and reason.startswith("reconciler: last pass"), reason
