"""The dispatcher: when a stage commits, the job is sent to the next stage at once.

"Next" comes from :mod:`workers.stage_graph`. The normal path never waits for the
reconciler: the task that commits ``prepare`` sends the job to ``infer``, the infer
consumer sends what it committed to ``report``, and whoever creates a queued job (the
study assembler in the reconciler loop, ``reprocess``) sends it to the first stage. The
reconciler only re-sends what a crash or a lost message left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import bindparam, update

from screener.db.models import utcnow
from screener.db.session import get_engine
from screener.settings import Settings
from workers.celery_app import TASK_FOR_QUEUE
from workers.jobstate import JOBS
from workers.stage_graph import FIRST_STAGE, next_stage
from workers.task_publisher import publish_tasks

log = logging.getLogger(__name__)


def dispatch(
    app: Celery,
    settings: Settings,
    stage: str,
    job_id: int,
    *,
    now: datetime | None = None,
) -> None:
    """Publish the task of ``stage`` for ``job_id`` and stamp ``dispatched_at``."""
    dispatch_all(app, settings, stage, [job_id], now=now)


def dispatch_all(
    app: Celery,
    settings: Settings,
    stage: str,
    job_ids: Iterable[int],
    *,
    now: datetime | None = None,
) -> None:
    """Publish one task message per job, then stamp ``dispatched_at`` in one statement.

    The messages go first: if the stamp is lost the reconciler sends a harmless duplicate
    (tasks are idempotent); the reverse order could lose a job until it goes stale. Where
    the transport batches publishes (kombu's Redis: one pipeline), the messages go out
    together when the batch closes; a failed batch raises before the stamp, like a failed
    single publish.
    """
    ids = list(job_ids)
    if not ids:
        return
    with app.producer_or_acquire() as producer, _publish_batch(producer):
        # The queue bound to the producer's channel once: Celery declares each message's
        # queue (a cached no-op after the first), and an unbound one is copied twice a time.
        declare = [app.amqp.queues[stage].bind(producer.channel)]
        publish_tasks(app, producer, TASK_FOR_QUEUE[stage], ids, queue=stage, declare=declare)
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(_STAMP, {"ids": ids, "now": now or utcnow()})


_STAMP = (
    update(JOBS)
    .where(JOBS.c.id.in_(bindparam("ids", expanding=True)))
    .values(dispatched_at=bindparam("now", type_=JOBS.c.dispatched_at.type))
)


def _publish_batch(producer: Any) -> AbstractContextManager[Any]:
    """``producer.batch()`` where kombu has it (it sends per message where the transport
    cannot batch), else nothing: each publish goes out at once."""
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else nullcontext()


class Dispatcher:
    """Sends jobs on along the stage graph through one Celery app."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def committed(self, stage: str, job_ids: Iterable[int]) -> str | None:
        """``stage`` committed these jobs: send them to the next stage (if any)."""
        following = next_stage(stage)
        if following is not None:
            dispatch_all(self.app, self.settings, following, job_ids)
        return following

    def created(self, job_ids: Iterable[int]) -> None:
        """New queued jobs (the assembler's, reprocess's): send them to the first stage."""
        dispatch_all(self.app, self.settings, FIRST_STAGE, job_ids)

    def send(self, stage: str, job_ids: Iterable[int]) -> None:
        """Send jobs to ``stage`` itself (a redo of an earlier stage, a recovery)."""
        dispatch_all(self.app, self.settings, stage, job_ids)


_DISPATCHERS: dict[tuple[str, str], Dispatcher] = {}


def dispatcher_for(settings: Settings) -> Dispatcher:
    """A dispatcher on ``settings``' broker, made once per process and broker/database
    (for code outside the workers that creates jobs: the listener's assembler, reprocess)."""
    key = (settings.broker_url, settings.database_url)
    if key not in _DISPATCHERS:
        from workers.celery_app import create_app

        _DISPATCHERS[key] = Dispatcher(create_app(settings), settings)
    return _DISPATCHERS[key]


def send_created(settings: Settings, job_ids: list[int]) -> bool:
    """Dispatch new queued jobs (the listener's, reprocess's) to the first stage.

    Best effort: with the broker down the jobs wait in the database and the reconciler's
    recovery sends them; False says so.
    """
    try:
        dispatcher_for(settings).created(job_ids)
        return True
    except Exception as exc:  # noqa: BLE001 - broker down: the jobs wait in the database
        log.warning(
            "could not dispatch %d new job(s) (%s); the reconciler will send them",
            len(job_ids),
            type(exc).__name__,
        )
        return False
