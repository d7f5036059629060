"""Delivery bookkeeping against a real C-STORE peer (dcmtk storescp), SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import update
from sqlmodel import col, select

from screener.db.models import (
    AuditLog,
    Delivery,
    DeliveryState,
    OutputObject,
    ScreeningJob,
    utcnow,
)
from screener.db.session import session_scope
from screener.delivery import (
    backoff_delay,
    deliver_pending,
    job_delivered,
    list_deliveries,
    previous_outputs_for_study,
    record_outputs,
    retry_dead,
)
from screener.reports.writer import write_study_outputs
from screener.results import StudyResult, ThresholdInfo
from screener.settings import Destination, Settings
from screener.status import collect as collect_status
from screener.timeutil import aware
from tests.orthanc import free_port, port_open
from tests.report_results import make_job, make_result

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk not installed")


class StoreScp:
    """dcmtk storescp on a loopback port, writing what it receives into a directory."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        aet: str = "STORESCP",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.aet = aet
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "storescp",
                "-aet",
                self.aet,
                "-od",
                str(self.directory),
                "+xa",
                *self.extra_args,
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def received(self) -> list[str]:
        return sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.directory.iterdir()
            if p.is_file()
        )

    def destination(self) -> Destination:
        return Destination(ae_title=self.aet, host="127.0.0.1", port=self.port)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[StoreScp]:
    scp = StoreScp(tmp_path / "received").start()
    yield scp
    scp.stop()


def _outputs(
    tmp_path: Path, settings: Settings, views: list[str | None] | None = None
) -> tuple[StudyResult, list[Path]]:
    views = views or ["PA"]
    result, _ = make_result(tmp_path, views, scores=[0.7] * len(views))
    paths = write_study_outputs(result, tmp_path / "outbox", settings)
    return result, paths


def _with_destinations(
    settings: Settings, *destinations: Destination, **delivery: object
) -> Settings:
    update = {"destinations": list(destinations), "backoff_jitter": 0.0, **delivery}
    return settings.model_copy(update={"delivery": settings.delivery.model_copy(update=update)})


def test_backoff_grows_and_is_capped(settings: Settings) -> None:
    s = _with_destinations(settings, backoff_seconds=2.0, backoff_max_seconds=10.0)
    assert [backoff_delay(n, s).total_seconds() for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_record_and_deliver_once(tmp_path: Path, settings: Settings, peer: StoreScp) -> None:
    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    outputs = record_outputs(s, job_id, paths)
    assert {o.kind for o in outputs} == {"sr", "sc"}
    assert record_outputs(s, job_id, paths)[0].id == outputs[0].id  # idempotent
    assert job_delivered(s, job_id) is False

    summary = deliver_pending(s)
    assert (summary.attempted, summary.delivered) == (2, 2)
    expected = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    assert peer.received() == expected
    assert job_delivered(s, job_id) is True
    with session_scope(s.database_url) as session:
        audit = session.exec(select(AuditLog).where(AuditLog.action == "delivery.delivered")).all()
    assert len(audit) == 1 and audit[0].detail is not None
    assert len(audit[0].detail["delivery_ids"]) == 2
    assert deliver_pending(s).attempted == 0  # nothing is sent twice
    rows = list_deliveries(s)
    assert {r.state for r in rows} == {"delivered"} and all(r.attempts == 1 for r in rows)

    # an identical re-screen records the same outputs: no new delivery, nothing resent
    again = record_outputs(s, job_id, paths)
    assert [o.id for o in again] == [o.id for o in outputs]
    assert deliver_pending(s).attempted == 0
    # the recorded SR is the predecessor of the next screening of that study
    preds = previous_outputs_for_study(s, result.study_instance_uid)
    assert [p.sop_instance_uid for p in preds] == [expected_sr(paths)]
    assert preds[0].series_instance_uid == str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert previous_outputs_for_study(s, result.study_instance_uid, exclude_job_id=job_id) == []


def test_an_output_named_twice_is_recorded_and_queued_once(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    outputs = record_outputs(s, job_id, [paths[0], paths[0], *paths])
    assert len({o.id for o in outputs}) == len(paths)
    assert len(list_deliveries(s)) == len(paths)  # one per output and destination


def expected_sr(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0]).SOPInstanceUID)


