"""Service commands from an administrator's review: a broker that cannot be reached stops
them at start (exit 5) instead of a listener that accepts studies nobody screens; a wrong
pool or heartbeat name is a usage error (exit 2), not "something failed" (exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_support import Cli, in_process_cli
from tests.orthanc import free_port

SCREENER = str(Path(sys.executable).parent / "screener")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


def test_an_unknown_worker_pool_is_a_usage_error(cli: Cli) -> None:
    done = cli("worker", "-Q", "report", "-P", "bogus")
    assert done.code == 2, (done.out, done.err)
    assert "'bogus' is not one of solo, prefork, threads" in done.err


def test_an_unknown_heartbeat_name_is_a_usage_error(cli: Cli) -> None:
    done = cli("heartbeat", "bogus")
    assert done.code == 2, (done.out, done.err)
    assert "'bogus' is not one of infer, reconciler, delivery-sweep" in done.err
    assert cli("heartbeat", "infer").code == 1  # a known loop that has not beaten: exit 1


@pytest.mark.parametrize(
    "command",
    [["serve"], ["worker", "-Q", "report"], ["reconcile", "--once"]],
    ids=["serve", "worker", "reconcile"],
)
def test_a_broker_that_cannot_be_reached_stops_the_command_at_start(
    tmp_path: Path, command: list[str]
) -> None:
    port = free_port()  # nothing listens there
    env = {
        **os.environ,
        "SCREENER_DATA_DIR": str(tmp_path / "data"),
        "SCREENER_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SCREENER_BROKER_URL": f"redis://:s3cret@127.0.0.1:{port}/0",
        "SCREENER_LISTENER__PORT": str(free_port()),
        "SCREENER_HTTP__PORT": str(free_port()),
        "COLUMNS": "200",
    }
    try:
        done = subprocess.run(
            [SCREENER, *command], env=env, capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:  # the old behaviour: serving, retrying forever
        pytest.fail(f"`screener {' '.join(command)}` kept running with no broker")
    assert done.returncode == 5, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"the broker at redis://:***@127.0.0.1:{port}/0 cannot be reached" in errors[0]
    assert "SCREENER_BROKER_URL" in errors[0] and "s3cret" not in done.stderr


def test_web_stopped_by_sigterm_exits_0(tmp_path: Path) -> None:
    """uvicorn raised SIGTERM again after its clean shutdown: `screener web` ended 143."""
    import signal
    import time

    from tests.orthanc import port_open

    env = {
        **os.environ,
        "SCREENER_DATA_DIR": str(tmp_path / "data"),
        "SCREENER_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    subprocess.run([SCREENER, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [SCREENER, "web", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_open(port) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert port_open(port), proc.stderr.read() if proc.poll() is not None else "not up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_port_is_named_by_serve_and_web(tmp_path: Path) -> None:
    """`serve` and `web` said "cannot listen: address already in use" and named both port
    settings; now the address and the setting that moves it."""
    import socket

    env = {
        **os.environ,
        "SCREENER_DATA_DIR": str(tmp_path / "data"),
        "SCREENER_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SCREENER_HTTP__PORT": str(free_port()),
        "COLUMNS": "200",
    }
    subprocess.run([SCREENER, "db", "upgrade"], env=env, check=True, capture_output=True)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        serve = subprocess.run(
            [SCREENER, "serve"],
            env={**env, "SCREENER_LISTENER__PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        web = subprocess.run(
            [SCREENER, "web", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert serve.returncode == 5, serve.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: the port is already in use" in serve.stderr
    assert "(SCREENER_LISTENER__PORT)" in serve.stderr
    assert web.returncode == 5, web.stderr
    assert f"error: cannot serve HTTP on 127.0.0.1:{port}: the port is already in use" in (
        web.stderr
    )
    assert "(--port or SCREENER_HTTP__PORT)" in web.stderr
