"""A real ``redis-server`` frozen with SIGSTOP (it accepts connections and never answers):
``/healthz`` of a running HTTP service answers 503 naming the broker within its deadline,
and ``/metrics`` and the console answer meanwhile (the health work once blocked the event
loop, and every request of the service with it)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from screener.settings import Settings
from screener.web.health import DEADLINE_S
from screener.web.server import start_background
from workers import heartbeat


def _free_port() -> int:
    """A free 127.0.0.1 port in 14000-14999 (the range these tests may use)."""
    for port in random.sample(range(14000, 15000), 1000):
        try:
            socket.create_server(("127.0.0.1", port)).close()
        except OSError:
            continue
        return port
    raise RuntimeError("no free port in 14000-14999")


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own (never the shared one on 6379)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        yield port, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def test_healthz_names_a_frozen_broker_and_metrics_still_answer(
    sqlite_settings: Settings,
    frozen_redis: tuple[int, subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    port, redis_proc = frozen_redis
    settings = sqlite_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    settings.http.host, settings.http.port = "127.0.0.1", 0
    server = start_background(settings)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert requests.get(base + "/healthz", timeout=20).json()["checks"]["broker"] == "ok"
        os.kill(redis_proc.pid, signal.SIGSTOP)
        replies: list[tuple[requests.Response, float]] = []

        def ask_health() -> None:
            started = time.monotonic()
            reply = requests.get(base + "/healthz", timeout=30)
            replies.append((reply, time.monotonic() - started))

        asking = threading.Thread(target=ask_health, daemon=True)
        asking.start()
        time.sleep(0.3)  # /healthz is now waiting on the frozen broker
        started = time.monotonic()
        metrics = requests.get(base + "/metrics", timeout=5)
        login = requests.get(base + "/login", timeout=5)
        assert metrics.status_code == 200 and "screener_" in metrics.text
        assert login.status_code == 200
        assert time.monotonic() - started < 3

        asking.join(DEADLINE_S + 10)
        assert replies, "no /healthz answer"
        reply, took = replies[0]
        assert reply.status_code == 503
        body = reply.json()
        assert "broker" in body["failing"] and body["checks"]["broker"].startswith("broker ")
        assert body["checks"]["database"] == "ok"
        assert took < DEADLINE_S + 2
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
        server.stop()
