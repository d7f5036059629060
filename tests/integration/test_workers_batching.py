"""The cross-study batching consumer on real brokers (Redis, and the embedded SQLite one).

The handler here is a real small computation (sums over per-job arrays), not a stand-in
for the model: these tests pin the consumer's own contract — batch limits, the wait
deadline, exactly-once processing and acknowledgement after the work. The screening
handler on the real models is tested end to end in test_workers_pipeline.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from kombu import Consumer, Message

from screener.settings import Settings
from tests.workers_support import REDIS_DBS, REDIS_HOST, REDIS_PORT, fresh_redis, redis_url
from workers.batching import BatchingConsumer, BatchPolicy, Step, ack_messages, task_job_id
from workers.celery_app import TASK_FOR_QUEUE, create_app


@dataclass
class Item:
    job_id: int
    values: np.ndarray


class SummingHandler:
    """Job ``n`` has ``n % 3 + 1`` inputs; a batch sums every input in one vector op (the
    "engine" step), then scales the sums on a second thread (the "glue" step)."""

    def __init__(self, skip: set[int] | None = None, engine_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.sizes: list[int] = []
        self.sums: dict[int, float] = {}
        self.admitted_at: dict[int, float] = {}
        self.skip = skip or set()
        self.engine_s = engine_s
        self.threads: dict[str, set[str]] = {}

    @property
    def steps(self) -> list[Step]:
        return [Step("engine", self.engine, engine=True), Step("glue", self.glue)]

    def _seen(self, role: str) -> None:
        self.threads.setdefault(role, set()).add(threading.current_thread().name)

    def admit(self, job_ids: list[int]) -> list[Item | None]:
        self._seen("admit")
        now = time.monotonic()
        out: list[Item | None] = []
        for job_id in job_ids:
            if job_id in self.skip:
                out.append(None)
                continue
            self.admitted_at[job_id] = now
            out.append(Item(job_id, np.arange(job_id % 3 + 1, dtype=np.float64) + job_id))
        return out

    def size(self, item: Item) -> int:
        return len(item.values)

    def begin(self, items: list[Item]) -> dict[str, object]:
        return {"items": items}

    def engine(self, state: dict[str, object]) -> dict[str, object]:
        self._seen("engine")
        items: list[Item] = state["items"]  # type: ignore[assignment]
        stacked = np.concatenate([i.values for i in items])  # one "engine call"
        offsets = np.cumsum([0] + [len(i.values) for i in items])
        time.sleep(self.engine_s)
        state["sums"] = np.add.reduceat(stacked, offsets[:-1])
        state["size"] = len(stacked)
        return state

    def glue(self, state: dict[str, object]) -> dict[str, object]:
        self._seen("glue")
        state["sums"] = np.asarray(state["sums"]) * 1.0
        return state

    def persist(self, state: dict[str, object]) -> list[int]:
        self._seen("persist")
        items: list[Item] = state["items"]  # type: ignore[assignment]
        for item, total in zip(items, np.asarray(state["sums"]), strict=True):
            assert item.job_id not in self.sums, "processed twice"
            self.sums[item.job_id] = float(total)
        self.batches.append([i.job_id for i in items])
        self.sizes.append(int(state["size"]))  # type: ignore[call-overload]
        return [i.job_id for i in items]

    def fail(self, item: Item, exc: BaseException) -> None:
        raise AssertionError(f"job {item.job_id} failed: {exc!r}")


def _app(tmp_path: Path, broker: str):  # type: ignore[no-untyped-def]
    if broker == "redis":
        fresh_redis("batching")
        url = redis_url("batching")
    else:
        url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    return create_app(Settings(broker_url=url))  # type: ignore[call-arg]


def _publish(app, job_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    for job_id in job_ids:
        app.send_task(TASK_FOR_QUEUE["infer"], args=[job_id], queue="infer", routing_key="infer")


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_batches_fill_to_max_items_and_everything_runs_once(tmp_path: Path, broker: str) -> None:
    app = _app(tmp_path, broker)
    jobs = list(range(1, 16))
    _publish(app, jobs)
    handler = SummingHandler()
    consumer = BatchingConsumer(app, "infer", handler, BatchPolicy(max_items=6, max_wait_s=1.0))
    consumer.run(idle_timeout_s=1.5)

    assert sorted(handler.sums) == jobs
    for job_id in jobs:
        inputs = np.arange(job_id % 3 + 1) + job_id
        assert handler.sums[job_id] == float(inputs.sum())
    # A batch never exceeds max_items inputs: a job that would overflow it waits for the next.
    assert all(size <= 6 for size in handler.sizes), handler.sizes
    assert max(len(b) for b in handler.batches) > 1, handler.batches
    assert len(handler.batches) < len(jobs)
    # Everything was acknowledged: a second consumer finds nothing to do.
    again = SummingHandler()
    BatchingConsumer(app, "infer", again, BatchPolicy(6, 0.2)).run(idle_timeout_s=1.0)
    assert again.batches == []
    if broker == "redis":
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])
        assert client.llen("infer") == 0 and client.hlen("unacked") == 0


def test_lone_job_runs_after_max_wait(tmp_path: Path) -> None:
    app = _app(tmp_path, "redis")
    handler = SummingHandler()
    consumer = BatchingConsumer(app, "infer", handler, BatchPolicy(max_items=32, max_wait_s=0.3))
    ran_at: list[float] = []
    consumer.on_batch = lambda jobs, images: ran_at.append(time.monotonic())
    thread = threading.Thread(target=consumer.run, kwargs={"idle_timeout_s": 3.0})
    thread.start()
    time.sleep(0.5)  # consumer connected and idle
    _publish(app, [7])
    thread.join(20)
    assert handler.batches == [[7]]
    waited = ran_at[0] - handler.admitted_at[7]
    assert 0.25 <= waited < 2.0, waited


def test_skipped_jobs_are_acknowledged_without_running(tmp_path: Path) -> None:
    app = _app(tmp_path, "redis")
    _publish(app, [1, 2, 3, 4])
    handler = SummingHandler(skip={2, 4})
    BatchingConsumer(app, "infer", handler, BatchPolicy(8, 0.2)).run(idle_timeout_s=1.0)
    assert sorted(handler.sums) == [1, 3]
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])
    assert client.llen("infer") == 0
    assert client.hlen("unacked") == 0


def test_consumer_reconnects_after_the_broker_drops_its_connections(tmp_path: Path) -> None:
    """Redis closes every connection of the consumer (as on a broker restart): the consumer
    reconnects and goes on, instead of exiting (which would stop ``screener serve``)."""
    app = _app(tmp_path, "redis")
    handler = SummingHandler()
    consumer = BatchingConsumer(app, "infer", handler, BatchPolicy(max_items=4, max_wait_s=0.1))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        _publish(app, [1])
        assert _eventually(lambda: 1 in handler.sums), "the first job never ran"
        admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        db = REDIS_DBS["batching"]
        mine = [c["id"] for c in admin.client_list() if int(c.get("db", -1)) == db]
        assert mine, "the consumer holds no Redis connection on its database"
        for client_id in mine:
            admin.client_kill_filter(_id=client_id)
        time.sleep(1.0)  # the consumer notices and backs off
        assert thread.is_alive(), "the consumer exited when its connection was closed"
        _publish(app, [2, 3])
        assert _eventually(lambda: {2, 3} <= set(handler.sums), 20), handler.sums
    finally:
        consumer.stop_event.set()
        thread.join(20)
    assert not thread.is_alive()


def _eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _redis() -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS["batching"])


def test_bulk_ack_settles_the_messages_it_is_given_and_no_other(tmp_path: Path) -> None:
    """One pipeline acknowledges nine of ten messages: they leave the broker's unacked
    set and the channel's prefetch window, and when the channel closes only the tenth,
    never acknowledged, is handed back to the queue."""
    app = _app(tmp_path, "redis")
    _publish(app, list(range(1, 11)))
    client = _redis()
    received: list[Message] = []
    with app.connection_for_read() as conn:
        channel = conn.channel()
        consumer = Consumer(
            channel,
            queues=[app.amqp.queues["infer"]],
            callbacks=[lambda body, message: received.append(message)],
            accept=["json"],
            prefetch_count=10,
        )
        with consumer:
            while len(received) < 10:
                conn.drain_events(timeout=5)
            assert client.hlen("unacked") == 10 and not channel.qos.can_consume()
            left = received.pop()
            assert ack_messages(received) == 9
            assert all(m.acknowledged for m in received) and not left.acknowledged
            assert client.hlen("unacked") == 1 and client.zcard("unacked_index") == 1
            assert channel.qos.can_consume()  # the window has room again: 1 of 10 held
            assert ack_messages(received) == 0  # already acknowledged: nothing sent twice
        channel.close()  # kombu hands back what is unacknowledged
    assert client.hlen("unacked") == 0
    back = [json.loads(raw)["headers"]["id"] for raw in client.lrange("infer", 0, -1)]
    assert back == [left.headers["id"]]


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_every_message_is_acknowledged_through_a_small_prefetch_window(
    tmp_path: Path, broker: str
) -> None:
    """Prefetch 5 (one-image batches, depth 1): twenty messages only get through if every
    acknowledgement also frees its place in the channel's window."""
    app = _app(tmp_path, broker)
    jobs = list(range(1, 21))
    _publish(app, jobs)
    handler = SummingHandler()
    policy = BatchPolicy(max_items=1, max_wait_s=0.01, depth=1)
    BatchingConsumer(app, "infer", handler, policy).run(idle_timeout_s=1.5)
    assert sorted(handler.sums) == jobs
    if broker == "redis":
        client = _redis()
        assert client.llen("infer") == 0 and client.hlen("unacked") == 0


