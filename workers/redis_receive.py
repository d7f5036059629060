"""Many waiting messages of a kombu Redis channel in two round trips.

kombu's Redis transport delivers one message per event-loop turn: a ``BRPOP``, then a
pipeline that files the message as unacknowledged (``ZADD`` on the unacked index, ``HSET``
of the payload on the unacked hash: :meth:`kombu.transport.redis.QoS.append`), then the
consumer's callback. For the infer consumer, whose backlog is the norm, that was ~0.7 ms of
CPU per message on its broker thread (``benchmarks/infer_overhead.py``).

:class:`BulkReceiver` takes what is already waiting, up to a batch's worth and never past
the prefetch window, with one Lua script (``RPOP`` over the channel's priority queues in
``BRPOP``'s order) and files all of it with one pipeline carrying the same ``ZADD`` and
``HSET`` kombu sends: the Redis state is the one kombu leaves, message for message, so
kombu's acknowledgement, requeue, restore-on-close and visibility-timeout recovery work on
these messages unchanged. Each message goes through the channel's own delivery callback
(kombu's ``Message``, its content checks, the consumer's callbacks); only the per-message
pipeline is deferred until the callbacks of the drain have run, on the same thread. The
window between taking a message off the list and filing it is the one kombu has between
its ``BRPOP`` and its pipeline.

A channel this does not know how to serve exactly (another transport, a key prefix, queue
expiry, no prefetch window) is left to kombu: :meth:`BulkReceiver.drain` only drains.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

#: Take up to ARGV[1] messages from the lists KEYS, in order (the first has precedence, as
#: the keys of BRPOP have), as ``key, message, key, message, ...``. One ``RPOP`` at a time:
#: ``RPOP key count`` needs Redis 6.2, and this runs on any Redis with Lua (2.6).
_TAKE = """
local want = tonumber(ARGV[1])
local taken = {}
local count = 0
for _, key in ipairs(KEYS) do
    while count < want do
        local item = redis.call('RPOP', key)
        if not item then break end
        count = count + 1
        taken[#taken + 1] = key
        taken[#taken + 1] = item
    end
end
return taken
"""

#: The most messages one drain takes besides kombu's (a bound on one reply and one pipeline).
MAX_PULL = 256


class BulkReceiver:
    """Pulls the waiting messages of the queues a kombu Redis channel consumes from."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.enabled = _servable(channel)
        self._script: Any = None
        self._pending: list[tuple[str, Any]] = []
        self._deferring = False
        if self.enabled:
            self._defer_filing(channel.qos)

    def drain(self, conn: Any, timeout: float, limit: int = MAX_PULL) -> None:
        """``conn.drain_events(timeout)`` (one message, or the timeout's exception), then up
        to ``limit`` more of what waits, while the prefetch window has room; every message
        delivered is filed as unacknowledged in one pipeline before this returns. Call on
        the channel's thread.

        ``limit`` keeps consumers on one queue fair: each takes a batch's worth per turn,
        not the whole backlog its window could hold while the others wait."""
        if not self.enabled:
            conn.drain_events(timeout=timeout)
            return
        self._deferring = True
        try:
            conn.drain_events(timeout=timeout)
            self._pull(min(limit, MAX_PULL))
        finally:
            self._deferring = False
            self.flush()

    def _pull(self, limit: int) -> None:
        """Deliver up to ``limit`` waiting messages through the channel's callbacks."""
        channel = self.channel
        room = channel.qos.can_consume_max_estimate()
        want = min(limit, room if room is not None else 0)
        queues = list(channel.active_queues)
        if want <= 0 or not queues:
            return
        keys = [channel._q_for_pri(q, pri) for pri in channel.priority_steps for q in queues]
        with channel.conn_or_acquire() as client:
            if self._script is None:
                self._script = client.register_script(_TAKE)
            taken = self._script(keys=keys, args=[want], client=client)
            pairs = [(bytes_to_str(k), v) for k, v in zip(taken[::2], taken[1::2], strict=True)]
            unwanted: list[tuple[str, Any]] = []
            handled = 0
            try:
                for key, item in pairs:
                    handled += 1
                    callback = channel.connection._callbacks.get(key.rsplit(channel.sep, 1)[0])
                    if callback is None:  # its consumer cancelled meanwhile
                        unwanted.append((key, item))
                        continue
                    callback(loads(bytes_to_str(item)))
            except BaseException:  # a callback failed: the rest was never delivered
                unwanted += pairs[handled:]
                raise
            finally:
                _put_back(client, unwanted)

    def flush(self) -> None:
        """File the messages delivered since the last flush as unacknowledged, in one
        pipeline (what kombu's ``QoS.append`` sends per message)."""
        pending, self._pending = self._pending, []
        qos = self.channel.qos
        # A callback may have settled a message already (its ack found nothing to remove):
        # filed now, it would stay unacknowledged and come back every visibility timeout.
        pending = [(tag, raw) for tag, raw in pending if not _settled(qos, tag)]
        if not pending:
            return
        now = time.time()
        with qos.pipe_or_acquire() as pipe:
            pipe.zadd(qos.unacked_index_key, {tag: now for tag, _ in pending})
            pipe.hset(qos.unacked_key, mapping=dict(pending))
            pipe.execute()

    def _defer_filing(self, qos: Any) -> None:
        """Make ``qos.append`` (kombu's delivery of any message on this channel, ``BRPOP``'s
        too) inside :meth:`drain` record the message in kombu's bookkeeping at once and
        leave its Redis filing, the same ``ZADD`` and ``HSET``, to :meth:`flush`."""

        def append(message: Any, delivery_tag: str) -> None:
            if not self._deferring:  # outside drain (the channel's close reading a
                kombu_redis.QoS.append(qos, message, delivery_tag)  # last BRPOP): as kombu
                return
            delivery = message.delivery_info
            raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            self._pending.append((delivery_tag, raw))
            VirtualQoS.append(qos, message, delivery_tag)  # kombu's bookkeeping

        qos.append = append


def _settled(qos: Any, delivery_tag: str) -> bool:
    """Whether kombu's bookkeeping has the message acknowledged or rejected (its tag marked
    dirty, or already dropped from the delivered ones: :class:`VirtualQoS`)."""
    return delivery_tag in qos._dirty or delivery_tag not in qos._delivered


def _put_back(client: Any, taken: list[tuple[str, Any]]) -> None:
    """Return messages taken but not delivered to the ends of their lists they came from,
    in their order: the next ``RPOP`` (or ``BRPOP``) takes them first again."""
    by_key: dict[str, list[Any]] = {}
    for key, item in taken:
        by_key.setdefault(key, []).append(item)
    for key, items in by_key.items():
        client.rpush(key, *reversed(items))


def _servable(channel: Any) -> bool:
    """Whether the channel's Redis state can be written exactly as kombu writes it."""
    return (
        isinstance(channel, kombu_redis.Channel)
        and isinstance(channel.qos, kombu_redis.QoS)
        and type(channel.qos).append is kombu_redis.QoS.append
        and not getattr(channel, "global_keyprefix", None)
        and not getattr(channel, "_expires", None)
        and not getattr(channel, "no_ack_consumers", None)
        and bool(channel.qos.prefetch_count)
    )
