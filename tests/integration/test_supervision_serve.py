"""`screener serve` supervising what it started, on real processes (SQLite, the embedded
broker): listener processes that die are started again, a serve killed with SIGKILL takes
its listener processes along, a dead reconciler thread stops serve with exit 1, and an
infer worker stuck in an engine call is ended and started again, its job recovered."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.listener_support import echo_ok
from tests.orthanc import free_port
from tests.supervision_support import (
    MOVED_ON,
    hang_first_infer_process,
    hung_once,
    job_state,
    queued_job,
)
from tests.workers_support import (
    child_pids,
    require_models,
    screener_cmd,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LISTENER_CHILD = "multiprocessing.spawn"  # command line of a listener process (spawn_main)

DIE_RECONCILER = """\
import os, sys
if os.environ.get("SUPERVISION_TEST_INJECT") == "die_reconciler" and sys.argv[1:2] == ["serve"]:
    import screener.study_assembler as assembler

    def assemble_due_studies(*args, **kwargs):
        raise SystemExit("injected: the reconciler thread ends")  # not caught as Exception

    assembler.assemble_due_studies = assemble_due_studies
"""


def _state(pid: int) -> str:
    """The process state letter (``Z`` for a zombie), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _running(pid: int) -> bool:
    return _state(pid) not in ("gone", "Z")


def _env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    model_dir = require_models()
    env = {
        "SCREENER_DATA_DIR": str(tmp_path / "data"),
        "SCREENER_LISTENER__PORT": str(port),
        "SCREENER_LISTENER__HOST": "127.0.0.1",
        "TMPDIR": str(tmp_path),  # the file heartbeats of this run only
        **extra,
    }
    if model_dir:
        env["SCREENER_MODEL__MODEL_DIR"] = model_dir
    return env


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to stop at the end, their process groups too (listener processes left
    behind by a serve killed with SIGKILL are in its group)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc, signal.SIGKILL, timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _serve(
    tmp_path: Path, env: dict[str, str], started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    serve = start_process(screener_cmd("serve"), env, tmp_path / "serve.log")
    started.append(serve)
    port = int(env["SCREENER_LISTENER__PORT"])
    assert wait_for(lambda: echo_ok(port, "SUPERVISION"), 60, 0.5), _log(tmp_path)
    # every listener process listens (one answering is not enough) and the workers started
    assert wait_for(lambda: "pacs-screener serving" in _log(tmp_path, None), 60), _log(tmp_path)
    return serve


def _log(tmp_path: Path, tail: int | None = 4000) -> str:
    """serve's output (its last ``tail`` characters; all with None)."""
    text = (tmp_path / "serve.log").read_text(errors="replace")
    return text[-tail:] if tail else text


def _serve_two_listeners(
    tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]
) -> tuple[int, subprocess.Popen[bytes], list[int]]:
    """serve with ``listener.processes = 2``: its port, its process, its listener children."""
    port = free_port()
    serve = _serve(tmp_path, _env(tmp_path, port, SCREENER_LISTENER__PROCESSES="2"), cleanup)
    listeners = child_pids(serve.pid, LISTENER_CHILD)
    assert len(listeners) == 2, child_pids(serve.pid, "")
    return port, serve, listeners


def test_dead_listener_processes_are_started_again(
    tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]
) -> None:
    port, serve, listeners = _serve_two_listeners(tmp_path, cleanup)
    for pid in listeners:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = child_pids(serve.pid, LISTENER_CHILD)
        return len(now) == 2 and not set(now) & set(listeners)

    assert wait_for(replaced, 30), _log(tmp_path)
    assert wait_for(lambda: echo_ok(port, "SUPERVISION"), 30, 0.5), _log(tmp_path)
    assert serve.poll() is None
    assert "listener process 1 exited" in _log(tmp_path, None)
    assert all(_state(pid) == "gone" for pid in listeners)  # reaped, no zombies
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 0, _log(tmp_path)


def test_serve_killed_with_sigkill_leaves_no_listener_process(
    tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]
) -> None:
    port, serve, listeners = _serve_two_listeners(tmp_path, cleanup)
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait(10)
    # the death signal is SIGTERM: each drains (nothing open here) and exits
    assert wait_for(lambda: not any(_running(pid) for pid in listeners), 40), [
        (pid, _state(pid)) for pid in listeners
    ]
    assert not echo_ok(port, "SUPERVISION")


def test_a_dead_reconciler_thread_stops_serve_with_exit_1(
    tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(DIE_RECONCILER)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    env = _env(tmp_path, free_port(), PYTHONPATH=path, SUPERVISION_TEST_INJECT="die_reconciler")
    serve = start_process(screener_cmd("serve"), env, tmp_path / "serve.log")
    cleanup.append(serve)
    assert wait_for(lambda: serve.poll() is not None, 60), _log(tmp_path)
    assert serve.returncode == 1, _log(tmp_path)
    log = _log(tmp_path, None)
    assert "the reconciler thread died" in log and "injected" in log, log
    assert "the reconciler thread stopped; stopping" in log, log


def test_a_stuck_infer_worker_is_restarted_and_its_job_moves_on(
    tmp_path: Path, cxr_dir: Path, cleanup: list[subprocess.Popen[bytes]]
) -> None:
    """The first infer process hangs in its engine call with the job claimed. Past
    workers.stuck_after_seconds (set through the environment, as an operator would) it is
    stuck: it stops by itself and exits 1 (or, were it unable to, serve reads its heartbeat
    stuck and ends it: SIGTERM, then SIGKILL), and serve starts it again; the reconciler
    hands the claimed job back and it is inferred."""
    job = queued_job(tmp_path, cxr_dir)
    env = _env(
        tmp_path,
        free_port(),
        **hang_first_infer_process(tmp_path),
        SCREENER_WORKERS__STUCK_AFTER_SECONDS="2",
        SCREENER_RECONCILER__STALE_SECONDS="4",
        SCREENER_RECONCILER__INTERVAL_SECONDS="1",
    )
    serve = _serve(tmp_path, env, cleanup)
    data = tmp_path / "data"
    assert wait_for(lambda: hung_once(tmp_path), 60), _log(tmp_path)
    (hung,) = child_pids(serve.pid, "infer")
    try:
        assert job_state(data, job) == "inferring"  # claimed by the hung process
        assert wait_for(lambda: job_state(data, job) in MOVED_ON, 90), (
            job_state(data, job),
            _log(tmp_path),
        )
        log = _log(tmp_path, None)
        assert (
            "infer consumer stops without finishing its work" in log
            or f"infer worker (pid {hung}) is stuck" in log
        ), log
        assert "infer worker exited" in log and "restarting it" in log, log
        assert _state(hung) == "gone"  # ended and reaped
        (restarted,) = child_pids(serve.pid, "infer")
        assert restarted != hung and serve.poll() is None
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, _log(tmp_path)
    finally:  # its own session, and it outlives the SIGTERM a dying serve sends it
        if _running(hung):
            os.kill(hung, signal.SIGKILL)
