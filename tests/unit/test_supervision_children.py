"""The supervision building blocks on real (tiny) processes: the restart rule, the
supervised infer child of a combined ``screener worker``, the parent-death signal, and the
end of a child whose heartbeat says it is stuck (alive, but its work does not move)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from screener.settings import Settings
from tests.workers_support import wait_for
from workers import heartbeat
from workers.heartbeat import heartbeat_path
from workers.runner import (
    EmbeddedService,
    RestartRule,
    StuckWatch,
    SupervisedChild,
    die_with_parent,
    infer_stuck_watch,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# An infer consumer in miniature: the first start (no marker yet) hangs as an engine call
# that never returns does: its loop says stuck for 10 s and it outlives SIGTERM (the real
# consumer's drain waits on the hung thread); started again, its work moves.
STALLER = """\
import signal, sys, time
from pathlib import Path
from workers.heartbeat import Heartbeat

marker, data = Path(sys.argv[1]), Path(sys.argv[2])
beat = Heartbeat("infer", data, every_s=0.0)
if marker.exists():
    while True:
        beat.beat()
        time.sleep(0.05)
marker.touch()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    beat.stall(10.0, "no batch finished for 10 s with 1 message(s) held")
    time.sleep(0.05)
"""


def _is_zombie_or_gone(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_restart_rule_gives_up_on_the_sixth_exit_in_ten_minutes() -> None:
    rule = RestartRule()
    assert all(rule.allow("infer worker", now=float(t)) for t in range(5))
    assert not rule.allow("infer worker", now=5.0)
    assert rule.allow("report worker", now=5.0)  # counted per process
    assert rule.allow("infer worker", now=601.0)  # the first exits left the window


def test_a_killed_child_is_reaped_and_started_again() -> None:
    child = SupervisedChild("sleeper", SLEEPER, dict(os.environ), lambda: None, poll_s=0.1)
    child.start()
    try:
        assert child.proc is not None
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: child.proc is not None and child.proc.pid != first, 10)
        assert child.proc.poll() is None
        assert _is_zombie_or_gone(first) == "gone"  # reaped, no zombie
        assert not child.given_up
    finally:
        child.stop(timeout=5)
    assert child.proc.returncode == -signal.SIGTERM


def test_a_child_that_keeps_exiting_is_given_up() -> None:
    gave_up = threading.Event()
    child = SupervisedChild(
        "crasher",
        [sys.executable, "-c", "raise SystemExit(3)"],
        dict(os.environ),
        gave_up.set,
        rule=RestartRule(limit=2),
        poll_s=0.05,
    )
    child.start()
    try:
        assert gave_up.wait(20)
        assert child.given_up
    finally:
        child.stop(timeout=5)


def test_no_restart_once_shutting_down() -> None:
    child = SupervisedChild("sleeper", SLEEPER, dict(os.environ), lambda: None, poll_s=0.05)
    child.start()
    try:
        assert child.proc is not None
        first = child.proc
        child.shutting_down()
        first.terminate()
        first.wait(5)
        assert not wait_for(lambda: child.proc is not first, 1)
    finally:
        child.stop(timeout=5)


def test_stop_kills_a_child_that_does_not_stop_in_time() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = SupervisedChild(
        "stubborn", [sys.executable, "-c", stubborn], dict(os.environ), lambda: None
    )
    child.start()
    assert child.proc is not None
    assert wait_for(lambda: _ignores_sigterm(child.proc.pid), 10)  # its handler is in place
    child.stop(timeout=1)
    assert child.proc.returncode == -signal.SIGKILL


def _ignores_sigterm(pid: int) -> bool:
    """From the SigIgn mask of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_a_child_whose_parent_is_already_gone_terminates() -> None:
    """The parent died before the child set its death signal: the kernel will never send
    it, so the child checks its parent right after and ends itself."""
    code = (
        "import os, time; from workers.runner import die_with_parent; "
        "die_with_parent(os.getppid() + 1); time.sleep(30)"  # that pid is not our parent
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=30, cwd=_repo())
    assert done.returncode == -signal.SIGTERM


