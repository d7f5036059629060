"""``serve`` keeps its HTTP service: a server thread that ended is started again on the port
it had (the console and /healthz must not vanish while the listener runs)."""

from __future__ import annotations

from pathlib import Path

import requests

from screener.settings import Settings
from screener.web.server import keep_alive, start_background


def _status(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
    except requests.RequestException:
        return 0


def test_a_stopped_server_is_started_again_on_its_port(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 's.db'}")
    settings.http.host, settings.http.port = "127.0.0.1", 0
    handle = start_background(settings)
    port = handle.port
    again = None
    try:
        assert _status(port) != 0
        assert keep_alive(handle, settings) is handle  # alive: nothing to do
        handle.stop()
        assert not handle.thread.is_alive() and _status(port) == 0
        again = keep_alive(handle, settings)
        assert again is not handle and again.thread.is_alive()
        assert again.port == port and _status(port) != 0
    finally:
        handle.stop()
        if again is not None:
            again.stop()
