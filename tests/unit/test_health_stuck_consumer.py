"""A batching consumer whose engine call never returns is not alive: its receiving loop
still turns, but the liveness now comes from progress (a batch finished), so once work is
held with no batch finished for longer than the limit, the heartbeat file goes stale
(``screener heartbeat infer`` fails), ``/healthz`` names the stuck infer worker and the
process's row in ``process_heartbeats`` stops being refreshed. Idle, it stays alive; once
the work moves again, so does the heartbeat."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from screener.cli import app as cli
from screener.db.models import ProcessHeartbeat
from screener.db.session import session_scope
from screener.settings import Settings
from screener.web.app import create_app
from workers import batching, heartbeat
from workers.batching import BatchingConsumer, BatchPolicy, Step
from workers.celery_app import TASK_FOR_QUEUE
from workers.celery_app import create_app as celery_app
from workers.heartbeat import Heartbeat, ProcessBeat, heartbeat_age, heartbeat_state

LIMIT_S = 1.0


class HangingEngine:
    """A staged handler whose one engine step waits until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.persisted: list[int] = []

    @property
    def steps(self) -> Sequence[Step]:
        return [Step("engine", self._engine, engine=True)]

    def _engine(self, state: Any) -> Any:
        self.entered.set()
        self.release.wait(30)
        return state

    def admit(self, job_ids: list[int]) -> list[int | None]:
        return list(job_ids)

    def size(self, item: int) -> int:
        return 1

    def begin(self, items: list[int]) -> Any:
        return list(items)

    def persist(self, state: Any) -> list[int]:
        self.persisted.extend(state)
        return list(state)

    def fail(self, item: int, exc: BaseException) -> None:
        raise AssertionError(f"job {item} failed: {exc!r}")


def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _row_beat(settings: Settings, name: str) -> Any:
    with session_scope(settings.database_url) as session:
        row = session.get(ProcessHeartbeat, name)
        return None if row is None else row.beat_at


def _cli_alive() -> bool:
    return CliRunner().invoke(cli, ["heartbeat", "infer", "--max-age", "1"]).exit_code == 0


@pytest.fixture
def consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[BatchingConsumer[int], HangingEngine, Callable[[int], None]]]:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(batching, "STUCK_AFTER_S", LIMIT_S, raising=False)
    app = celery_app(Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"))
    handler = HangingEngine()
    running = BatchingConsumer(
        app, "infer", handler, BatchPolicy(1, 0.0), heartbeat=Heartbeat("infer", every_s=0.1)
    )

    def send(job_id: int) -> None:
        app.send_task(TASK_FOR_QUEUE["infer"], args=[job_id], queue="infer", routing_key="infer")

    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        yield running, handler, send
    finally:
        handler.release.set()
        running.stop_event.set()
        thread.join(20)


def test_an_idle_consumer_stays_alive(
    consumer: tuple[BatchingConsumer[int], HangingEngine, Callable[[int], None]],
) -> None:
    assert _until(lambda: heartbeat_age("infer") is not None, 10)
    time.sleep(LIMIT_S * 2.5)  # nothing held: waiting for work is not being stuck
    state = heartbeat_state("infer")
    assert state is not None and state.stuck is None and state.age_s < LIMIT_S
    assert _cli_alive()
    assert heartbeat.stuck_reason() is None


def test_a_hung_engine_call_makes_the_infer_worker_stuck_everywhere(
    consumer: tuple[BatchingConsumer[int], HangingEngine, Callable[[int], None]],
    sqlite_settings: Settings,
) -> None:
    _, handler, send = consumer
    beat = ProcessBeat(sqlite_settings.database_url, "worker", "infer", every_s=0.1).start()
    web = TestClient(create_app(sqlite_settings))
    try:
        assert _until(lambda: heartbeat_age("infer") is not None, 10)
        assert _until(lambda: _row_beat(sqlite_settings, beat.name) is not None, 10)
        assert _cli_alive()
        send(1)
        assert handler.entered.wait(20)

        def stuck() -> bool:
            state = heartbeat_state("infer")
            return state is not None and state.stuck is not None

        assert _until(stuck, LIMIT_S + 5), heartbeat_state("infer")
        state = heartbeat_state("infer")
        assert state is not None and state.age_s >= LIMIT_S and state.writer_alive
        assert "no batch finished" in str(state.stuck)
        assert not _cli_alive()  # `screener heartbeat infer` fails: the container restarts it
        body = web.get("/healthz").json()
        assert "workers" in body["failing"]
        assert "infer worker stuck: no batch finished" in body["checks"]["workers"], body
        time.sleep(0.2)  # a beat begun before the consumer stalled has landed
        frozen = _row_beat(sqlite_settings, beat.name)
        time.sleep(0.5)  # ProcessBeat beats every 0.1 s, but not for a stuck process
        assert _row_beat(sqlite_settings, beat.name) == frozen

        handler.release.set()  # the engine answers: the batch finishes, liveness returns
        assert _until(lambda: handler.persisted == [1], 10)
        assert _until(lambda: not stuck() and _cli_alive(), 5), heartbeat_state("infer")
        assert "stuck" not in web.get("/healthz").json()["checks"]["workers"]
        assert _until(lambda: _row_beat(sqlite_settings, beat.name) != frozen, 5)
    finally:
        beat.stop()
