"""Cross-study batching for the ``infer`` queue, as a pipeline of threads.

A Celery worker runs one task at a time, which would give the engine one study per call.
This consumer reads the same task messages (``workers.tasks.infer_job``) straight from the
broker with kombu and runs them through a staged handler on separate threads joined by
bounded queues, so that the engine thread does nothing but engine calls:

    broker (this thread) -> loader -> batcher + step 1 -> step 2 -> ... -> writer
    acknowledgements <-------------------------------------------------------'

- loader: admits the job ids that have arrived (claim + load, many in one go; after the
  first it waits up to ``ADMIT_GATHER_S`` for more, as messages arrive one by one);
- batcher: fills a batch from the backlog of admitted jobs up to ``max_items`` images, and
  waits at most ``max_wait_s`` after the first one for company when the backlog is empty;
- steps: the handler's engine calls and the CPU glue between them, one thread each; the
  queues between them hold ``depth`` batches, so while the engine runs batch k the glue
  prepares batch k+1 and the writer persists batch k-1 (double buffering at depth 2);
- writer: persists the batch and moves its jobs on in the database, then hands the
  messages back to this thread, which acknowledges them (a kombu channel is not thread-safe).

A message is acknowledged only after its job was moved on (or found not to be ours), so a
consumer killed mid-batch loses nothing: the broker re-delivers unacknowledged messages,
or the reconciler re-sends the jobs it finds stuck. The messages of a batch that could not
be persisted are handed back to the broker instead (re-delivered, they find their jobs
still claimed, or retried once the reconciler took them back). On Redis the
acknowledgements of everything committed since the last look go in one pipeline.

Liveness comes from progress, not from this thread turning: while messages are held and no
batch has finished for ``workers.stuck_after_seconds`` (an engine call that never returns),
the heartbeat file is dated back to the last progress and the process's heartbeat row is not
refreshed, so container checks and ``/healthz`` see the consumer stuck, and the supervisor
that started it (``serve``, a combined worker) restarts it. Idle, it is alive.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from celery import Celery
from kombu import Consumer, Message
from kombu.transport import redis as kombu_redis

from screener.settings import WorkerSettings
from workers.heartbeat import Heartbeat, Progress, add_liveness_probe
from workers.redis_receive import BulkReceiver

log = logging.getLogger(__name__)

Item = TypeVar("Item")
POLL_S = 0.05  # how often idle threads look at the stop flag
ADMIT_GATHER_S = 0.002  # how long the loader waits for more arrivals to claim together
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 10.0  # backoff after a lost broker connection


class _Stopped(Exception):
    """Raised between connection retries when the consumer was asked to stop."""


@dataclass(frozen=True)
class BatchPolicy:
    max_items: int  # images per engine call
    max_wait_s: float  # how long the first admitted job may wait for company
    depth: int = 2  # batches buffered between two threads (2: double buffering)

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_wait_s < 0 or self.depth < 1:
            raise ValueError(f"invalid batch policy {self}")


@dataclass(frozen=True)
class Step:
    """One pipeline step: ``run(state) -> state`` on its own thread."""

    name: str
    run: Callable[[Any], Any]
    engine: bool = False  # an engine call (the thread the GPU waits on)


class StagedHandler(Protocol[Item]):
    """What the consumer needs from the work it batches."""

    @property
    def steps(self) -> Sequence[Step]:
        """The engine calls and the CPU glue between them, in order."""

    def admit(self, job_ids: list[int]) -> list[Item | None]:
        """Claim the jobs and load their inputs; None: nothing to do (duplicate,
        superseded, sent back). Runs on the loader thread."""

    def size(self, item: Item) -> int:
        """How many engine inputs the item adds to the batch."""

    def begin(self, items: list[Item]) -> Any:
        """The state of a new batch, handed to the first step."""

    def persist(self, state: Any) -> list[int]:
        """Write the batch's results and move every job on; returns the jobs committed.
        Runs on the writer thread."""

    def fail(self, item: Item, exc: BaseException) -> None:
        """A lone job failed in a step: record it (the job is failed for good)."""


@dataclass
class _Batch(Generic[Item]):
    items: list[Item]
    messages: list[Any]
    images: int
    state: Any = None
    started: float = field(default_factory=time.monotonic)


def task_job_id(body: Any) -> int:
    """The job id of a Celery task message (protocol 2: ``[args, kwargs, embed]``; or 1)."""
    if isinstance(body, dict):  # protocol 1
        args = body.get("args") or []
        kwargs = body.get("kwargs") or {}
    else:
        args, kwargs = body[0], body[1]
    return int(args[0] if args else kwargs["job_id"])


def ack_messages(messages: Sequence[Message]) -> int:
    """Acknowledge ``messages``; returns how many were acknowledged.

    kombu's Redis transport acknowledges one message per pipeline (ZREM + HDEL on its
    unacked index and hash, :meth:`kombu.transport.redis.QoS.ack`); here the messages of
    one Redis channel go in a single pipeline with the same commands, and each is then
    dropped from the channel's QoS bookkeeping as kombu's own ack does (so the prefetch
    window opens again and restore-on-close does not re-deliver it). Other transports (the
    embedded broker) acknowledge message by message. Call on the channel's thread."""
    acked = 0
    groups: dict[int, list[Message]] = {}
    for message in messages:
        if message.acknowledged:
            continue  # kombu's ack would raise; nothing left to do
        if _bulk_ackable(message):
            groups.setdefault(id(message.channel), []).append(message)
            continue
        try:
            message.ack()
            acked += 1
        except Exception as exc:  # from a connection since lost: the broker re-delivers
            log.debug("acknowledgement not sent (%r)", exc)
    for group in groups.values():
        qos = group[0].channel.qos
        tags = [message.delivery_tag for message in group]
        try:
            with qos.pipe_or_acquire() as pipe:
                pipe.zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
        except Exception as exc:  # from a connection since lost: the broker re-delivers
            log.debug("%d acknowledgements not sent (%r)", len(tags), exc)
            continue
        for message in group:
            super(kombu_redis.QoS, qos).ack(message.delivery_tag)  # kombu's bookkeeping
            message._state = "ACK"  # what Message.ack records
        acked += len(group)
    return acked


