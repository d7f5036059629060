"""Liveness files never stop the loop that writes them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from workers import heartbeat
from workers.heartbeat import Heartbeat, heartbeat_age


def test_a_heartbeat_file_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file left by another user (serve's reconciler thread died of the PermissionError
    and took study assembly and the delivery sweep with it): the beat logs and goes on."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(blocked))
    beat = Heartbeat("reconciler", every_s=0.0)
    with caplog.at_level(logging.WARNING, logger="workers.heartbeat"):
        beat.beat()
        beat.beat()
    assert heartbeat_age("reconciler") is None
    assert sum("heartbeat" in r.getMessage() for r in caplog.records) == 2


def test_a_beat_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    assert heartbeat_age("infer") is None
    Heartbeat("infer").beat()
    age = heartbeat_age("infer")
    assert age is not None and age < 60
