"""The Celery settings derived from the typed settings: task events only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from screener.settings import Settings
from workers.celery_app import celery_config


def test_task_events_are_off_by_default(tmp_path: Path) -> None:
    config = celery_config(Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    assert config["worker_send_task_events"] is False
    assert config["task_send_sent_event"] is False


def test_task_events_can_be_turned_on_for_a_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCREENER_WORKERS__TASK_EVENTS", "true")
    config = celery_config(Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True