class FailingPersistHandler(SummingHandler):
    """Persisting a batch that holds job ``fails`` raises, the first ``times`` times."""

    def __init__(self, fails: int, times: int = 1) -> None:
        super().__init__()
        self.fails = fails
        self.left = times
        self.admitted: list[int] = []

    def admit(self, job_ids: list[int]) -> list[Item | None]:
        self.admitted.extend(job_ids)
        return super().admit(job_ids)

    def persist(self, state: dict[str, object]) -> list[int]:
        items: list[Item] = state["items"]  # type: ignore[assignment]
        if self.left and any(i.job_id == self.fails for i in items):
            self.left -= 1
            raise OSError("disk full")
        return super().persist(state)


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_a_batch_that_is_not_persisted_is_not_acknowledged(tmp_path: Path, broker: str) -> None:
    """The batch holding job 3 fails to persist once: its messages go back to the broker
    (not acknowledged), come again, and are acknowledged when their second batch commits;
    every other job runs once."""
    app = _app(tmp_path, broker)
    jobs = [1, 2, 3, 4, 5, 6]
    _publish(app, jobs)
    handler = FailingPersistHandler(fails=3)
    BatchingConsumer(app, "infer", handler, BatchPolicy(2, 0.05)).run(idle_timeout_s=1.5)
    assert sorted(handler.sums) == jobs  # 3 (and its batch mate) committed the second time
    assert handler.admitted.count(3) == 2, handler.admitted  # re-delivered
    assert len(handler.admitted) in (7, 8), handler.admitted  # only that batch came again
    if broker == "redis":
        client = _redis()
        assert client.llen("infer") == 0 and client.hlen("unacked") == 0


