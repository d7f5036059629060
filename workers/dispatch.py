"""Sending a job to the queue of its next stage, and remembering that it was sent."""

from __future__ import annotations

from datetime import datetime

from celery import Celery
from sqlalchemy import update
from sqlmodel import col

from screener.db.models import ScreeningJob, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from workers.celery_app import TASK_FOR_QUEUE


def dispatch(
    app: Celery,
    settings: Settings,
    stage: str,
    job_id: int,
    *,
    countdown: float | None = None,
    now: datetime | None = None,
) -> None:
    """Publish the task of ``stage`` for ``job_id`` and stamp ``dispatched_at``.

    The message goes first: if the stamp is lost the reconciler sends a harmless duplicate
    (tasks are idempotent); the reverse order could lose the job until it goes stale.
    """
    app.send_task(
        TASK_FOR_QUEUE[stage],
        args=[job_id],
        queue=stage,
        routing_key=stage,
        countdown=countdown,
    )
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ScreeningJob)
            .where(col(ScreeningJob.id) == job_id)
            .values(dispatched_at=now or utcnow())
        )
