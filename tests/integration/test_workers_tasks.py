"""Celery task policy, run through Celery's own task machinery (``Task.apply``) on both
databases: bad input fails the job at once with its reason; a transient error is retried
with backoff and hands the job back so the retry can claim it; duplicates do nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from screener.db.models import JobState, ScreeningJob
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import (
    fresh_redis,
    make_job,
    redis_url,
    screener_cmd,
    start_process,
    stop_process,
    wait_for,
)
from workers import tasks


@pytest.fixture
def task_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    # The tasks read their settings from the environment, as a worker process does.
    monkeypatch.setenv("SCREENER_DATABASE_URL", settings.database_url)
    tasks.worker_settings.cache_clear()
    yield tasks.worker_settings()
    tasks.worker_settings.cache_clear()


def _job(settings: Settings, job_id: int) -> ScreeningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job


def test_policy_declared_on_every_stage() -> None:
    for task in (tasks.prepare_job, tasks.infer_job, tasks.report_job, tasks.deliver_job):
        assert task.acks_late is True
        assert OSError in task.autoretry_for
        assert task.retry_backoff and task.retry_jitter and task.max_retries == 5
        assert task.soft_time_limit < task.time_limit


def test_bad_input_fails_at_once_without_retry(task_settings: Settings) -> None:
    job_id = make_job(task_settings.database_url, "1.2.840.99.1")  # a study without instances
    result = tasks.prepare_job.apply(args=[job_id])
    assert result.successful() and result.result is False
    job = _job(task_settings, job_id)
    assert job.state == JobState.FAILED.value
    assert job.reason == "prepare: the study has no instances to screen"


@pytest.mark.slow
def test_transient_error_is_retried_by_a_real_worker(
    sqlite_settings: Settings, tmp_path: Path, cxr_dir: Path
) -> None:
    """A Celery worker process on real Redis: the spool is unusable (a file where a folder
    must be: OSError), so the task is retried with backoff and the job handed back; once
    the disk is fine again the retry prepares the job."""
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets
    from workers.celery_app import create_app
    from workers.dispatch import dispatch
    from workers.runner import child_env

    settings = sqlite_settings.model_copy(update={"broker_url": redis_url("tasks")})
    fresh_redis("tasks")
    row = pick_images(cxr_dir, 1, view="PA", split="test")[0]
    files = write_datasets(make_study([(corpus_image(cxr_dir, row["id"]), "PA")]), tmp_path / "s")
    job_id = make_job(settings.database_url, "1.2.840.99.2", files=files)
    worker = start_process(
        screener_cmd("worker", "--queues", "prepare", "-P", "solo"),
        child_env(settings),
        tmp_path / "worker.log",
    )
    log = tmp_path / "worker.log"
    try:
        assert wait_for(lambda: " ready." in log.read_text(), 60), log.read_text()[-3000:]
        settings.tensor_dir.rmdir()
        settings.tensor_dir.write_text("in the way")
        dispatch(create_app(settings), settings, "prepare", job_id)
        assert wait_for(lambda: "retried after transient error" in log.read_text(), 60)
        assert _job(settings, job_id).state in (JobState.QUEUED.value, JobState.PREPARING.value)
        settings.tensor_dir.unlink()
        settings.tensor_dir.mkdir()
        assert wait_for(lambda: _job(settings, job_id).state == JobState.PREPARED.value, 60), (
            log.read_text()[-3000:]
        )
        assert "NotADirectoryError" in log.read_text()
    finally:
        stop_process(worker)
        fresh_redis("tasks")


def test_duplicate_message_does_nothing(task_settings: Settings) -> None:
    job_id = make_job(task_settings.database_url, "1.2.840.99.3", JobState.DELIVERED)
    for task in (tasks.prepare_job, tasks.report_job):
        assert task.apply(args=[job_id]).result is False
    assert tasks.deliver_job.apply(args=[job_id]).result == "skipped"
    assert _job(task_settings, job_id).state == JobState.DELIVERED.value


class _UnreachableBroker:
    """The dispatcher while Redis restarts: kombu's error, which is no transient task error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def _fail(self, stage: str, job_ids: list[int]) -> None:
        import kombu.exceptions

        self.calls.append((stage, list(job_ids)))
        raise kombu.exceptions.OperationalError("Error 111 connecting to broker.")

    committed = send = _fail


def test_a_broker_down_after_the_commit_leaves_the_job_for_the_reconciler(
    task_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare committed, then the infer message could not be published: the task succeeds
    and the job waits in ``prepared`` for the reconciler (it was failed for good)."""
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets
    from tests.conftest import CXR_DIR as CXR

    task_settings.ensure_dirs()
    [row] = pick_images(CXR, 1, view="PA", split="test")
    files = write_datasets(make_study([(corpus_image(CXR, row["id"]), "PA")]), tmp_path / "in")
    job_id = make_job(task_settings.database_url, "1.2.840.99.9", files=files)
    broker = _UnreachableBroker()
    monkeypatch.setattr(tasks, "worker_dispatcher", lambda: broker)
    result = tasks.prepare_job.apply(args=[job_id])
    assert result.successful() and result.result is True
    assert broker.calls == [("prepare", [job_id])]
    job = _job(task_settings, job_id)
    assert (job.state, job.reason) == (JobState.PREPARED.value, None)