def test_die_with_parent_keeps_a_child_whose_parent_lives() -> None:
    code = (
        "import os; from workers.runner import die_with_parent; "
        "die_with_parent(os.getppid()); print('alive')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], timeout=30, cwd=_repo(), capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr
    assert die_with_parent.__defaults__ == (None,)  # still usable as a bare preexec_fn


def _repo() -> Path:
    return Path(__file__).resolve().parents[2]


def _write_state(data: Path, pid: int, stuck: str | None, age_s: float) -> None:
    path = heartbeat_path("infer", data)
    path.write_text(json.dumps({"pid": pid, "stuck": stuck}) + "\n")
    when = time.time() - age_s
    os.utime(path, (when, when))


def test_a_stuck_heartbeat_ends_only_the_child_that_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    data = tmp_path / "data"
    sent: list[int] = []
    # a grace two consecutive checks stay within on a loaded machine (0.3 s did not always)
    watch = StuckWatch("infer worker", "infer", data, limit_s=5.0, grace_s=2.0)
    child = 4242  # the pid the supervisor started; signals are only recorded

    watch.check(child, sent.append)  # no heartbeat yet (loading its models)
    _write_state(data, child, None, 60.0)  # old, but not stuck: the file age alone is not
    watch.check(child, sent.append)  # this rule's business (`screener heartbeat` judges it)
    _write_state(data, child, "no batch finished", 3.0)  # stuck, not yet past the limit
    watch.check(child, sent.append)
    _write_state(data, child + 1, "no batch finished", 60.0)  # an earlier child's file
    watch.check(child, sent.append)
    assert sent == []

    _write_state(data, child, "no batch finished", 60.0)
    watch.check(child, sent.append)
    assert sent == [signal.SIGTERM]
    watch.check(child, sent.append)  # within the grace: nothing more
    assert sent == [signal.SIGTERM]
    time.sleep(2.05)
    watch.check(child, sent.append)
    watch.check(child, sent.append)  # killed once
    assert sent == [signal.SIGTERM, signal.SIGKILL]


def _staller(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    argv = [sys.executable, "-c", STALLER, str(tmp_path / "hung-once"), str(tmp_path / "data")]
    return argv, {**os.environ, "TMPDIR": str(tmp_path)}


def _stuck_logged(caplog: pytest.LogCaptureFixture, what: str, pid: int) -> bool:
    """The ERROR says which child, for how long (the file says 10 s) and what follows."""
    said = re.compile(
        rf"{what} \(pid {pid}\) is stuck: .* not moved for 1\d\.\d s .* restarting it"
    )
    return any(r.levelno == logging.ERROR and said.search(r.getMessage()) for r in caplog.records)


def test_a_stuck_child_is_killed_and_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    argv, env = _staller(tmp_path)
    watch = StuckWatch("infer consumer", "infer", tmp_path / "data", limit_s=1.0, grace_s=0.5)
    child = SupervisedChild("infer consumer", argv, env, lambda: None, poll_s=0.1, stuck=watch)
    caplog.set_level(logging.INFO, logger="workers.runner")
    child.start()
    try:
        assert child.proc is not None
        first = child.proc
        assert wait_for(lambda: child.proc is not first, 15), caplog.text
        assert first.returncode == -signal.SIGKILL  # SIGTERM was not enough
        assert _stuck_logged(caplog, "infer consumer", first.pid), caplog.text
        assert "infer consumer exited (code -9); restarting it" in caplog.text
        second = child.proc
        assert not wait_for(lambda: child.proc is not second, 1.5)  # its work moves: kept
        assert second.poll() is None and not child.given_up
    finally:
        child.stop(timeout=5)


def test_serve_ends_a_stuck_infer_worker_and_starts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """serve's supervision (``revive``, once a second) with the watch ``start`` gives its
    infer worker: on the service's own setting, SIGTERM then SIGKILL to the process
    group, and the restart under the restart rule."""
    monkeypatch.setattr(heartbeat.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("SCREENER_WORKERS__STUCK_AFTER_SECONDS", "1")
    settings = Settings(data_dir=tmp_path / "data")
    service = EmbeddedService(settings, stuck_grace_s=0.5)
    service._commands = {"infer": _staller(tmp_path)}  # the infer worker alone
    service._watches = {"infer": infer_stuck_watch(settings, "infer worker", 0.5)}
    caplog.set_level(logging.INFO, logger="workers.runner")
    service._spawn("infer")
    first = service.processes["infer"]
    try:
        revived: list[str] = []
        assert _until(lambda: revived.extend(service.revive()[0]) or revived, 15), caplog.text
        assert revived == ["infer worker"]
        assert first.returncode == -signal.SIGKILL
        assert _stuck_logged(caplog, "infer worker", first.pid), caplog.text
        second = service.processes["infer"]
        assert not _until(lambda: service.revive() != ([], []), 1.5)
        assert second.poll() is None
    finally:
        service.stop(timeout=5)


def _until(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
