"""Cross-study batching for the ``infer`` queue.

A Celery worker runs one task at a time, which would give the engine one study per call.
This consumer reads the same task messages (``workers.tasks.infer_job``) straight from the
broker with kombu, admits jobs until the batch holds ``max_batch`` images or ``max_wait_ms``
has passed since its first job arrived, hands the whole batch to the handler (one engine
call for many studies), and acknowledges the messages only after the handler has moved the
jobs on in the database. A consumer killed mid-batch therefore loses nothing: the broker
re-delivers its unacknowledged messages, or the reconciler re-sends the jobs it finds stuck.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from celery import Celery
from kombu import Consumer, Message

from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class BatchPolicy:
    max_items: int  # images per engine call
    max_wait_s: float  # how long the first admitted job may wait for company

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_wait_s < 0:
            raise ValueError(f"invalid batch policy {self}")


class BatchHandler(Protocol[Item]):
    """What the consumer needs from the work it batches."""

    def admit(self, job_id: int) -> Item | None:
        """Claim the job and load its inputs; None: nothing to do (duplicate, superseded)."""

    def size(self, item: Item) -> int:
        """How many engine inputs the item adds to the batch."""

    def run(self, items: list[Item]) -> None:
        """Process one batch and move every job on; must not raise for one bad job."""


@dataclass
class _Pending(Generic[Item]):
    items: list[Item] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    size: int = 0
    first_at: float | None = None


def task_job_id(body: Any) -> int:
    """The job id of a Celery task message (protocol 2: ``[args, kwargs, embed]``; or 1)."""
    if isinstance(body, dict):  # protocol 1
        args = body.get("args") or []
        kwargs = body.get("kwargs") or {}
    else:
        args, kwargs = body[0], body[1]
    return int(args[0] if args else kwargs["job_id"])


class BatchingConsumer(Generic[Item]):
    """Consume one queue of the Celery app and run its messages in batches."""

    def __init__(
        self,
        app: Celery,
        queue: str,
        handler: BatchHandler[Item],
        policy: BatchPolicy,
        *,
        on_batch: Callable[[int, int], None] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.app = app
        self.queue = app.amqp.queues[queue]
        self.handler = handler
        self.policy = policy
        self.on_batch = on_batch
        self.heartbeat = heartbeat
        self.stop_event = threading.Event()
        self.batches = 0
        self._pending: _Pending[Item] = _Pending()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batch in hand, acknowledge it, then exit."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            job_id = task_job_id(body)
        except (KeyError, IndexError, TypeError, ValueError):
            log.error("dropping malformed %s message: %r", self.queue.name, body)
            message.ack()
            return
        item = self.handler.admit(job_id)
        if item is None:
            message.ack()  # duplicate or no longer ours: the DB says so
            return
        pending = self._pending
        if pending.first_at is None:
            pending.first_at = time.monotonic()
        pending.items.append(item)
        pending.messages.append(message)
        pending.size += self.handler.size(item)

    def _due(self) -> bool:
        pending = self._pending
        if not pending.items or pending.first_at is None:
            return False
        waited = time.monotonic() - pending.first_at
        return pending.size >= self.policy.max_items or waited >= self.policy.max_wait_s

    def _flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not pending.items:
            return
        started = time.monotonic()
        try:
            self.handler.run(pending.items)
        except Exception:  # the handler isolates bad jobs; this is a bug or an outage
            log.exception(
                "batch of %d jobs failed; the reconciler will retry them", len(pending.items)
            )
        for message in pending.messages:
            message.ack()
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(pending.items), pending.size)
        log.info(
            "batch %d: %d jobs, %d images in %.0f ms",
            self.batches,
            len(pending.items),
            pending.size,
            1000 * (time.monotonic() - started),
        )

    def run(self, *, idle_timeout_s: float | None = None) -> None:
        """Consume until stopped (or idle for ``idle_timeout_s``, for tests and benchmarks)."""
        # Prefetch enough messages to fill a batch even when every job has one image.
        prefetch = max(1, self.policy.max_items)
        last_activity = time.monotonic()
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=None, interval_start=0.5, interval_max=5)
            channel = conn.channel()
            consumer = Consumer(
                channel,
                queues=[self.queue],
                callbacks=[self._on_message],
                accept=["json"],
                prefetch_count=prefetch,
            )
            with consumer:
                log.info(
                    "batching consumer on queue %s: max_batch=%d max_wait_ms=%.0f",
                    self.queue.name,
                    self.policy.max_items,
                    1000 * self.policy.max_wait_s,
                )
                while not self.stop_event.is_set():
                    if self.heartbeat is not None:
                        self.heartbeat.beat()
                    pending = self._pending
                    if pending.first_at is None:
                        timeout = 0.5
                    else:
                        timeout = max(
                            0.0, pending.first_at + self.policy.max_wait_s - time.monotonic()
                        )
                    if pending.size < self.policy.max_items:
                        try:
                            conn.drain_events(timeout=max(timeout, 0.01))
                            last_activity = time.monotonic()
                        except TimeoutError:
                            pass
                        except socket.timeout:  # noqa: UP041 - kombu raises socket.timeout
                            pass
                    if self._due():
                        self._flush()
                        last_activity = time.monotonic()
                    elif (
                        idle_timeout_s is not None
                        and not self._pending.items
                        and time.monotonic() - last_activity > idle_timeout_s
                    ):
                        break
                self._flush()  # stopping: finish and acknowledge what we hold
