"""The Celery application: four queues, routing, and the delivery guarantees of the service.

Queues follow the data flow: ``prepare`` (CPU: decode, view filter, tensors to the spool),
``infer`` (one process per engine; consumed by the cross-study batching consumer in
:mod:`workers.batching`), ``report`` (SR and heatmap SC) and ``deliver`` (network I/O).
Messages are acknowledged late, after the job moved on, and a Celery worker prefetches one
at a time (the infer consumer prefetches what its pipeline holds), so a worker that dies
loses nothing the broker still holds; what the broker itself loses (Redis keeps nothing on
disk here) the reconciler re-sends from the database, the source of truth.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from screener.settings import Settings
from workers.embedded_broker import split_embedded_url

QUEUES: tuple[str, ...] = ("prepare", "infer", "report", "deliver")
TASK_FOR_QUEUE: dict[str, str] = {
    "prepare": "workers.tasks.prepare_job",
    "infer": "workers.tasks.infer_job",
    "report": "workers.tasks.report_job",
    "deliver": "workers.tasks.deliver_job",
}
# Hard limits per task (seconds); the soft limit raises inside the task 15 s earlier.
TIME_LIMITS: dict[str, int] = {"prepare": 180, "infer": 300, "report": 180, "deliver": 240}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from the one typed settings object (pure: easy to test)."""
    broker_url, transport = split_embedded_url(settings.broker_url)
    exchange = Exchange("screener", type="direct")
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "task_queues": [Queue(q, exchange, routing_key=q) for q in QUEUES],
        "task_default_queue": "prepare",
        "task_default_exchange": "screener",
        "task_routes": {task: {"queue": q, "routing_key": q} for q, task in TASK_FOR_QUEUE.items()},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        # task events are for Flower, which also switches them on in running workers
        "worker_send_task_events": settings.workers.task_events,
        "task_send_sent_event": settings.workers.task_events,
        "broker_transport_options": {
            # Redis: an unacknowledged message returns to the queue after this long; it
            # must exceed the longest countdown (delivery backoff) to avoid duplicates.
            "visibility_timeout": max(3600, int(settings.delivery.backoff_max_seconds) * 2),
        },
    }
    if transport is not None:
        config["broker_transport"] = transport
        config["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    return config


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app on ``settings`` (default: the process environment)."""
    settings = settings or Settings()
    celery = Celery("pacs_screener", include=["workers.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = create_app()
