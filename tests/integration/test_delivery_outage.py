"""A PACS outage longer than the old retry span, against a real Orthanc, with no operator.

The old policy (5 attempts, 2 s backoff: ~30 s) dead-lettered everything due during a 40 s
outage. Here Orthanc is stopped for 40 s while the delivery sweep runs (as it does in
``screener serve`` and ``screener reconcile``), then started again: every output must
arrive exactly once, every job must end ``delivered``, and while the PACS was down the
sweep must only have probed it. A virtual-clock run of the same outage counts attempts
with and without the circuit breaker; a third test re-queues dead letters with
``deliveries retry --all-dead`` and lets the sweep send them (no ``--send-now``).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from screener.db.models import AuditLog, ScreeningJob, utcnow
from screener.db.session import session_scope, upgrade
from screener.delivery import (
    deliver_pending,
    destination_health,
    list_deliveries,
    next_due,
    record_outputs,
    settle_jobs,
)
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings
from tests.orthanc import OrthancServer, free_port, orthanc_available
from tests.report_results import make_job, make_result
from tests.workers_support import wait_for
from workers.reconciler import run_delivery_sweep

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Debian package orthanc missing")

OUTAGE_S = 40.0  # longer than the old 5 x 2 s backoff span (~30 s)
STUDIES = 6


def _delivery_settings(settings: Settings, destination: Destination, **extra: object) -> Settings:
    delivery = settings.delivery.model_copy(
        update={
            "destinations": [destination],
            "backoff_seconds": 1.0,
            "backoff_max_seconds": 4.0,
            "sweep_interval_seconds": 2.0,
            "breaker_failures": 3,
            **extra,
        }
    )
    return settings.model_copy(update={"delivery": delivery})


def _reported_jobs(tmp_path: Path, s: Settings, n: int) -> tuple[list[int], list[str]]:
    """``n`` studies screened and reported: SR + heatmap each, deliveries waiting."""
    jobs: list[int] = []
    uids: list[str] = []
    for index in range(n):
        result, _ = make_result(tmp_path / f"study-{index}", ["PA"], scores=[0.7])
        paths = write_study_outputs(result, s.outbox_dir / f"job-{index}", s)
        job_id = make_job(s, result.study_instance_uid)
        record_outputs(s, job_id, paths)
        with session_scope(s.database_url) as session:
            job = session.get(ScreeningJob, job_id)
            assert job is not None
            job.state = "reported"
            session.add(job)
        jobs.append(job_id)
        uids += [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    return jobs, uids


def _job_states(s: Settings, jobs: list[int]) -> list[str]:
    with session_scope(s.database_url) as session:
        return [
            str(state)
            for state in session.exec(
                select(ScreeningJob.state).where(col(ScreeningJob.id).in_(jobs))
            ).all()
        ]


def _attempts(s: Settings) -> int:
    return sum(r.attempts for r in list_deliveries(s))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_outage_longer_than_the_old_retry_span_recovers_by_itself(
    tmp_path: Path, settings: Settings
) -> None:
    pacs = OrthancServer(tmp_path)
    pacs.start()
    stop = threading.Event()
    sweeper: threading.Thread | None = None
    try:
        dest = Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
        s = _delivery_settings(settings, dest)
        jobs, uids = _reported_jobs(tmp_path, s, STUDIES)

        pacs.stop()
        down_at = time.monotonic()
        sweeper = threading.Thread(target=run_delivery_sweep, args=(s, stop), daemon=True)
        sweeper.start()
        assert wait_for(lambda: destination_health(s)[0].state != "up", 20)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        attempts_down = _attempts(s)
        health = destination_health(s)[0]
        rows = list_deliveries(s)
        assert {r.state for r in rows} <= {"retrying", "pending", "sending"}  # nobody died
        assert health.state in ("down", "probing") and health.dead == 0
        assert health.pending == len(uids)
        # 3 failed passes carry every row; after that one probe row at a time
        assert attempts_down <= 3 * len(uids) + 20, attempts_down
        assert set(_job_states(s, jobs)) == {"reported"}

        pacs.start()  # returns once Orthanc answers over REST and DICOM
        up_at = time.monotonic()  # the bound below is the sweep's, not Orthanc's start-up
        assert wait_for(lambda: set(_job_states(s, jobs)) == {"delivered"}, 45, 0.1)
        recovery_s = time.monotonic() - up_at
        stop.set()
        sweeper.join(15)

        for uid in uids:  # every output exactly once, read back over Orthanc's REST API
            assert len(pacs.find_instances(SOPInstanceUID=uid)) == 1, uid
        rows = list_deliveries(s)
        assert {r.state for r in rows} == {"delivered"}
        with session_scope(s.database_url) as session:
            sent = [
                i
                for a in session.exec(
                    select(AuditLog).where(AuditLog.action == "delivery.delivered")
                ).all()
                for i in (a.detail or {}).get("delivery_ids", [])
            ]
        assert sorted(sent) == sorted(r.id for r in rows)  # each row stored once, no repeat
        assert destination_health(s)[0].state == "up"
        print(
            json.dumps(
                {
                    "outage_s": round(up_at - down_at, 1),
                    "recovery_s": round(recovery_s, 2),
                    "outputs": len(uids),
                    "attempts_during_outage": attempts_down,
                    "attempts_total": _attempts(s),
                }
            )
        )
        assert recovery_s < 20  # next probe (<= 4 s) + one pass
    finally:
        stop.set()
        if sweeper is not None:
            sweeper.join(15)
        pacs.stop()


def _virtual_outage(s: Settings, seconds: float) -> int:
    """The sweep's schedule on a virtual clock over a dead port: attempts made."""
    t0 = utcnow()
    now = t0
    while now < t0 + timedelta(seconds=seconds):
        deliver_pending(s, now=now)
        due: datetime | None = next_due(s)
        wait = s.delivery.sweep_interval_seconds
        if due is not None:
            wait = min(wait, max(1.0, (due - now).total_seconds()))
        now += timedelta(seconds=wait)
    return _attempts(s)


