"""The embedded broker (kombu's SQLAlchemy transport on SQLite) backs off polling idle
queues: an idle ``serve`` must not spend a tenth of a core polling empty tables, and a
message must still be seen within ``IDLE_POLL_MAX_S``."""

from __future__ import annotations

import subprocess
import sys
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


def test_an_idle_queue_is_polled_only_when_woken_or_at_the_limit(channel: Any) -> None:
    channel._new_queue("prepare")
    seen = _statements(channel)
    assert _poll_for(channel, 1.2) == []
    polls = sum(1 for s in seen if "BEGIN IMMEDIATE" in s)
    # 120 attempts; at a fixed 50 ms that is 24 polls; the wake file unmoved, at 0, 0.5
    # and 1.0 s only
    assert 2 <= polls <= 3, polls


def test_publish_and_poll_do_not_look_the_queue_up_again(channel: Any) -> None:
    channel._new_queue("prepare")
    channel._put("prepare", {"body": "warm"})
    assert channel._get("prepare") == {"body": "warm"}
    seen = _statements(channel)
    channel._put("prepare", {"body": "x"})
    assert channel._get("prepare") == {"body": "x"}
    assert not [s for s in seen if "kombu_queue" in s], seen
    inserts = [s for s in seen if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 1 and "kombu_message" in inserts[0]


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


def test_a_publish_from_another_process_wakes_a_backed_off_queue(
    channel: Any, tmp_path: Path
) -> None:
    """``serve``'s listener publishes ``prepare`` jobs, the CPU worker consumes them: the
    worker must not wait out its idle backoff (up to IDLE_POLL_MAX_S per stage)."""
    channel._new_queue("prepare")
    assert _poll_for(channel, 0.2) == []
    patient = IdleBackoff(limit=600.0)  # a long backoff: only the wake file can end it
    embedded_broker.BACKOFF = patient  # (the fixture restores the module's own)
    for _ in range(16):
        patient.empty("prepare", time.monotonic())
    with pytest.raises(Empty):
        channel._get("prepare")  # records the wake file's stamp; not due for minutes
    publisher = (
        "import sys\n"
        "from kombu import Connection\n"
        "from workers.embedded_broker import split_embedded_url\n"
        "url, transport = split_embedded_url(sys.argv[1])\n"
        "with Connection(url, transport=transport) as conn:\n"
        "    conn.channel()._put('prepare', {'body': 'from afar'})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", publisher, f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    wake = embedded_broker.wake_file(f"sqlite:///{tmp_path / 'broker.sqlite3'}", "prepare")
    assert wake is not None and wake.stat().st_size >= 1
    assert channel._get("prepare") == {"body": "from afar"}  # at once: no pause waited


def test_wake_files_are_named_safely(tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path / 'b.sqlite3'}"
    assert embedded_broker.wake_file(base, "infer") == tmp_path / "b.sqlite3.wake" / "infer"
    odd = embedded_broker.wake_file(base, "../../etc/passwd")
    assert odd is not None and odd.parent == tmp_path / "b.sqlite3.wake" and "/" not in odd.name
    assert embedded_broker.wake_file("sqlite:///:memory:", "infer") is None
    assert embedded_broker.wake_file("postgresql://h/db", "infer") is None


def test_broker_commits_are_wal_without_fsync_per_message(channel: Any) -> None:
    """The broker's messages are re-sent by the reconciler after a power cut, so its commits
    skip the fsync (synchronous NORMAL = 1); WAL keeps them safe from a process crash."""
    engine, _ = channel._open()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1


def test_a_delivered_message_leaves_no_row_behind(tmp_path: Path) -> None:
    """kombu's transport kept every delivered message as an invisible row (the table and
    each poll's scan grew forever); here taking a message deletes it, and rows left
    invisible by an older version are removed once."""
    import sqlite3

    path = tmp_path / "broker.sqlite3"
    url, transport = embedded_broker.split_embedded_url(f"sqla+sqlite:///{path}")
    with Connection(url, transport=transport) as conn:
        queue = conn.SimpleQueue("report")
        queue.put({"job": 0})
        queue.close()
    with sqlite3.connect(path) as db:  # as kombu's own transport leaves a delivered one
        db.execute("UPDATE kombu_message SET visible = 0")
    embedded_broker._PURGED.clear()  # a new process
    with Connection(url, transport=transport) as conn:
        queue = conn.SimpleQueue("report")
        for job in range(1, 6):
            queue.put({"job": job})
        got = []
        for _ in range(5):
            message = queue.get(timeout=5)
            got.append(message.payload["job"])
            message.ack()
        queue.close()
    assert got == [1, 2, 3, 4, 5]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)
