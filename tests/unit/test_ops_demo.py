"""``screener demo`` never delivers, whatever destinations the environment or the config
file name: its example SRs and heatmaps must not reach a site's real PACS."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
from pathlib import Path

import pytest

from screener.demo import demo_settings
from tests.workers_support import require_models, screener_cmd


def destinations_json(port: int) -> str:
    return json.dumps([{"ae_title": "PRODPACS", "host": "127.0.0.1", "port": port}])


def test_demo_settings_ignore_configured_destinations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        '[[delivery.destinations]]\nae_title = "SITEPACS"\nhost = "10.0.0.1"\nport = 104\n'
    )
    monkeypatch.setenv("SCREENER_CONFIG", str(config))
    assert demo_settings(tmp_path / "a").delivery.destinations == []
    monkeypatch.setenv("SCREENER_DELIVERY__DESTINATIONS", destinations_json(104))
    settings = demo_settings(tmp_path / "b")
    assert settings.delivery.destinations == []
    assert settings.data_dir == tmp_path / "b"


def test_demo_sends_nothing_to_a_configured_pacs(tmp_path: Path) -> None:
    model_dir = require_models()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    if model_dir:
        env["SCREENER_MODEL__MODEL_DIR"] = model_dir
    with socket.create_server(("127.0.0.1", 0)) as pacs:  # the site's PACS: counts connects
        env["SCREENER_DELIVERY__DESTINATIONS"] = destinations_json(pacs.getsockname()[1])
        done = subprocess.run(
            screener_cmd("demo", "--data-dir", str(tmp_path / "demo"), "--json"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        connected, _, _ = select.select([pacs], [], [], 0)
    assert not connected, "the demo connected to the configured PACS"
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert {s["state"] for s in report["studies"]} == {"completed"}  # reported, not delivered
