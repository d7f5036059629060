"""Many jobs' task messages for the cost of one ``send_task`` (``workers.task_publisher``).

The messages must be the ones ``send_task`` publishes, field for field (but the transport's
delivery tag), on the real brokers: Redis and the embedded SQLite one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from kombu import Consumer, Message

from screener.settings import Settings
from tests.workers_support import fresh_redis, redis_url
from workers.celery_app import TASK_FOR_QUEUE, create_app
from workers.task_publisher import publish_tasks

pytestmark = pytest.mark.integration

STAGE = "report"
JOBS = [5, 6, 70001]


def _app(tmp_path: Path, broker: str) -> Celery:
    if broker == "redis":
        fresh_redis("batching")
        url = redis_url("batching")
    else:
        url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    return create_app(Settings(broker_url=url))


def _publish(app: Celery, job_ids: list[int], task_ids: list[str] | None = None) -> None:
    """``publish_tasks``, or (``task_ids``) ``send_task`` per job with those task ids."""
    with app.producer_or_acquire() as producer:
        declare = [app.amqp.queues[STAGE].bind(producer.channel)]
        if task_ids is None:
            publish_tasks(
                app, producer, TASK_FOR_QUEUE[STAGE], job_ids, queue=STAGE, declare=declare
            )
            return
        for job_id, task_id in zip(job_ids, task_ids, strict=True):
            app.send_task(
                TASK_FOR_QUEUE[STAGE],
                args=[job_id],
                task_id=task_id,
                queue=STAGE,
                routing_key=STAGE,
                producer=producer,
                declare=declare,
            )


def _take(app: Celery, n: int) -> list[dict[str, Any]]:
    """The next ``n`` messages of the stage's queue, as what a worker reads of them."""
    got: list[Message] = []
    with app.connection_for_read() as conn:
        channel = conn.channel()
        with Consumer(
            channel,
            queues=[app.amqp.queues[STAGE]],
            callbacks=[lambda body, message: got.append(message)],
            accept=["json"],
        ):
            while len(got) < n:
                conn.drain_events(timeout=5)
            for message in got:
                message.ack()
        channel.close()
    out = []
    for message in got:
        properties = dict(message.properties)
        properties.pop("delivery_tag", None)  # the transport's, new per message
        info = dict(properties.pop("delivery_info", {}))
        info.pop("delivery_tag", None)
        out.append(
            {
                "body": message.decode(),
                "headers": message.headers,
                "properties": properties,
                "delivery_info": info,
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
            }
        )
    return out


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_the_messages_are_the_ones_send_task_publishes(tmp_path: Path, broker: str) -> None:
    app = _app(tmp_path, broker)
    _publish(app, JOBS)
    replayed = _take(app, len(JOBS))
    ids = [m["headers"]["id"] for m in replayed]
    assert len(set(ids)) == len(JOBS)  # a task id of its own each
    _publish(app, JOBS, task_ids=ids)  # Celery's own, with the same task ids
    celery_own = _take(app, len(JOBS))
    assert replayed == celery_own
    for message, job_id, task_id in zip(replayed, JOBS, ids, strict=True):
        assert message["body"][0] == [job_id]
        assert message["headers"]["argsrepr"] == f"[{job_id}]"
        assert message["headers"]["root_id"] == task_id  # sent outside a task: its own root
        assert message["properties"]["correlation_id"] == task_id


@pytest.mark.parametrize(
    "extra", ["none", "sent events", "result backend", "publish signal", "protocol 1"]
)
def test_send_task_runs_for_every_job_where_celery_does_more(tmp_path: Path, extra: str) -> None:
    """Sent events, a result backend or a publish signal receiver: Celery does more per task
    than publish its message, so every job takes ``send_task``; so does a message protocol
    the replay does not know (1); otherwise only the first job does."""
    app = _app(tmp_path, "redis")
    if extra == "protocol 1":
        app.conf.task_protocol = 1
    if extra == "sent events":
        app.conf.task_send_sent_event = True
    if extra == "result backend":
        app.conf.result_backend = redis_url("batching")
    seen: list[Any] = []

    def receiver(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        seen.append(headers["argsrepr"])

    calls: list[Any] = []
    send_task = app.send_task

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["args"])
        return send_task(*args, **kwargs)

    app.send_task = counted  # type: ignore[method-assign]  # counts, then the real call
    if extra == "publish signal":
        signals.before_task_publish.connect(receiver, weak=False)
    try:
        _publish(app, JOBS)
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert calls == ([[JOBS[0]]] if extra == "none" else [[j] for j in JOBS])
    if extra == "publish signal":
        assert seen == [f"[{j}]" for j in JOBS]
    taken = _take(app, len(JOBS))
    if extra == "protocol 1":  # the body is a dict naming the task and its arguments
        assert [(m["body"]["task"], m["body"]["args"]) for m in taken] == [
            (TASK_FOR_QUEUE[STAGE], [j]) for j in JOBS
        ]
    else:
        assert [m["body"][0] for m in taken] == [[j] for j in JOBS]


@pytest.mark.parametrize(
    "body, headers, replayable",
    [
        (([5], {}, {}), {"argsrepr": "[5]"}, True),
        (((5,), {}, {}), {"argsrepr": "[5]"}, True),
        ({"task": "t", "args": [5]}, {"argsrepr": "[5]"}, False),  # protocol 1
        (([5, 6], {}, {}), {"argsrepr": "[5, 6]"}, False),
        (([5], {"k": 1}, {}), {"argsrepr": "[5]"}, False),
        (([5], {}, {}), {"argsrepr": "(5,)"}, False),  # a repr the replay would not write
        (([5], {}, {}), {}, False),
    ],
)
def test_only_single_argument_protocol_2_calls_are_replayed(
    body: Any, headers: dict[str, Any], replayable: bool
) -> None:
    from workers.task_publisher import _single_argument

    assert _single_argument((body, {"headers": headers})) is replayable


def test_a_first_message_the_replay_cannot_vary_sends_every_job_through_send_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded call is never published then: every job takes ``send_task``, once."""
    import workers.task_publisher as task_publisher

    app = _app(tmp_path, "redis")
    monkeypatch.setattr(task_publisher, "_single_argument", lambda call: False)
    calls: list[Any] = []
    send_task = app.send_task

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["args"])
        return send_task(*args, **kwargs)

    app.send_task = counted  # type: ignore[method-assign]  # counts, then the real call
    _publish(app, JOBS)
    assert calls == [[JOBS[0]]] + [[j] for j in JOBS]  # the recording, then one per job
    taken = _take(app, len(JOBS))
    assert [m["body"][0] for m in taken] == [[j] for j in JOBS]
    with app.connection_for_read() as conn:  # nothing more: the recorded call never went out
        assert conn.default_channel.client.llen(STAGE) == 0