def test_retries_with_backoff_then_dead_letter_then_retry(
    tmp_path: Path, settings: Settings
) -> None:
    scp = StoreScp(tmp_path / "late")  # not started: its port refuses connections
    s = _with_destinations(
        settings,
        scp.destination(),
        max_attempts=3,
        backoff_seconds=10.0,
        backoff_max_seconds=100.0,
    )
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths[:1])  # the SR only

    t0 = utcnow()
    first = deliver_pending(s, now=t0)
    assert (first.attempted, first.retrying) == (1, 1)
    [row] = list_deliveries(s)
    assert row.state == "retrying" and row.attempts == 1 and row.last_error
    assert row.next_attempt_at is not None
    assert abs((row.next_attempt_at - t0).total_seconds() - 10.0) < 1e-3
    assert deliver_pending(s, now=t0 + timedelta(seconds=9)).attempted == 0  # not due yet
    second = deliver_pending(s, now=t0 + timedelta(seconds=10))
    assert second.retrying == 1
    [row] = list_deliveries(s)
    assert row.attempts == 2
    assert row.next_attempt_at is not None
    assert abs((row.next_attempt_at - (t0 + timedelta(seconds=30))).total_seconds()) < 1e-3
    third = deliver_pending(s, now=t0 + timedelta(seconds=30))
    assert third.dead == 1
    [row] = list_deliveries(s, states=["dead"])
    assert row.attempts == 3
    assert deliver_pending(s, now=t0 + timedelta(days=1)).attempted == 0  # dead stays dead
    with session_scope(s.database_url) as session:
        actions = session.exec(select(AuditLog.action)).all()
    assert "delivery.dead" in actions

    scp.start()
    try:
        assert retry_dead(s) == 1
        summary = deliver_pending(s, now=t0 + timedelta(days=1))
        assert summary.delivered == 1
        assert scp.received() == [expected_sr(paths)]
    finally:
        scp.stop()


def test_failing_destination_never_blocks_another(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    down = Destination(ae_title="DOWN", host="127.0.0.1", port=free_port())
    s = _with_destinations(settings, down, peer.destination())
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths)
    summary = deliver_pending(s)
    assert summary.delivered == len(paths) and summary.retrying == len(paths)
    assert down.name in summary.errors
    assert len(peer.received()) == len(paths)
    states = {(r.destination, r.state) for r in list_deliveries(s)}
    assert states == {(down.name, "retrying"), (peer.destination().name, "delivered")}
    assert job_delivered(s, job_id) is False


def test_stale_sending_rows_are_reclaimed(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths[:1])
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(s.database_url) as session:  # a sender that crashed mid-send
        row = session.exec(select(Delivery)).one()
        row.state = DeliveryState.SENDING.value
        row.updated_at = long_ago
        session.add(row)
    assert deliver_pending(s).delivered == 1


def test_retry_by_id_and_rescreen_predecessor(tmp_path: Path, settings: Settings) -> None:
    down = Destination(ae_title="DOWN", host="127.0.0.1", port=free_port())
    s = _with_destinations(settings, down, max_attempts=1)
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths)
    assert deliver_pending(s).dead == len(paths)
    ids = [r.id for r in list_deliveries(s, states=["dead"])]
    assert retry_dead(s, ids[:1]) == 1
    assert [r.state for r in list_deliveries(s)].count("pending") == 1

    # a re-screen with a new threshold: new SR that names the recorded one as predecessor
    with session_scope(s.database_url) as session:
        study_id = session.exec(select(ScreeningJob.study_id)).first()
        job2 = ScreeningJob(study_id=study_id or 0)
        session.add(job2)
        session.flush()
        job2_id = int(job2.id or 0)
    result.outputs.clear()
    result.threshold = ThresholdInfo(value=0.3, version=9)
    preds = previous_outputs_for_study(s, result.study_instance_uid, exclude_job_id=job2_id)
    new_paths = write_study_outputs(result, tmp_path / "outbox2", s, predecessors=preds)
    record_outputs(s, job2_id, new_paths)
    new_sr = pydicom.dcmread(new_paths[0])
    ref = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == expected_sr(paths)
    with session_scope(s.database_url) as session:
        kinds = session.exec(select(OutputObject.kind).where(OutputObject.job_id == job2_id)).all()
    assert sorted(kinds) == ["sc", "sr"]


