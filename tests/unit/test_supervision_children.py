"""The supervision building blocks on real (tiny) processes: the restart rule, the
supervised infer child of a combined ``screener worker``, the parent-death signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.workers_support import wait_for
from workers.runner import RestartRule, SupervisedChild, die_with_parent

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


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
