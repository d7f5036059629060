"""One stage's task for many jobs, at the cost of one Celery ``send_task``.

``app.send_task`` per job was ~0.25 ms of CPU apiece, most of the infer writer thread's
time under the interpreter lock (``benchmarks/infer_overhead.py``): the task registry and
router, the options merge, the message headers (a ``saferepr`` of the arguments), the
result object, then kombu's publish. For a batch of jobs of one stage all of that comes out
the same but for the job: the task id, the arguments and their repr.

:func:`publish_tasks` lets Celery build and send the first job's message as usual, while
recording the call Celery makes to the producer's ``publish``; every other job's message is
that same call with the job's arguments, their repr (``[job_id]``, as Celery writes it) and
a new task id wherever the first call had the first task's (``headers['id']``, the root id
of a task sent outside a task, ``correlation_id``). The transport
still builds and sends each message (kombu's serialisation, delivery tag, routing), so the
messages are the ones ``send_task`` would have published. Where Celery does more per task
than that one publish (sent events, publish signals with receivers, a result backend), or
where the first message is not protocol 2 with the job id as its one argument, the jobs
take ``send_task``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, signals
from celery.utils import uuid


class _Recorded(Exception):
    """Raised by the recording producer to stop Celery right after its publish call."""


def publish_tasks(
    app: Celery,
    producer: Any,
    task_name: str,
    job_ids: Sequence[int],
    *,
    queue: str,
    declare: list[Any],
    new_id: Callable[[], str] = uuid,
) -> None:
    """Publish ``task_name(job_id)`` on ``queue`` for every job, through ``producer``."""
    options: dict[str, Any] = {
        "queue": queue,
        "routing_key": queue,
        "producer": producer,
        "declare": declare,
    }
    if len(job_ids) >= 2 and _replayable(app):
        first_id = new_id()
        call = _record(app, task_name, job_ids[0], first_id, options)
        if _single_argument(call):  # else a message this module does not know how to vary
            for index, job_id in enumerate(job_ids):
                body, kwargs = call if index == 0 else _for_job(call, first_id, job_id, new_id())
                producer.publish(body, **kwargs)
            return
    for job_id in job_ids:
        app.send_task(task_name, args=[job_id], task_id=new_id(), **options)


def _replayable(app: Celery) -> bool:
    """Whether ``send_task`` publishes exactly one message and does nothing else per task
    (no sent event, no publish signal receivers, no result backend to tell of the task or
    parent task to add it to the trail of)."""
    return app.conf.task_protocol == 2 and not (
        app.conf.task_send_sent_event
        or app.conf.result_backend
        or signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
    )


def _record(
    app: Celery, task_name: str, job_id: int, task_id: str, options: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The ``producer.publish(body, **kwargs)`` call ``send_task`` makes for this job."""
    producer = options["producer"]
    seen: list[tuple[Any, dict[str, Any]]] = []

    def record(body: Any, **kwargs: Any) -> None:
        seen.append((body, kwargs))
        raise _Recorded

    producer.publish = record  # shadows the method on this instance only
    try:
        app.send_task(task_name, args=[job_id], task_id=task_id, **options)
    except _Recorded:
        pass
    finally:
        del producer.publish
    if len(seen) != 1:
        raise RuntimeError(f"send_task published {len(seen)} messages for one task")
    return seen[0]


def _single_argument(call: tuple[Any, dict[str, Any]]) -> bool:
    """Whether the recorded call is a protocol-2 message of one positional argument whose
    repr Celery wrote as :func:`_for_job` writes it (anything else is sent by Celery)."""
    body, kwargs = call
    if not (isinstance(body, tuple | list) and len(body) == 3):
        return False
    args, task_kwargs, _ = body
    headers = kwargs.get("headers")
    return (
        isinstance(args, tuple | list)
        and len(args) == 1
        and not task_kwargs
        and isinstance(headers, dict)
        and headers.get("argsrepr") == repr(list(args))
    )


def _for_job(
    call: tuple[Any, dict[str, Any]], first_id: str, job_id: int, task_id: str
) -> tuple[Any, dict[str, Any]]:
    """The recorded call for another job: its arguments and their repr, and the new task id
    wherever the first call had the first task's (the id, the root id of a task sent
    outside a task, the correlation id)."""
    body, kwargs = call
    embed = body[2]  # Celery's message protocol 2: (args, kwargs, embed); see _single_argument
    headers = {k: task_id if v == first_id else v for k, v in kwargs["headers"].items()}
    headers["argsrepr"] = repr([job_id])  # what Celery's saferepr gives for a list of an int
    kwargs = {k: task_id if v == first_id else v for k, v in kwargs.items()}
    kwargs["headers"] = headers
    return ([job_id], {}, copy.deepcopy(embed)), kwargs