def _bulk_ackable(message: Message) -> bool:
    channel = message.channel
    return (
        isinstance(channel, kombu_redis.Channel)
        and not channel.closed
        and isinstance(channel.qos, kombu_redis.QoS)
        and not getattr(channel, "no_ack_consumers", None)
    )


def share_redis_client(channel: Any) -> None:
    """Let a kombu Redis channel reuse one client for its bookkeeping commands.

    The channel builds a new ``redis.Redis`` for every command it sends outside BRPOP
    (``Channel.conn_or_acquire``: the QoS append of each received message, each ack):
    ~60 us of CPU apiece, for the client's table of response callbacks. One client on
    the channel's connection pool sends the same commands through the same pool (a new
    one when the channel replaced its pool). Other channels are left as they are."""
    create = getattr(channel, "_create_client", None)
    if not isinstance(channel, kombu_redis.Channel) or create is None:
        return
    shared: list[Any] = []

    @contextmanager
    def conn_or_acquire(client: Any = None) -> Iterator[Any]:
        if client is None:
            pool = channel.pool
            if not shared or shared[0].connection_pool is not pool:
                shared[:] = [create()]
            client = shared[0]
        yield client

    channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]


def run_inline(handler: StagedHandler[Item], job_ids: list[int]) -> list[int]:
    """The handler's whole chain on this thread, for one Celery task (batching off) or a
    test; returns the jobs committed."""
    items = [i for i in handler.admit(job_ids) if i is not None]
    return _run_chain(handler, items) if items else []


def _run_chain(handler: StagedHandler[Item], items: list[Item]) -> list[int]:
    """All steps and the persistence for ``items``; a failing batch is split into single
    jobs so that one bad job fails alone."""
    try:
        state = handler.begin(items)
        for step in handler.steps:
            state = step.run(state)
    except Exception as exc:
        if len(items) == 1:
            handler.fail(items[0], exc)
            return []
        log.warning("batch of %d jobs failed (%r); isolating them", len(items), exc)
        return [job for item in items for job in _run_chain(handler, [item])]
    return handler.persist(state)