def test_a_message_held_when_persisting_keeps_failing_stays_with_the_broker(
    tmp_path: Path,
) -> None:
    """Job 2's batch never persists: its message is never acknowledged, so the broker still
    holds it after the consumer stops (the reconciler or a later consumer takes it on)."""
    app = _app(tmp_path, "redis")
    _publish(app, [1, 2])
    handler = FailingPersistHandler(fails=2, times=10**6)
    consumer = BatchingConsumer(app, "infer", handler, BatchPolicy(1, 0.01))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        assert _eventually(lambda: handler.admitted.count(2) >= 3), handler.admitted
        assert 1 in handler.sums and 2 not in handler.sums
    finally:
        consumer.stop_event.set()
        thread.join(20)
    client = _redis()
    queued = [json.loads(raw) for raw in client.lrange("infer", 0, -1)]
    unacked = [json.loads(raw)[0] for raw in client.hvals("unacked")]  # [message, ex, rk]
    assert [m["headers"]["argsrepr"] for m in queued + unacked] == ["[2]"]


def test_task_job_id_reads_both_message_protocols() -> None:
    assert task_job_id([[42], {}, {}]) == 42
    assert task_job_id([[], {"job_id": 5}, {}]) == 5
    assert task_job_id({"args": [9], "kwargs": {}}) == 9
    with pytest.raises((KeyError, IndexError, TypeError, ValueError)):
        task_job_id([[], {}, {}])


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(0, 0.1)


def test_a_malformed_message_is_acknowledged_and_leaves_nothing_unacked(tmp_path: Path) -> None:
    """A message without a job id is dropped: acknowledged after the drain filed it as
    unacknowledged, not before (filed after its ack, it would come back every visibility
    timeout)."""
    app = _app(tmp_path, "redis")
    _publish(app, [1])
    app.send_task(TASK_FOR_QUEUE["infer"], args=[], queue="infer", routing_key="infer")
    _publish(app, [2])
    handler = SummingHandler()
    BatchingConsumer(app, "infer", handler, BatchPolicy(4, 0.05)).run(idle_timeout_s=1.0)
    assert sorted(handler.sums) == [1, 2]
    client = _redis()
    assert client.llen("infer") == 0
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_stop_while_the_broker_is_unreachable_returns_promptly(tmp_path: Path) -> None:
    """SIGTERM while the first connection is still being retried (nothing listens on the
    broker's port): run() returns, it does not retry forever."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind((REDIS_HOST, 0))
        port = probe.getsockname()[1]
    app = create_app(Settings(broker_url=f"redis://{REDIS_HOST}:{port}/0"))  # type: ignore[call-arg]
    consumer = BatchingConsumer(app, "infer", SummingHandler(), BatchPolicy(4, 0.05))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    time.sleep(1.5)  # into the retries
    assert thread.is_alive()
    stopped = time.monotonic()
    consumer.stop_event.set()
    thread.join(10)
    assert not thread.is_alive(), "run() kept retrying the connection after the stop"
    assert time.monotonic() - stopped < 5
