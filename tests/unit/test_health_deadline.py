"""``/healthz`` answers within its deadline whatever a peer does: a broker that accepts
connections and never answers (a frozen Redis) is named as failing, and the health and
metrics work runs off the event loop, so the rest of the service keeps answering."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from starlette.testclient import TestClient

from screener.settings import Settings
from screener.web import health as health_module
from screener.web.app import create_app
from screener.web.health import DEADLINE_S, check_broker, health
from workers import heartbeat

T = TypeVar("T")


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A TCP port that accepts connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def _bounded(call: Callable[[], T], limit_s: float) -> tuple[T, float]:
    """``call()`` on a thread; fails the test (instead of hanging it) past ``limit_s``."""
    box: list[T] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: box.append(call()), daemon=True)
    thread.start()
    thread.join(limit_s)
    assert box, f"no answer within {limit_s} s"
    return box[0], time.monotonic() - started


def test_a_broker_that_never_answers_fails_the_broker_check(silent_broker: int) -> None:
    settings = Settings(broker_url=f"redis://127.0.0.1:{silent_broker}/0")
    reason, took = _bounded(lambda: check_broker(settings), 20)
    assert isinstance(reason, str) and reason.startswith("broker does not answer"), reason
    assert took < 15


def test_healthz_names_a_silent_broker_within_the_deadline(
    sqlite_settings: Settings, silent_broker: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    settings = sqlite_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{silent_broker}/0"}
    )
    client = TestClient(create_app(settings))
    reply, took = _bounded(lambda: client.get("/healthz"), DEADLINE_S + 10)
    assert reply.status_code == 503
    body = reply.json()
    assert "broker" in body["failing"]
    assert body["checks"]["broker"].startswith("broker "), body
    assert body["checks"]["database"] == "ok"
    assert took < DEADLINE_S + 2


def test_a_check_that_hangs_is_reported_at_the_deadline(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whatever blocks (a lock, a peer without timeouts), the answer comes at the deadline."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    release = threading.Event()

    def stuck(settings: Settings) -> str | None:
        release.wait(30)
        return None

    monkeypatch.setattr(health_module, "check_broker", stuck)
    monkeypatch.setattr(health_module, "check_database", stuck)
    try:
        report, took = _bounded(lambda: health(sqlite_settings, deadline_s=1.0), 10)
    finally:
        release.set()
    assert took < 3
    assert report["checks"]["broker"] == "broker did not answer within 1 s"
    assert report["checks"]["database"] == "database did not answer within 1 s"
    assert report["checks"]["workers"].startswith("unknown")
    assert report["status"] == "fail"
