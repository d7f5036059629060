"""Two infer consumers on one queue, as a GPU host runs them when one process cannot feed
its GPU (one consumer is bound by Python's GIL: docs/deployment.md).

Every job's message is sent twice, as a reconciler re-send lands next to the original; the
two consumers (each its own broker connection, handler and loaded models, like two worker
processes) take messages from the same Redis queue at once. Each job must be inferred
exactly once: the claim (one ``UPDATE ... RETURNING``) lets one consumer have it, the other
turns its copy away. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import redis
from sqlmodel import select

from screener.db.models import AuditLog, ImageResult, InferResult, JobState, ScreeningJob
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import (
    REDIS_DBS,
    REDIS_HOST,
    REDIS_PORT,
    fresh_redis,
    make_job,
    redis_url,
    require_models,
)
from workers import stages
from workers.batching import BatchingConsumer, BatchPolicy
from workers.celery_app import TASK_FOR_QUEUE, create_app

JOBS = 6


def _prepared_jobs(settings: Settings, cxr_dir: Path, tmp_path: Path) -> list[int]:
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets

    jobs = []
    for index, row in enumerate(pick_images(cxr_dir, JOBS, view="PA", split="test")):
        files = write_datasets(
            make_study([(corpus_image(cxr_dir, row["id"]), "PA")]), tmp_path / f"study-{index}"
        )
        job = make_job(settings.database_url, f"1.2.826.0.1.83.{index}", files=files)
        assert stages.run_prepare(settings, job)
        jobs.append(job)
    return jobs


def _consumers_waiting(count: int, timeout_s: float) -> bool:
    """Whether ``count`` clients of the test's Redis database are blocked in BRPOP (kombu's
    wait on the queue), polled up to ``timeout_s``."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        blocked = [
            c
            for c in client.client_list()
            if int(c.get("db", -1)) == REDIS_DBS["batching"]
            and c.get("cmd") == "brpop"
            and "b" in c.get("flags", "")  # blocked now, not an old connection's last command
        ]
        if len(blocked) >= count:
            return True
        time.sleep(0.05)
    return False


def test_two_consumers_infer_each_job_once_with_every_message_sent_twice(
    settings: Settings, cxr_dir: Path, tmp_path: Path
) -> None:
    require_models()
    from screener.screening.models import ScreeningModels
    from workers.infer_stage import ScreeningHandler

    jobs = _prepared_jobs(settings, cxr_dir, tmp_path)
    fresh_redis("batching")
    broker = Settings(broker_url=redis_url("batching"))  # type: ignore[call-arg]
    publisher = create_app(broker)

    consumers: list[BatchingConsumer[Any]] = []
    handlers: list[ScreeningHandler] = []
    for index in range(2):
        handler = ScreeningHandler(
            settings, ScreeningModels.from_settings(settings), actor=f"worker:infer-{index}"
        )
        handlers.append(handler)
        # small batches, so both consumers get work while the backlog lasts
        consumers.append(
            BatchingConsumer(create_app(broker), "infer", handler, BatchPolicy(2, 0.05))
        )
    threads = [
        threading.Thread(target=c.run, kwargs={"idle_timeout_s": 2.0}, name=f"consumer-{i}")
        for i, c in enumerate(consumers)
    ]
    for thread in threads:
        thread.start()
    # the backlog arrives while both consumers wait on the queue (as in production): sent
    # before, the first consumer to connect could drain it on a slow host (a fixed 0.5 s
    # wait was not always enough on a loaded 2-core machine)
    assert _consumers_waiting(2, timeout_s=60), "the consumers never waited on the queue"
    for job_id in jobs + jobs:  # each job's message twice
        publisher.send_task(
            TASK_FOR_QUEUE["infer"], args=[job_id], queue="infer", routing_key="infer"
        )
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive()
    for handler in handlers:
        handler.close()

    with session_scope(settings.database_url) as session:
        states = {j.id: j.state for j in session.exec(select(ScreeningJob))}
        batches = session.exec(select(AuditLog).where(AuditLog.action == "infer.batch")).all()
        rows = session.exec(select(ImageResult)).all()
        stored = session.exec(select(InferResult.job_id)).all()
    assert states == {job_id: JobState.INFERRED.value for job_id in jobs}
    inferred = [job for batch in batches if batch.detail for job in batch.detail["jobs"]]
    assert sorted(inferred) == sorted(jobs)  # each job in exactly one committed batch
    assert sorted(r.job_id for r in rows) == sorted(jobs)  # one image row each
    assert sorted(stored) == sorted(jobs)
    actors = {batch.actor for batch in batches}
    assert actors == {"worker:infer-0", "worker:infer-1"}, actors  # both did work
    assert sum(c.images for c in consumers) == JOBS  # the copies never reached the engines
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])
    assert client.llen("infer") == 0 and client.hlen("unacked") == 0  # all acknowledged