def test_breaker_turns_the_retry_storm_into_probes(tmp_path: Path) -> None:
    counts: dict[str, int] = {}
    for label, breaker in (("with_breaker", 3), ("without_breaker", 1_000_000)):
        s = Settings(data_dir=tmp_path / label)
        s.ensure_dirs()
        upgrade(s.database_url)
        dead = Destination(ae_title="DOWN", host="127.0.0.1", port=free_port())
        s = _delivery_settings(s, dead, breaker_failures=breaker, backoff_jitter=0.0)
        _, uids = _reported_jobs(tmp_path / label, s, STUDIES)
        counts[label] = _virtual_outage(s, OUTAGE_S)
        assert {r.state for r in list_deliveries(s)} == {"retrying"}  # nothing given up
    print(json.dumps({"outputs": len(uids), "outage_s": OUTAGE_S, **counts}))
    assert counts["with_breaker"] <= 3 * len(uids) + 12
    assert counts["without_breaker"] >= 3 * counts["with_breaker"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_retry_all_dead_is_sent_by_the_sweep_and_the_job_becomes_delivered(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from screener.cli import app
    from screener.settings import get_settings

    pacs = OrthancServer(tmp_path)
    pacs.start()
    stop = threading.Event()
    sweeper: threading.Thread | None = None
    try:
        dest = Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
        s = _delivery_settings(settings, dest, max_attempts=1)
        jobs, uids = _reported_jobs(tmp_path, s, 2)
        pacs.stop()
        deliver_pending(s)  # the old way to a dead letter: the cap of 1 attempt
        settle_jobs(s)
        assert set(_job_states(s, jobs)) == {"failed"}
        assert {r.state for r in list_deliveries(s)} == {"dead"}
        pacs.start()

        sweeper = threading.Thread(target=run_delivery_sweep, args=(s, stop), daemon=True)
        sweeper.start()
        monkeypatch.setenv("SCREENER_DATABASE_URL", s.database_url)
        get_settings.cache_clear()
        retried = CliRunner().invoke(app, ["deliveries", "retry", "--all-dead"])
        assert retried.exit_code == 0, retried.output
        assert "sweep" in retried.output
        # the sweep sends them within its interval (2 s) and the jobs follow
        assert wait_for(lambda: set(_job_states(s, jobs)) == {"delivered"}, 20, 0.1)
        for uid in uids:
            assert len(pacs.find_instances(SOPInstanceUID=uid)) == 1
        with session_scope(s.database_url) as session:
            reasons = session.exec(
                select(ScreeningJob.reason).where(col(ScreeningJob.id).in_(jobs))
            ).all()
        assert reasons == [None, None]
    finally:
        stop.set()
        if sweeper is not None:
            sweeper.join(15)
        get_settings.cache_clear()
        pacs.stop()
