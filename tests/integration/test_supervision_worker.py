"""`screener worker` on real processes (SQLite, the embedded broker): the combined worker
supervises its infer child and names only its own queues in its heartbeat; a worker stopped
cleanly removes its heartbeat row (else /healthz counts a stopped worker as alive)."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.workers_support import (
    require_models,
    screener_cmd,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _beats(data: Path) -> dict[int, str]:
    """pid -> queues of the rows in ``process_heartbeats``."""
    try:
        with sqlite3.connect(data / "screener.sqlite3", timeout=10) as db:
            rows = db.execute("SELECT pid, queues FROM process_heartbeats").fetchall()
    except sqlite3.OperationalError:  # not migrated yet
        return {}
    return {int(pid): queues for pid, queues in rows}


def _infer_children(parent: int) -> list[int]:
    """Running children of ``parent`` that run the infer consumer."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and "--queues infer" in cmdline:
            found.append(int(entry.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _env(tmp_path: Path) -> dict[str, str]:
    return {"SCREENER_DATA_DIR": str(tmp_path / "data"), "TMPDIR": str(tmp_path)}


def test_combined_worker_restarts_its_killed_infer_child(tmp_path: Path) -> None:
    model_dir = require_models()
    env = _env(tmp_path) | ({"SCREENER_MODEL__MODEL_DIR": model_dir} if model_dir else {})
    data, log = tmp_path / "data", tmp_path / "worker.log"
    worker = start_process(screener_cmd("worker", "-Q", "prepare,infer,report,deliver"), env, log)
    try:
        assert wait_for(lambda: len(_infer_children(worker.pid)) == 1, 60), log.read_text()
        (first,) = _infer_children(worker.pid)
        assert wait_for(lambda: {worker.pid, first} <= set(_beats(data)), 60), _beats(data)
        # the parent serves the Celery queues; infer has its own row, from the child
        assert _beats(data)[worker.pid] == "prepare,report,deliver"
        assert _beats(data)[first] == "infer"

        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: _infer_children(worker.pid) not in ([], [first]), 20), (
            log.read_text()[-3000:]
        )
        assert _state(first) == "gone"  # reaped: no zombie
        (second,) = _infer_children(worker.pid)
        assert wait_for(lambda: _beats(data).get(second) == "infer", 60), _beats(data)
        assert worker.poll() is None
        assert "infer consumer exited (code -9); restarting it" in log.read_text()

        worker.send_signal(signal.SIGTERM)  # the worker only, as `docker stop` does
        assert worker.wait(60) == 0, log.read_text()[-3000:]
        assert _state(second) == "gone"
        # clean stops remove their rows: only the killed child's stays (until it ages out)
        assert set(_beats(data)) == {first}
    finally:
        stop_process(worker, signal.SIGKILL)


def test_a_cleanly_stopped_worker_removes_its_heartbeat_row(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "worker.log"
    worker = start_process(screener_cmd("worker", "-Q", "report"), _env(tmp_path), log)
    try:
        assert wait_for(lambda: worker.pid in _beats(data), 60), log.read_text()[-3000:]
        assert wait_for(lambda: "ready." in log.read_text(), 60), log.read_text()[-3000:]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()[-3000:]
        assert _beats(data) == {}
    finally:
        stop_process(worker, signal.SIGKILL)
