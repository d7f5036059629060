"""Bulk receive from a kombu Redis channel (``workers.redis_receive``) on a real Redis.

What a drain takes must leave Redis exactly as kombu's own one-by-one delivery leaves it
(the same unacked hash and index entries), respect the prefetch window, and lose nothing:
on close the unacknowledged messages go back to the queue, and what a failing callback
left undelivered goes back to the front of its list in order.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Consumer, Message

from screener.settings import Settings
from tests.workers_support import REDIS_DBS, REDIS_HOST, REDIS_PORT, fresh_redis, redis_url
from workers.batching import ack_messages
from workers.celery_app import TASK_FOR_QUEUE, create_app
from workers.redis_receive import BulkReceiver

pytestmark = pytest.mark.integration


def _app() -> Celery:
    fresh_redis("batching")
    return create_app(Settings(broker_url=redis_url("batching")))


def _client() -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])


def _publish(app: Celery, job_ids: list[int], priority: int | None = None) -> None:
    for job_id in job_ids:
        app.send_task(
            TASK_FOR_QUEUE["infer"],
            args=[job_id],
            queue="infer",
            routing_key="infer",
            priority=priority,
        )


def _consumer(app: Celery, channel: Any, callback: Any, prefetch: int) -> Consumer:
    return Consumer(
        channel,
        queues=[app.amqp.queues["infer"]],
        callbacks=[callback],
        accept=["json"],
        prefetch_count=prefetch,
    )


def _job(message: Message) -> int:
    return int(message.decode()[0][0])


def _receive(
    app: Celery,
    prefetch: int,
    *,
    bulk: bool = True,
    drains: int = 1,
    callback: Any = None,
    limit: int | None = None,
) -> tuple[list[Message], dict[Any, Any]]:
    """Drain ``drains`` times on a fresh channel (bulk or kombu's own delivery); returns the
    messages received and the unacked hash as it stood before the channel closed."""
    received: list[Message] = []
    unacked: dict[Any, Any] = {}
    with app.connection_for_read() as conn:
        channel = conn.channel()
        consumer = _consumer(
            app, channel, callback or (lambda body, message: received.append(message)), prefetch
        )
        with consumer:
            receiver = BulkReceiver(channel)
            assert receiver.enabled
            for _ in range(drains):
                if bulk and limit is not None:
                    receiver.drain(conn, 5, limit)
                elif bulk:
                    receiver.drain(conn, 5)
                else:
                    conn.drain_events(timeout=5)
            unacked = {k: json.loads(v) for k, v in _client().hgetall("unacked").items()}
            ack_messages(received)
        channel.close()
    return received, unacked


def test_one_drain_takes_the_backlog_and_files_it_as_kombu_does() -> None:
    app = _app()
    _publish(app, list(range(1, 21)))
    received, unacked = _receive(app, prefetch=50)
    assert [_job(m) for m in received] == list(range(1, 21))  # all of them, in order
    assert sorted(unacked) == sorted(m.delivery_tag.encode() for m in received)
    client = _client()
    assert client.llen("infer") == 0 and client.hlen("unacked") == 0  # acknowledged

    # kombu's own delivery of the same kind of message files the same entry
    _publish(app, [99])
    [single], kombu_unacked = _receive(app, prefetch=50, bulk=False)
    [(_, kombu_entry)] = kombu_unacked.items()
    [(_, bulk_entry)] = list(unacked.items())[:1]
    assert [type(v) for v in bulk_entry] == [type(v) for v in kombu_entry]
    assert bulk_entry[1:] == kombu_entry[1:]  # exchange, routing key
    assert set(bulk_entry[0]) == set(kombu_entry[0])  # the raw message's keys
    assert _job(single) == 99


def test_the_prefetch_window_bounds_what_a_drain_takes() -> None:
    app = _app()
    _publish(app, list(range(1, 31)))
    received, unacked = _receive(app, prefetch=8)
    assert [_job(m) for m in received] == list(range(1, 9))
    assert len(unacked) == 8
    # acknowledged, not handed back: the other 22 wait in order
    left = [json.loads(raw)["headers"]["argsrepr"] for raw in _client().lrange("infer", 0, -1)]
    assert left == [f"[{n}]" for n in range(30, 8, -1)]


def test_a_drain_takes_at_most_its_limit_besides_kombus_own() -> None:
    """Consumers sharing a queue take a batch's worth per turn, not the backlog."""
    app = _app()
    _publish(app, list(range(1, 21)))
    received, _ = _receive(app, prefetch=50, limit=4)
    assert [_job(m) for m in received] == [1, 2, 3, 4, 5]  # BRPOP's one and 4 more
    received, _ = _receive(app, prefetch=50, limit=4, drains=2)
    assert [_job(m) for m in received] == list(range(6, 16))
    assert _client().llen("infer") == 5


def test_unacknowledged_messages_go_back_when_the_channel_closes() -> None:
    app = _app()
    _publish(app, list(range(1, 11)))
    held: list[Message] = []
    with app.connection_for_read() as conn:
        channel = conn.channel()
        consumer = _consumer(app, channel, lambda body, message: held.append(message), 10)
        with consumer:
            BulkReceiver(channel).drain(conn, 5)
            assert len(held) == 10 and _client().hlen("unacked") == 10
        channel.close()  # nothing acknowledged: kombu restores every one
    client = _client()
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert client.llen("infer") == 10
    again, _ = _receive(app, prefetch=20)
    assert sorted(_job(m) for m in again) == list(range(1, 11))


def test_messages_of_a_consumer_killed_mid_batch_come_back_after_the_visibility_timeout() -> None:
    """A consumer process takes ten messages in one drain and dies without acknowledging or
    closing anything; kombu's visibility-timeout recovery, run by the next consumer, finds
    every one of them in the unacked index and puts it back on the queue."""
    app = _app()
    app.conf.broker_transport_options = {"visibility_timeout": 1}
    _publish(app, list(range(1, 11)))
    pid = os.fork()
    if pid == 0:  # the consumer that is killed: no ack, no close, no restore on exit
        try:
            with app.connection_for_read() as conn:
                channel = conn.channel()
                held: list[Message] = []
                with _consumer(app, channel, lambda body, message: held.append(message), 10):
                    BulkReceiver(channel).drain(conn, 5)
                    os._exit(0 if len(held) == 10 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    client = _client()
    assert client.llen("infer") == 0 and client.zcard("unacked_index") == 10
    time.sleep(1.2)  # past the visibility timeout
    with app.connection_for_read() as conn:
        channel = conn.channel()
        channel.qos.restore_visible(num=100, interval=1)
        channel.close()
    assert client.llen("infer") == 10 and client.hlen("unacked") == 0
    again, _ = _receive(app, prefetch=20)
    assert sorted(_job(m) for m in again) == list(range(1, 11))


def test_messages_a_failing_callback_never_saw_go_back_in_order() -> None:
    app = _app()
    _publish(app, list(range(1, 11)))
    seen: list[int] = []

    def callback(body: Any, message: Message) -> None:
        seen.append(int(body[0][0]))
        if len(seen) == 4:
            raise RuntimeError("handler broke")
        message.ack()

    with pytest.raises(RuntimeError):
        _receive(app, prefetch=20, callback=callback)
    # 1-3 acknowledged; 4 was delivered and filed, so closing handed it back; 5-10 were
    # put back where the next read takes them first, in their order
    again, _ = _receive(app, prefetch=20)
    assert sorted(_job(m) for m in again) == list(range(4, 11))
    assert [_job(m) for m in again if _job(m) != 4] == list(range(5, 11))
    assert seen == [1, 2, 3, 4]


def test_higher_priorities_are_taken_first_as_brpop_takes_them() -> None:
    app = _app()
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "sep": ":"}
    _publish(app, [1, 2, 3])
    _publish(app, [7, 8], priority=6)
    received, _ = _receive(app, prefetch=10, limit=4)  # 4 more than BRPOP's: across lists
    jobs = [_job(m) for m in received]
    assert sorted(jobs) == [1, 2, 3, 7, 8]
    # kombu's BRPOP lists the steps from 0 up; kombu maps a priority so that the lower
    # list is read first: whatever order BRPOP gives, the bulk read gives the same
    kombu_app = _app()
    kombu_app.conf.broker_transport_options = app.conf.broker_transport_options
    _publish(kombu_app, [1, 2, 3])
    _publish(kombu_app, [7, 8], priority=6)
    one_by_one = [_job(_receive(kombu_app, prefetch=10, bulk=False)[0][0]) for _ in range(5)]
    assert jobs == one_by_one


def test_a_channel_with_a_key_prefix_is_left_to_kombu() -> None:
    app = _app()
    app.conf.broker_transport_options = {"global_keyprefix": "site1:"}
    _publish(app, [1, 2, 3])
    with app.connection_for_read() as conn:
        channel = conn.channel()
        got: list[Message] = []
        consumer = _consumer(app, channel, lambda body, message: got.append(message), 10)
        with consumer:
            receiver = BulkReceiver(channel)
            assert not receiver.enabled
            receiver.drain(conn, 5)
            assert len(got) == 1  # kombu's delivery: one message per drain
            assert _client().hexists("site1:unacked", got[0].delivery_tag)
            ack_messages(got)
        channel.close()


def test_a_message_its_callback_acknowledged_is_not_filed_as_unacknowledged() -> None:
    """A callback that acknowledges a message inside the drain (before the deferred filing)
    leaves nothing of it in the unacked hash or index: filed after its ack, kombu's
    visibility-timeout recovery would put it back on the queue."""
    app = _app()
    _publish(app, [1, 2, 3])
    held: list[Message] = []

    def callback(body: Any, message: Message) -> None:
        if _job(message) == 2:
            message.ack()
        else:
            held.append(message)

    client = _client()
    with app.connection_for_read() as conn:
        channel = conn.channel()
        with _consumer(app, channel, callback, 10):
            BulkReceiver(channel).drain(conn, 5)
            assert sorted(_job(m) for m in held) == [1, 3]
            filed = {tag.decode() for tag in client.hkeys("unacked")}
            assert filed == {m.delivery_tag for m in held}
            assert client.zcard("unacked_index") == 2
            assert ack_messages(held) == 2
        channel.close()
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert client.llen("infer") == 0