def test_cli_list_and_retry(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from screener.cli import app
    from screener.settings import get_settings

    down = Destination(ae_title="DOWN", host="127.0.0.1", port=free_port())
    s = _with_destinations(settings, down, max_attempts=1)
    result, paths = _outputs(tmp_path, s)
    record_outputs(s, make_job(s, result.study_instance_uid), paths)
    deliver_pending(s)
    monkeypatch.setenv("SCREENER_DATABASE_URL", s.database_url)
    get_settings.cache_clear()
    runner = CliRunner()

    listed = runner.invoke(app, ["deliveries", "list", "--json", "--state", "dead"])
    assert listed.exit_code == 3, listed.output  # dead letters present
    rows = json.loads(listed.stdout)
    assert len(rows) == len(paths) and {r["state"] for r in rows} == {"dead"}
    assert all("DOWN" in r["destination"] and r["last_error"] for r in rows)
    table = runner.invoke(app, ["deliveries", "list"])
    assert table.exit_code == 3 and "dead" in table.stdout
    assert runner.invoke(app, ["deliveries", "list", "--state", "bogus"]).exit_code == 2

    assert runner.invoke(app, ["deliveries", "retry"]).exit_code == 2
    one = runner.invoke(app, ["deliveries", "retry", str(rows[0]["id"])])
    assert one.exit_code == 0
    retried = runner.invoke(app, ["deliveries", "retry", "--all-dead"])
    assert retried.exit_code == 0
    # this shell's settings name no destination: the admin is told the rows will wait
    assert "deliveries wait for DOWN@" in retried.output
    assert "delivery.destinations does not name here" in retried.output
    pending = json.loads(
        runner.invoke(app, ["deliveries", "list", "--json", "--state", "pending"]).stdout
    )
    assert len(pending) == len(paths) and all(r["attempts"] == 0 for r in pending)
    assert runner.invoke(app, ["deliveries", "retry", "--all-dead"]).exit_code == 1


def test_concurrent_passes_send_each_delivery_once(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    """Two senders at once (two workers): every row is claimed and attempted exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s, views=["PA", "AP", "PA"])
    record_outputs(s, make_job(s, result.study_instance_uid), paths)
    with ThreadPoolExecutor(max_workers=3) as pool:
        summaries = list(pool.map(lambda _: deliver_pending(s), range(3)))
    assert sum(x.attempted for x in summaries) == len(paths) == 4
    rows = list_deliveries(s)
    assert {r.state for r in rows} == {"delivered"} and {r.attempts for r in rows} == {1}
    assert len(peer.received()) == len(paths)


def test_pass_limit_leaves_the_rest_for_the_next_pass(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s)
    record_outputs(s, make_job(s, result.study_instance_uid), paths)
    assert deliver_pending(s, limit=1).delivered == 1
    assert deliver_pending(s, limit=1).delivered == 1
    assert deliver_pending(s, limit=1).attempted == 0


def test_removed_destination_ends_dead_and_others_deliver(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    gone = Destination(ae_title="GONE", host="127.0.0.1", port=free_port())
    s = _with_destinations(settings, gone, peer.destination(), max_attempts=1)
    result, paths = _outputs(tmp_path, s)
    record_outputs(s, make_job(s, result.study_instance_uid), paths[:1])
    later = _with_destinations(settings, peer.destination(), max_attempts=1)  # admin removed it
    summary = deliver_pending(later)
    assert summary.delivered == 1 and summary.dead == 1
    [dead] = list_deliveries(later, states=["dead"])
    assert dead.destination == gone.name and "not configured" in (dead.last_error or "")


def test_a_start_without_the_destination_settings_does_not_kill_the_backlog(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    """A start without the site's destination settings (a forgotten env file) dead-lettered
    every pending delivery at once, and `deliveries retry` re-queued them only to die again.
    They now wait, as for a PACS that is down, until the destination is back or the horizon
    passes."""
    s = _with_destinations(settings, peer.destination())
    result, paths = _outputs(tmp_path, s)
    job = make_job(s, result.study_instance_uid)
    record_outputs(s, job, paths)
    forgotten = _with_destinations(settings)  # no destinations at all
    summary = deliver_pending(forgotten)
    assert summary.dead == 0 and summary.retrying == len(paths)
    rows = list_deliveries(s)
    assert {r.state for r in rows} == {"retrying"}
    assert all("is not configured" in (r.last_error or "") for r in rows)
    with session_scope(s.database_url) as session:
        assert (session.get(ScreeningJob, job) or ScreeningJob()).state != "failed"
    # shown where the admin looks, so the backlog is not forgotten
    from screener.delivery import destination_health

    [waiting] = destination_health(forgotten)
    assert (waiting.name, waiting.state, waiting.pending) == (
        peer.destination().name,
        "unconfigured",
        len(paths),
    )
    assert any("not configured" in line for line in collect_status(forgotten).attention)
    # the env file is back: the next due pass delivers everything
    later = utcnow() + timedelta(hours=1)
    assert deliver_pending(s, now=later).delivered == len(paths)
    assert len(peer.received()) == len(paths)
    # still missing past the give-up horizon: dead-lettered then, as for a PACS down as long
    second, more = _outputs(tmp_path / "second", s)
    record_outputs(s, make_job(s, second.study_instance_uid), more)
    assert deliver_pending(forgotten).dead == 0
    horizon = timedelta(hours=s.delivery.give_up_after_hours)
    past = deliver_pending(forgotten, now=utcnow() + horizon + timedelta(hours=1))
    assert past.dead == len(more)


# --------------------------------------------------------------- horizon, breaker, job states


def _set_job_state(s: Settings, job_id: int, state: str, reason: str | None = None) -> None:
    with session_scope(s.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        job.state, job.reason = state, reason
        session.add(job)


def _job(s: Settings, job_id: int) -> ScreeningJob:
    with session_scope(s.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job


def _attempts(s: Settings) -> int:
    return sum(r.attempts for r in list_deliveries(s))


def test_backoff_jitter_only_shortens_and_keeps_the_cap(settings: Settings) -> None:
    import random

    s = _with_destinations(settings, backoff_seconds=2.0, backoff_max_seconds=10.0)
    s.delivery.backoff_jitter = 0.5
    rng = random.Random(7)
    for attempts, full in ((1, 2.0), (3, 8.0), (9, 10.0)):
        waits = [backoff_delay(attempts, s, rng).total_seconds() for _ in range(200)]
        assert all(full * 0.5 <= w <= full for w in waits)
        assert max(waits) - min(waits) > full * 0.3  # really spread, not lock-step


def test_the_horizon_not_an_attempt_count_makes_a_dead_letter(
    tmp_path: Path, settings: Settings
) -> None:
    """A PACS down for longer than the old 5-attempt span: still retrying until the horizon."""
    from screener.delivery import destination_health

    down = Destination(ae_title="DOWN", host="127.0.0.1", port=free_port())
    s = _with_destinations(
        settings, down, backoff_seconds=10.0, backoff_max_seconds=600.0, give_up_after_hours=1.0
    )
    result, paths = _outputs(tmp_path, s)
    record_outputs(s, make_job(s, result.study_instance_uid), paths[:1])
    t0 = utcnow()
    minute = 0
    while minute < 59:
        deliver_pending(s, now=t0 + timedelta(minutes=minute))
        minute += 10
    [row] = list_deliveries(s)
    assert row.state == "retrying" and row.attempts > 5  # the old cap would have killed it
    [health] = destination_health(s)
    assert health.state == "down" and health.pending == 1 and health.dead == 0
    assert health.down_since is not None and health.last_error
    deliver_pending(s, now=t0 + timedelta(minutes=61))
    [row] = list_deliveries(s)
    assert row.state == "dead" and "gave up after 1 h" in (row.last_error or "")
    assert destination_health(s)[0].dead == 1


def test_breaker_probes_one_row_while_down_then_the_backlog_flows(
    tmp_path: Path, settings: Settings
) -> None:
    from screener.delivery import destination_health

    scp = StoreScp(tmp_path / "late")  # not started yet: connection refused
    s = _with_destinations(
        settings, scp.destination(), backoff_seconds=1.0, backoff_max_seconds=8.0
    )
    result, paths = _outputs(tmp_path, s, views=["PA", "AP", "PA"])
    record_outputs(s, make_job(s, result.study_instance_uid), paths)
    rows = len(paths)
    t0 = utcnow()
    # closed breaker: every due row rides each failed association (3 of them)
    for step in (0, 1, 3):
        assert deliver_pending(s, now=t0 + timedelta(seconds=step)).attempted == rows
    assert destination_health(s)[0].state == "down"
    assert _attempts(s) == 3 * rows
    # open breaker: the rows are left alone; one probe row when the probe is due
    probes = 0
    for step in range(4, 60):
        summary = deliver_pending(s, now=t0 + timedelta(seconds=step))
        assert summary.attempted in (0, 1) and summary.delivered == 0
        probes += summary.probes
    assert 3 <= probes <= 15  # growing probe interval (1, 2, 4, 8, 8 ... s), not 56 x rows
    assert _attempts(s) == 3 * rows + probes
    health = destination_health(s)[0]
    assert health.consecutive_failures == 3 + probes and health.pending == rows
    # two processes at once never probe twice
    scp.start()
    try:
        later = t0 + timedelta(seconds=120)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            both = list(pool.map(lambda _: deliver_pending(s, now=later), range(2)))
        assert sum(x.probes for x in both) == 1
        assert sum(x.delivered for x in both) == rows  # probe closed it; backlog in the pass
        assert len(scp.received()) == rows
        health = destination_health(s)[0]
        assert (health.state, health.consecutive_failures, health.pending) == ("up", 0, 0)
    finally:
        scp.stop()


def test_job_states_follow_their_deliveries(
    tmp_path: Path, settings: Settings, peer: StoreScp
) -> None:
    from screener.delivery import settle_jobs
    from workers.stages import run_deliver

    late = StoreScp(tmp_path / "late")  # down at first
    s = _with_destinations(settings, late.destination(), peer.destination(), max_attempts=1)
    result, paths = _outputs(tmp_path, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths)
    _set_job_state(s, job_id, "reported")

    outcome = run_deliver(s, job_id)  # the peer stores; LATE gives up at once (cap 1)
    assert outcome.state == "failed" and late.aet in (outcome.reason or "")
    job = _job(s, job_id)
    assert job.state == "failed" and job.reason == outcome.reason  # the reason is kept
    assert settle_jobs(s).anything is False  # a dead letter remains: still failed

    late.start()
    try:
        assert retry_dead(s) == len(paths)
        assert deliver_pending(s).delivered == len(paths)
        assert settle_jobs(s).delivered == [job_id]
        job = _job(s, job_id)
        assert job.state == "delivered" and job.reason is None  # redelivered: delivered
        assert len(late.received()) == len(paths)
    finally:
        late.stop()

    # a reported job whose outputs another pass delivered is settled by the sweep
    result2, paths2 = _outputs(tmp_path / "two", s)
    job2 = make_job(s, result2.study_instance_uid)
    s_peer = _with_destinations(settings, peer.destination())
    record_outputs(s_peer, job2, paths2)
    _set_job_state(s, job2, "reported")
    assert deliver_pending(s_peer).delivered == len(paths2)
    assert settle_jobs(s_peer).delivered == [job2]
    assert run_deliver(s_peer, job2).state == "skipped"  # a late deliver task does nothing

    # no destination configured: completed, not delivered
    s_none = _with_destinations(settings)
    result3, paths3 = _outputs(tmp_path / "three", s_none)
    job3 = make_job(s_none, result3.study_instance_uid)
    record_outputs(s_none, job3, paths3)
    _set_job_state(s_none, job3, "reported")
    assert run_deliver(s_none, job3).state == "completed"
    assert _job(s_none, job3).state == "completed"


def test_a_rescreen_renews_known_outputs_and_queues_only_what_is_missing(
    tmp_path: Path, settings: Settings
) -> None:
    a = Destination(ae_title="PACSA", host="127.0.0.1", port=free_port())
    b = Destination(ae_title="PACSB", host="127.0.0.1", port=free_port())
    s = _with_destinations(settings, a, b)
    result, paths = _outputs(tmp_path, s)
    job1 = make_job(s, result.study_instance_uid)
    first = record_outputs(s, job1, paths)
    sr, sc = first
    with session_scope(s.database_url) as session:  # retention removed the SC's file
        session.execute(
            update(OutputObject).where(col(OutputObject.id) == sc.id).values(pruned_at=utcnow())
        )
        study_id = session.exec(select(ScreeningJob.study_id)).one()
        job2_row = ScreeningJob(study_id=study_id)
        session.add(job2_row)
        session.flush()
        job2 = int(job2_row.id or 0)

    # an identical re-screen writes the same objects again elsewhere; one new object beside
    (tmp_path / "copy").mkdir()
    copies = [Path(shutil.copy(p, tmp_path / "copy" / p.name)) for p in paths]
    other, other_paths = _outputs(tmp_path / "other", s)
    named = [copies[1], other_paths[1], copies[0], copies[1]]  # the SC twice
    again = record_outputs(s, job2, named)

    new = again[1]
    assert [o.id for o in again] == [sc.id, new.id, sr.id, sc.id]
    assert new.id not in (sr.id, sc.id) and again[0] is again[3]
    assert [o.file_path for o in again] == [str(p) for p in named]
    assert {(o.job_id, o.pruned_at) for o in again} == {(job2, None)}
    header = pydicom.dcmread(other_paths[1], stop_before_pixels=True)
    assert (new.kind, new.sop_instance_uid, new.series_instance_uid, new.study_instance_uid) == (
        "sc",
        str(header.SOPInstanceUID),
        str(header.SeriesInstanceUID),
        other.study_instance_uid,
    )
    with session_scope(s.database_url) as session:
        rows = {o.id: o for o in session.exec(select(OutputObject)).all()}
        queued = session.exec(select(Delivery.output_id, Delivery.destination)).all()
        audit = session.exec(
            select(AuditLog).where(AuditLog.action == "outputs.recorded").order_by(col(AuditLog.id))
        ).all()
    assert len(rows) == 3
    for output in again:  # what is returned is what is stored
        stored = rows[output.id]
        assert stored.model_dump(exclude={"created_at"}) == output.model_dump(
            exclude={"created_at"}
        )
        assert aware(stored.created_at) == aware(output.created_at)
    assert aware(rows[sr.id].created_at) == aware(sr.created_at)  # the known row is kept
    assert sorted(queued) == sorted((i, d.name) for i in rows for d in (a, b))
    assert [(r.job_id, r.study_instance_uid, r.detail) for r in audit] == [
        (job1, result.study_instance_uid, {"outputs": 2, "destinations": [a.name, b.name]}),
        (job2, result.study_instance_uid, {"outputs": 4, "destinations": [a.name, b.name]}),
    ]
