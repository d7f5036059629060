"""The embedded broker (kombu's SQLAlchemy transport on SQLite) backs off polling idle
queues: an idle ``serve`` must not spend a tenth of a core polling empty tables, and a
message must still be seen within ``IDLE_POLL_MAX_S``."""

from __future__ import annotations

import time
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import event

from workers import embedded_broker
from workers.embedded_broker import IDLE_POLL_MAX_S, POLLING_INTERVAL_S, IdleBackoff


def test_backoff_doubles_to_its_limit_and_resets_on_activity() -> None:
    backoff = IdleBackoff(first=0.05, limit=0.5)
    assert backoff.due("q", 0.0)
    pauses = [backoff.empty("q", 0.0) for _ in range(6)]
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert not backoff.due("q", 0.49) and backoff.due("q", 0.5)
    assert backoff.due("other", 0.0)  # per queue
    backoff.active("q")
    assert backoff.due("q", 0.0) and backoff.empty("q", 0.0) == 0.05


@pytest.fixture()
def channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(embedded_broker, "BACKOFF", IdleBackoff())
    url, transport = embedded_broker.split_embedded_url(
        f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    )
    with Connection(url, transport=transport) as conn:
        yield conn.channel()


def _statements(channel: Any) -> list[str]:
    engine, _ = channel._open()
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def _poll_for(channel: Any, seconds: float) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(channel._get("prepare"))
        except Empty:
            pass
        time.sleep(0.01)
    return got


def test_an_idle_queue_is_polled_less_and_less(channel: Any) -> None:
    channel._new_queue("prepare")
    seen = _statements(channel)
    assert _poll_for(channel, 1.2) == []
    polls = sum(1 for s in seen if "BEGIN IMMEDIATE" in s)
    # 120 attempts; at a fixed 50 ms that is 24 polls, with the backoff 0, .05, .15, .35,
    # .75 s (+ one at most at the cap): 5-6
    assert 3 <= polls <= 7, polls


def test_a_message_in_an_idle_queue_is_seen_within_the_limit(channel: Any) -> None:
    channel._new_queue("prepare")
    assert _poll_for(channel, 2.0) == []  # fully backed off: the next poll is <= 0.5 s away
    # another process publishes (its own bookkeeping, not ours): the row appears in the table
    _, session_factory = channel._open()
    with session_factory() as other:
        queue = other.query(channel.queue_cls).filter_by(name="prepare").one()
        other.add(channel.message_cls('{"body": "x"}', queue))
        other.commit()
    time.sleep(IDLE_POLL_MAX_S)
    assert channel._get("prepare") == {"body": "x"}


def test_publishing_from_this_process_wakes_the_queue(channel: Any) -> None:
    channel._new_queue("prepare")
    assert _poll_for(channel, 2.0) == []
    channel._put("prepare", {"body": "x"})
    assert channel._get("prepare") == {"body": "x"}  # at once, not after the pause
    with pytest.raises(Empty):
        channel._get("prepare")
    with pytest.raises(Empty):  # found empty a moment ago: not polled again yet
        channel._get("prepare")
    assert POLLING_INTERVAL_S > 0
