"""The infer stage's admit when sending a job back to prepare fails: the claim of its batch
mates has committed, so admit must not raise (the loader would drop their messages)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from screener.db.models import JobState, ScreeningJob
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import make_job
from workers import infer_stage
from workers.infer_stage import AdmittedJob, ScreeningHandler


class FailingDispatcher:
    def __init__(self) -> None:
        self.sends: list[tuple[str, list[int]]] = []

    def send(self, stage: str, job_ids: list[int]) -> None:
        self.sends.append((stage, list(job_ids)))
        raise ConnectionError("broker publish failed")

    def committed(self, stage: str, job_ids: list[int]) -> None:
        raise AssertionError("nothing is committed by admit")


def _state(settings: Settings, job_id: int) -> str:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job.state


def test_admit_survives_a_failed_send_back_to_prepare(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lost = make_job(settings.database_url, "1.2.9.1", JobState.PREPARED)  # spool gone
    mate = make_job(settings.database_url, "1.2.9.2", JobState.PREPARED)
    inputs: list[Any] = [object()]

    def load_prepared(s: Settings, job_id: int, display: bool = True) -> tuple[Any, list[Path]]:
        if job_id == lost:
            raise FileNotFoundError("spool gone")
        return inputs, []

    monkeypatch.setattr(infer_stage, "load_prepared", load_prepared)
    dispatcher = FailingDispatcher()
    handler = ScreeningHandler(settings, models=None, dispatcher=dispatcher, glue_threads=1)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="workers.infer_stage"):
        admitted = handler.admit([lost, mate])

    assert admitted[0] is None
    assert isinstance(admitted[1], AdmittedJob) and admitted[1].job_id == mate
    assert dispatcher.sends == [("prepare", [lost])]
    # Sent back in the database (the reconciler re-sends it); the mate is ours to infer.
    assert _state(settings, lost) == JobState.QUEUED.value
    assert _state(settings, mate) == JobState.INFERRING.value
    assert "the reconciler will send it" in caplog.text
