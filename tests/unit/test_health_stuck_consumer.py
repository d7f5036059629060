"""A batching consumer whose engine call never returns is not alive: its receiving loop
still turns, but the liveness now comes from progress (a batch finished), so once work is
held with no batch finished for longer than the limit, the heartbeat file goes stale
(``screener heartbeat infer`` fails), ``/healthz`` names the stuck infer worker and the
process's row in ``process_heartbeats`` stops being refreshed. Idle, it stays alive; once
the work moves again, so does the heartbeat. The limit is one setting
(``workers.stuck_after_seconds``) that the consumer and ``/healthz`` both read."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient
from typer.testing import CliRunner

from screener.cli import app as cli
from screener.db.models import ProcessHeartbeat
from screener.db.session import session_scope
from screener.settings import Settings
from screener.web.app import create_app
from workers import batching, heartbeat, runner
from workers.batching import BatchingConsumer, BatchPolicy, Step
from workers.celery_app import TASK_FOR_QUEUE
from workers.celery_app import create_app as celery_app
from workers.heartbeat import (
    Heartbeat,
    HeartbeatState,
    ProcessBeat,
    heartbeat_age,
    heartbeat_path,
    heartbeat_state,
)

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


def _pipeline_ended() -> None:
    """Wait for the pipeline threads a stopped consumer left behind (released, the hung
    batch goes on to the writer, which logs): none may log after the test's capture ends."""
    assert _until(lambda: not any(t.name.startswith("infer-") for t in threading.enumerate()), 20)


def _row_beat(settings: Settings, name: str) -> Any:
    with session_scope(settings.database_url) as session:
        row = session.get(ProcessHeartbeat, name)
        return None if row is None else row.beat_at


def _cli_alive() -> bool:
    return CliRunner().invoke(cli, ["heartbeat", "infer", "--max-age", "1"]).exit_code == 0


def _data_dir() -> Path:
    """The data dir of this test's install (SCREENER_DATA_DIR, set by the conftest)."""
    return Settings().data_dir


def _state() -> HeartbeatState | None:
    return heartbeat_state("infer", _data_dir())


def _age() -> float | None:
    return heartbeat_age("infer", _data_dir())


@pytest.fixture
def consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[BatchingConsumer[int], HangingEngine, Callable[[int], None]]]:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("SCREENER_WORKERS__STUCK_AFTER_SECONDS", str(LIMIT_S))
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}")
    app = celery_app(settings)
    handler = HangingEngine()
    running = BatchingConsumer(
        app,
        "infer",
        handler,
        BatchPolicy(1, 0.0),
        heartbeat=Heartbeat("infer", settings.data_dir, every_s=0.1),
        stuck_after_s=settings.workers.stuck_after_seconds,
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
    assert _until(lambda: _age() is not None, 10)
    time.sleep(LIMIT_S * 2.5)  # nothing held: waiting for work is not being stuck
    state = _state()
    assert state is not None and state.stuck is None and state.age_s < LIMIT_S
    assert _cli_alive()
    assert heartbeat.stuck_reason() is None


def test_a_hung_engine_call_makes_the_infer_worker_stuck_everywhere(
    consumer: tuple[BatchingConsumer[int], HangingEngine, Callable[[int], None]],
    sqlite_settings: Settings,
) -> None:
    _, handler, send = consumer
    sqlite_settings.workers.stuck_after_seconds = LIMIT_S
    beat = ProcessBeat(sqlite_settings.database_url, "worker", "infer", every_s=0.1).start()
    web = TestClient(create_app(sqlite_settings))
    try:
        assert _until(lambda: _age() is not None, 10)
        assert _until(lambda: _row_beat(sqlite_settings, beat.name) is not None, 10)
        assert _cli_alive()
        send(1)
        assert handler.entered.wait(20)

        def stuck() -> bool:
            state = _state()
            return state is not None and state.stuck is not None

        assert _until(stuck, LIMIT_S + 5), _state()
        state = _state()
        assert state is not None and state.age_s >= LIMIT_S and state.writer_alive
        assert "no batch finished" in str(state.stuck)
        assert not _cli_alive()  # `screener heartbeat infer` fails: the container restarts it
        body = web.get("/healthz").json()
        assert "workers" in body["failing"]
        assert "infer worker stuck: no batch finished" in body["checks"]["workers"], body
        # the beat thread has seen the stall: its loop is sequential, so the beat it may
        # have begun before has landed (a fixed 0.2 s wait was not that, under load)
        assert _until(lambda: beat._stuck is not None, 10)
        frozen = _row_beat(sqlite_settings, beat.name)
        time.sleep(0.5)  # ProcessBeat beats every 0.1 s, but not for a stuck process
        assert _row_beat(sqlite_settings, beat.name) == frozen

        handler.release.set()  # the engine answers: the batch finishes, liveness returns
        assert _until(lambda: handler.persisted == [1], 10)
        assert _until(lambda: not stuck() and _cli_alive(), 5), _state()
        assert "stuck" not in web.get("/healthz").json()["checks"]["workers"]
        assert _until(lambda: _row_beat(sqlite_settings, beat.name) != frozen, 5)
    finally:
        beat.stop()


def test_a_stopping_consumer_does_not_wait_forever_for_a_hung_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to an infer worker whose engine call never returns (its supervisor stopping
    it, or the parent-death signal after ``serve`` was killed): it gave up waiting only when
    the engine answered, so the process lived on as an orphan. Now it stops once the held
    work has not moved for the stuck limit; the broker gets the messages back."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}")
    app = celery_app(settings)
    handler = HangingEngine()
    running = BatchingConsumer(app, "infer", handler, BatchPolicy(1, 0.0), stuck_after_s=LIMIT_S)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        app.send_task(TASK_FOR_QUEUE["infer"], args=[7], queue="infer", routing_key="infer")
        assert handler.entered.wait(20)
        running.stop_event.set()
        thread.join(LIMIT_S + 10)  # the engine would hold it for 30 s
        assert not thread.is_alive()
        assert handler.persisted == []  # nothing was committed for the hung batch
    finally:
        handler.release.set()
        running.stop_event.set()
        thread.join(20)
        _pipeline_ended()


