"""Helpers for the worker tests: dedicated Redis databases, DB rows, worker subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from sqlmodel import Session

from screener.db.models import (
    Instance,
    JobState,
    OutputObject,
    ScreeningJob,
    Series,
    Study,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
# Databases reserved for these tests; only these are ever flushed (other engineers' tests
# and services on this Redis use other database numbers).
REDIS_DBS = {"batching": 11, "reconciler": 12, "e2e": 13, "bench": 14, "tasks": 15}


def test_model_dir() -> str:
    """The model folder the end-to-end tests use: the shipped weights, or another folder
    named by PACS_SCREENER_TEST_MODEL_DIR (e.g. a candidate model before it ships)."""
    return os.environ.get("PACS_SCREENER_TEST_MODEL_DIR", "")


def require_models() -> str:
    """Skip the calling test when no trained models are available; else the model dir."""
    from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR

    directory = Path(test_model_dir()) if test_model_dir() else SHIPPED_WEIGHTS_DIR
    if not (directory / MANIFEST_NAME).exists():
        import pytest

        pytest.skip(f"no trained models in {directory} yet")
    return test_model_dir()


def redis_url(purpose: str) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DBS[purpose]}"


def fresh_redis(purpose: str) -> redis.Redis:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DBS[purpose])
    client.flushdb()
    return client


def make_job(
    database_url: str,
    study_uid: str,
    state: JobState = JobState.QUEUED,
    files: Sequence[Path] = (),
) -> int:
    """A study with its instance rows (optional) and one screening job in ``state``."""
    now = utcnow()
    with session_scope(database_url) as session:
        study = Study(study_instance_uid=study_uid, is_complete=True, completed_at=now)
        session.add(study)
        session.flush()
        assert study.id is not None
        series = Series(study_id=study.id, series_instance_uid=study_uid + ".1", modality="CR")
        session.add(series)
        session.flush()
        assert series.id is not None
        for index, path in enumerate(files):
            session.add(
                Instance(
                    study_id=study.id,
                    series_id=series.id,
                    sop_instance_uid=f"{study_uid}.1.{index + 1}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    file_path=str(path),
                    content_digest="blake3:" + "0" * 64,
                )
            )
        job = ScreeningJob(study_id=study.id, state=state.value, created_at=now, updated_at=now)
        session.add(job)
        session.flush()
        assert job.id is not None
        return job.id


def add_sr_output(session: Session, settings: Settings, job_id: int, study_uid: str) -> int:
    """An SR output row of ``job_id`` (its file is not written); its id, for deliveries."""
    output = OutputObject(
        job_id=job_id,
        study_instance_uid=study_uid,
        sop_instance_uid=study_uid + ".9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
        kind="sr",
        file_path=str(settings.outbox_dir / "sr.dcm"),
    )
    session.add(output)
    session.flush()
    assert output.id is not None
    return output.id


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A worker/service subprocess with its own process group, logging to ``log_path``."""
    full_env = {**os.environ, **env}
    log = log_path.open("ab")
    from workers.runner import die_with_parent

    return subprocess.Popen(
        args,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # no orphans if the test run is killed
    )


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def screener_cmd(*args: str) -> list[str]:
    """The installed console script of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "screener"), *args]


def child_pids(parent: int, word: str) -> list[int]:
    """Running child processes of ``parent`` (not zombies) whose command line contains
    ``word``, sorted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and word in cmdline:
            found.append(int(entry.name))
    return sorted(found)
