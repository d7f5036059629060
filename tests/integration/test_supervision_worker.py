"""`screener worker` on real processes (SQLite, the embedded broker): the combined worker
supervises its infer child (restarted when it dies or is stuck) and names only its own
queues in its heartbeat; a worker stopped cleanly removes its heartbeat row (else /healthz
counts a stopped worker as alive)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.supervision_support import (
    MOVED_ON,
    hang_first_infer_process,
    hung_once,
    job_state,
    queued_job,
)
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


def test_a_stuck_infer_child_of_a_combined_worker_is_restarted(
    tmp_path: Path, cxr_dir: Path
) -> None:
    """The first infer child hangs in its engine call with the job claimed. Past
    workers.stuck_after_seconds it stops by itself and exits 1 (or, were it unable to, the
    worker reads its heartbeat stuck and ends it: SIGTERM, then SIGKILL), and the worker
    starts it again; a reconciler (``screener reconcile``, as in the distributed form)
    hands the claimed job back and it moves on."""
    model_dir = require_models()
    job = queued_job(tmp_path, cxr_dir)
    env = (
        _env(tmp_path)
        | ({"SCREENER_MODEL__MODEL_DIR": model_dir} if model_dir else {})
        | hang_first_infer_process(tmp_path)
        | {
            "SCREENER_WORKERS__STUCK_AFTER_SECONDS": "2",
            "SCREENER_RECONCILER__STALE_SECONDS": "4",
            "SCREENER_RECONCILER__INTERVAL_SECONDS": "1",
        }
    )
    data, log = tmp_path / "data", tmp_path / "worker.log"
    worker = start_process(screener_cmd("worker", "-Q", "prepare,infer,report,deliver"), env, log)
    reconciler = start_process(screener_cmd("reconcile"), env, tmp_path / "reconcile.log")
    try:
        assert wait_for(lambda: hung_once(tmp_path), 90), log.read_text()[-3000:]
        (hung,) = _infer_children(worker.pid)
        assert wait_for(lambda: job_state(data, job) in MOVED_ON, 90), (
            job_state(data, job),
            log.read_text()[-3000:],
        )
        text = log.read_text()
        assert (
            "infer consumer stops without finishing its work" in text
            or f"infer consumer (pid {hung}) is stuck" in text
        ), text
        assert re.search(r"infer consumer exited \(code -?\d+\); restarting it", text), text
        assert _state(hung) == "gone"  # ended and reaped
        (second,) = _infer_children(worker.pid)
        assert second != hung and worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()[-3000:]
    finally:
        stop_process(worker, signal.SIGKILL)
        stop_process(reconciler)