def test_a_worker_process_of_its_own_stops_once_stuck_to_be_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone infer worker (the compose ``worker-gpu``) has no supervisor: stuck, it
    only turned its container unhealthy, which Docker does not act on. With
    ``stop_when_stuck`` (what ``run_infer_consumer`` sets for a process of its own) the
    consumer stops by itself and says why; its process then exits 1 for Docker's restart
    policy, systemd or serve to start it again."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}")
    app = celery_app(settings)
    handler = HangingEngine()
    running = BatchingConsumer(
        app, "infer", handler, BatchPolicy(1, 0.0), stuck_after_s=LIMIT_S, stop_when_stuck=True
    )
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        app.send_task(TASK_FOR_QUEUE["infer"], args=[8], queue="infer", routing_key="infer")
        assert handler.entered.wait(20)
        thread.join(LIMIT_S + 10)  # nobody asked it to stop
        assert not thread.is_alive()
        assert running.gave_up is not None and "no batch finished" in running.gave_up
        assert handler.persisted == []
    finally:
        handler.release.set()
        running.stop_event.set()
        thread.join(20)
        _pipeline_ended()


def test_the_stuck_limit_is_a_validated_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().workers.stuck_after_seconds == 300.0
    monkeypatch.setenv("SCREENER_WORKERS__STUCK_AFTER_SECONDS", "7.5")
    assert Settings().workers.stuck_after_seconds == 7.5
    for refused in ("0", "-1"):
        monkeypatch.setenv("SCREENER_WORKERS__STUCK_AFTER_SECONDS", refused)
        with pytest.raises(ValidationError, match="stuck_after_seconds"):
            Settings()


def _stuck_file(settings: Settings, quiet_s: float) -> None:
    """An infer heartbeat file of this (live) process, stuck for ``quiet_s``."""
    path = heartbeat_path("infer", settings.data_dir)
    path.write_text(json.dumps({"pid": os.getpid(), "stuck": "no batch finished"}) + "\n")
    when = time.time() - quiet_s
    os.utime(path, (when, when))


def test_healthz_judges_a_stuck_consumer_by_the_setting(
    sqlite_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer configured with a longer limit than another's file says is not stuck by
    this install's rule: /healthz and the supervisors use the one setting."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    _stuck_file(sqlite_settings, 10.0)
    assert "stuck" not in _workers_check(sqlite_settings)  # the default limit: 300 s
    sqlite_settings.workers.stuck_after_seconds = 5.0
    assert "infer worker stuck: no batch finished" in _workers_check(sqlite_settings)


def _workers_check(settings: Settings) -> str:
    return str(TestClient(create_app(settings)).get("/healthz").json()["checks"]["workers"])


class _Recorded:
    """Stands in for the consumer, the handler and the models of ``run_infer_consumer``."""

    made: list[dict[str, Any]] = []  # the keyword arguments of each

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Recorded.made.append(kwargs)
        self.batches = 0
        self.gave_up = None
        self.model_info = self
        self.ref = self.engine = "stub"

    def run(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_infer_worker_hands_the_setting_to_its_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from screener.screening import models
    from workers import infer_stage

    monkeypatch.setenv("SCREENER_WORKERS__STUCK_AFTER_SECONDS", "42")
    monkeypatch.setattr(_Recorded, "made", [])
    monkeypatch.setattr(models.ScreeningModels, "from_settings", _Recorded)
    monkeypatch.setattr(infer_stage, "ScreeningHandler", _Recorded)
    monkeypatch.setattr(batching, "BatchingConsumer", _Recorded)
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}")
    runner.run_infer_consumer(settings, install_signals=False)
    (consumer,) = [kwargs for kwargs in _Recorded.made if "heartbeat" in kwargs]
    assert consumer["stuck_after_s"] == 42.0
    assert consumer["heartbeat"].path == heartbeat_path("infer", settings.data_dir)
    assert consumer["stop_when_stuck"] is False  # a test's thread: only a process exits