class BatchingConsumer(Generic[Item]):
    """Consume one queue of the Celery app and run its messages through a staged handler."""

    def __init__(
        self,
        app: Celery,
        queue_name: str,
        handler: StagedHandler[Item],
        policy: BatchPolicy,
        *,
        on_batch: Callable[[int, int], None] | None = None,
        heartbeat: Heartbeat | None = None,
        stuck_after_s: float | None = None,
        stop_when_stuck: bool = False,
    ) -> None:
        self.app = app
        self.queue = app.amqp.queues[queue_name]
        self.handler = handler
        self.policy = policy
        self.on_batch = on_batch
        self.heartbeat = heartbeat
        # liveness from progress: the receiving loop turns even when the engine hangs;
        # None: the default of workers.stuck_after_seconds (the worker passes its setting)
        if stuck_after_s is None:
            stuck_after_s = WorkerSettings().stuck_after_seconds
        self.progress = Progress(stuck_after_s)
        self._stuck: str | None = None
        # stop once stuck, so that what runs this process restarts it (a worker process of
        # its own: Docker's restart policy, systemd, serve); ``gave_up`` then says why
        self.stop_when_stuck = stop_when_stuck
        self.gave_up: str | None = None
        self.stop_event = threading.Event()
        self.batches = 0
        self.images = 0
        self.thread_cpu_s: dict[str, float] = {}  # CPU seconds per pipeline thread
        self._incoming: queue.Queue[tuple[int, Message]] = queue.Queue()
        # (message, True): acknowledge it; (message, False): hand it back to the broker
        self._acks: queue.Queue[tuple[Message, bool]] = queue.Queue()
        self._in_flight = 0  # messages received and not yet acknowledged
        self._lock = threading.Lock()
        self._draining = threading.Event()  # stop receiving; finish what is held
        self._last_activity = time.monotonic()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batches in hand, acknowledge them, then exit."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    # ------------------------------------------------------------------ broker thread

    def _on_message(self, body: Any, message: Message) -> None:
        job_id: int | None
        try:
            job_id = task_job_id(body)
        except (KeyError, IndexError, TypeError, ValueError):
            log.error("dropping malformed %s message", self.queue.name)
            job_id = None
        with self._lock:
            self._in_flight += 1
        if job_id is None:  # acknowledged by _ack_done, after the drain filed it as unacked
            self._acks.put((message, True))
        else:
            self._incoming.put((job_id, message))

    def _ack_done(self) -> int:
        """Settle the messages the pipeline is done with: acknowledge the committed ones
        (one Redis pipeline for all of them), requeue those of batches not persisted."""
        done: list[Message] = []
        back: list[Message] = []
        while True:
            try:
                message, ok = self._acks.get_nowait()
            except queue.Empty:
                break
            (done if ok else back).append(message)
        if not done and not back:
            return 0
        if done:
            ack_messages(done)
        for message in back:
            try:
                message.reject(requeue=True)
            except Exception as exc:  # from a connection since lost: the broker re-delivers
                log.debug("message not handed back (%r)", exc)
        with self._lock:
            self._in_flight -= len(done) + len(back)
        return len(done) + len(back)

    # ------------------------------------------------------------------ pipeline threads

    def _ack_later(self, messages: list[Any], ok: bool = True) -> None:
        """Hand messages to the broker thread: acknowledge (``ok``) or requeue them."""
        for message in messages:
            self._acks.put((message, ok))

    def _put(self, q: queue.Queue[Any], value: Any) -> None:
        q.put(value)  # bounded: blocks while the next thread is behind (back-pressure)

    def _loader(self, out: queue.Queue[tuple[Item, Any, int]]) -> None:
        handler = self.handler
        while True:
            try:
                first = self._incoming.get(timeout=POLL_S)
            except queue.Empty:
                if self._draining.is_set():
                    break
                continue
            arrived = [first]
            gather_until = time.monotonic() + ADMIT_GATHER_S
            while len(arrived) < self.policy.max_items:
                left = gather_until - time.monotonic()
                try:
                    if left > 0:
                        arrived.append(self._incoming.get(timeout=left))
                    else:
                        arrived.append(self._incoming.get_nowait())
                except queue.Empty:
                    break
            try:
                items = handler.admit([job_id for job_id, _ in arrived])
            except Exception:  # database away: nothing was claimed, the reconciler re-sends
                # acknowledged, not requeued: a requeued message would spin while it is away
                log.exception("admitting %d jobs failed; they will be re-sent", len(arrived))
                self._ack_later([message for _, message in arrived])
                continue
            for (_, message), item in zip(arrived, items, strict=True):
                if item is None:
                    self._acks.put((message, True))  # duplicate or not ours: the DB says so
                else:
                    self._put(out, (item, message, handler.size(item)))
        out.put(None)  # type: ignore[arg-type]  # end of stream

    def _gather(self, source: queue.Queue[Any], carry: list[Any]) -> _Batch[Item] | None:
        """The next batch from the backlog (``carry``: an item that did not fit the last)."""
        entries: list[Any] = list(carry)
        carry.clear()
        size = sum(e[2] for e in entries)
        first_at = time.monotonic() if entries else None
        ended = False
        while size < self.policy.max_items:
            if first_at is None:
                timeout = POLL_S
            else:
                timeout = first_at + self.policy.max_wait_s - time.monotonic()
            try:
                entry = source.get_nowait() if timeout <= 0 else source.get(timeout=timeout)
            except queue.Empty:
                if first_at is not None and time.monotonic() >= first_at + self.policy.max_wait_s:
                    break
                continue
            if entry is None:
                ended = True
                break
            if entries and size + entry[2] > self.policy.max_items:
                carry.append(entry)  # would overflow the engine's batch: next one
                break
            entries.append(entry)
            size += entry[2]
            if first_at is None:
                first_at = time.monotonic()
        if ended:
            carry.append(None)
        if not entries:
            return None
        return _Batch([e[0] for e in entries], [e[1] for e in entries], size)

    def _batcher(self, source: queue.Queue[Any], out: queue.Queue[Any], step: Step) -> None:
        carry: list[Any] = []
        while True:
            if carry and carry[0] is None:
                break
            batch = self._gather(source, carry)
            if batch is None:
                if carry and carry[0] is None:
                    break
                continue
            self._step(step, batch, out, first=True)
        out.put(None)

    def _step(self, step: Step, batch: _Batch[Item], out: queue.Queue[Any], first: bool) -> None:
        try:
            if first:
                batch.state = self.handler.begin(batch.items)
            batch.state = step.run(batch.state)
        except Exception as exc:
            self._isolate(batch, exc)
            return
        self._put(out, batch)

    def _isolate(self, batch: _Batch[Item], exc: BaseException) -> None:
        """A step failed for a whole batch: run its jobs one by one on this thread."""
        if len(batch.items) > 1:
            log.warning("batch of %d jobs failed (%r); isolating them", len(batch.items), exc)
        for item, message in zip(batch.items, batch.messages, strict=True):
            try:
                _run_chain(self.handler, [item])
            except Exception:  # not persisted (nor failed): the job is still claimed
                log.exception("job could not be isolated; the reconciler will retry it")
                self._ack_later([message], ok=False)
            else:
                self._ack_later([message])
            self.progress.done()

    def _relay(self, step: Step, source: queue.Queue[Any], out: queue.Queue[Any]) -> None:
        while True:
            batch = source.get()
            if batch is None:
                break
            self._step(step, batch, out, first=False)
        out.put(None)

    def _writer(self, source: queue.Queue[Any]) -> None:
        while True:
            batch = source.get()
            if batch is None:
                break
            try:
                self.handler.persist(batch.state)
            except Exception:  # an outage: the jobs stay claimed until the reconciler
                log.exception(
                    "batch of %d jobs not persisted; the reconciler will retry them",
                    len(batch.items),
                )
                self._ack_later(batch.messages, ok=False)  # not committed: no ack
            else:
                self._ack_later(batch.messages)
            self.progress.done()
            self.batches += 1
            self.images += batch.images
            if self.on_batch is not None:
                self.on_batch(len(batch.items), batch.images)
            log.info(
                "batch %d: %d jobs, %d images in %.0f ms",
                self.batches,
                len(batch.items),
                batch.images,
                1000 * (time.monotonic() - batch.started),
            )

    def _thread(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self.thread_cpu_s[name] = time.thread_time()

        thread = threading.Thread(target=run, name=f"infer-{name}", daemon=True)
        thread.start()
        return thread

    def _start_pipeline(self) -> list[threading.Thread]:
        steps = list(self.handler.steps)
        if not steps:
            raise ValueError("a staged handler needs at least one step")
        depth = self.policy.depth
        admitted: queue.Queue[Any] = queue.Queue(maxsize=max(2, depth) * self.policy.max_items)
        links: list[queue.Queue[Any]] = [queue.Queue(maxsize=depth) for _ in steps]
        threads = [
            self._thread("loader", self._loader, admitted),
            self._thread(steps[0].name, self._batcher, admitted, links[0], steps[0]),
        ]
        for index, step in enumerate(steps[1:], start=1):
            threads.append(
                self._thread(step.name, self._relay, step, links[index - 1], links[index])
            )
        threads.append(self._thread("writer", self._writer, links[-1]))
        return threads

    def run(self, *, idle_timeout_s: float | None = None) -> None:
        """Consume until stopped (or idle for ``idle_timeout_s``, for tests and benchmarks).

        A lost broker connection (Redis restarted, the embedded broker's file locked too
        long) is re-opened, not fatal: the process that runs this consumer would otherwise
        exit and take ``screener serve`` down with it. Messages held from the lost
        connection are finished; their acknowledgements may be lost, so the broker
        re-delivers them and the job states turn the duplicates away."""
        threads = self._start_pipeline()
        main_started = time.thread_time()
        self._last_activity = time.monotonic()
        forget_probe = add_liveness_probe(self.progress.stuck)  # the process's DB heartbeat
        try:
            pause = RECONNECT_FIRST_S
            while True:
                with self.app.connection_for_read() as conn:
                    lost = tuple(conn.connection_errors) + tuple(conn.channel_errors)
                    try:
                        self._consume(conn, threads, idle_timeout_s)
                        return
                    except _Stopped:
                        return  # stopped while the broker was unreachable: nothing held
                    except lost as exc:
                        if self.stop_event.is_set():
                            return  # stopping anyway; the broker re-delivers what we held
                        log.warning(
                            "broker connection lost (%s: %s); reconnecting in %.1f s",
                            type(exc).__name__,
                            exc,
                            pause,
                        )
                if self.stop_event.wait(pause):
                    return  # stopped while away: finish (finally) without acknowledging
                pause = min(pause * 2, RECONNECT_MAX_S)
        finally:
            forget_probe()
            self._draining.set()
            self.thread_cpu_s["broker"] = time.thread_time() - main_started

    def _beat(self) -> None:
        """Refresh the heartbeat while the held work moves; once it has not moved for
        ``stuck_after_s``, let the heartbeat go stale and say why (logged once)."""
        reason = self.progress.stuck()
        if reason is not None and self._stuck is None:
            log.error("%s consumer stuck: %s; its heartbeat goes stale", self.queue.name, reason)
        elif reason is None and self._stuck is not None:
            log.warning("%s consumer moves again; its heartbeat is fresh again", self.queue.name)
        self._stuck = reason
        if reason is not None and self.stop_when_stuck and self.gave_up is None:
            self.gave_up = reason
            self.stop_event.set()  # the drain does not wait for the hung call either
        if self.heartbeat is None:
            return
        if reason is None:
            self.heartbeat.beat()
        else:
            self.heartbeat.stall(self.progress.quiet_s(), reason)

    def _check_stop(self) -> None:
        """Between connection retries (about every second): give up once stopped."""
        if self.stop_event.is_set():
            raise _Stopped

    def _consume(
        self, conn: Any, threads: list[threading.Thread], idle_timeout_s: float | None
    ) -> None:
        """One broker connection: receive until stopped or idle, then finish and acknowledge
        what is held. Connection errors propagate to :meth:`run`."""
        # Enough messages to keep every stage of the pipeline busy with full batches.
        prefetch = self.policy.max_items * (2 + self.policy.depth * (len(self.handler.steps) + 1))
        conn.ensure_connection(
            max_retries=None, interval_start=0.5, interval_max=5, callback=self._check_stop
        )
        channel = conn.channel()
        share_redis_client(channel)
        consumer = Consumer(
            channel,
            queues=[self.queue],
            callbacks=[self._on_message],
            accept=["json"],
            prefetch_count=prefetch,
        )
        with consumer:
            log.info(
                "batching consumer on queue %s: max_batch=%d max_wait_ms=%.0f depth=%d",
                self.queue.name,
                self.policy.max_items,
                1000 * self.policy.max_wait_s,
                self.policy.depth,
            )
            receiver = BulkReceiver(channel)  # a batch's worth in two round trips, not 2 each
            while not self.stop_event.is_set():
                self._beat()
                try:
                    receiver.drain(conn, POLL_S, self.policy.max_items)
                    self._last_activity = time.monotonic()
                except TimeoutError:
                    pass
                except socket.timeout:  # noqa: UP041 - kombu raises socket.timeout
                    pass
                if self._ack_done():
                    self._last_activity = time.monotonic()
                with self._lock:
                    held = self._in_flight
                self.progress.holding(held)
                busy = held > 0
                if busy:
                    self._last_activity = time.monotonic()
                elif (
                    idle_timeout_s is not None
                    and time.monotonic() - self._last_activity > idle_timeout_s
                ):
                    break
            # Stopping: read no more; finish and settle what we hold, then close the channel
            # while the consumer is still on it. A message that an outstanding BRPOP took
            # meanwhile (one just requeued, say) is read by the close and handed back to
            # the queue; after a cancel, or closed with the connection, kombu drops it.
            self._draining.set()
            while any(t.is_alive() for t in threads):
                self._ack_done()
                with self._lock:
                    self.progress.holding(self._in_flight)
                reason = self.progress.stuck()
                if reason is not None:  # an engine call that never returns: do not wait for it
                    log.error(
                        "%s consumer stops without finishing its work (%s): its messages "
                        "go back to the broker, the reconciler recovers its claimed jobs",
                        self.queue.name,
                        reason,
                    )
                    break
                time.sleep(POLL_S)
            self._ack_done()
            channel.close()
