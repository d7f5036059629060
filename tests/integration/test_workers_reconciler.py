"""The reconciler on SQLite and PostgreSQL, sending through a real Redis broker."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update
from sqlmodel import col, select

from screener.db.models import JobState, ScreeningJob, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import fresh_redis, make_job, redis_url
from workers.celery_app import create_app
from workers.dispatch import dispatch
from workers.reconciler import UNDISPATCHED_GRACE_S, reconcile_once


def _age(settings: Settings, job_id: int, seconds: float, **fields: object) -> None:
    past = utcnow() - timedelta(seconds=seconds)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ScreeningJob)
            .where(col(ScreeningJob.id) == job_id)
            .values(updated_at=past, dispatched_at=past, **fields)
        )


def _job(settings: Settings, job_id: int) -> ScreeningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job


def _queued_job_ids(client: redis.Redis, queue: str) -> list[int]:
    """Job ids of the Celery messages waiting in a Redis list, oldest first."""
    ids = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes, consumers BRPOP
        envelope = json.loads(raw)
        ids.append(int(json.loads(base64.b64decode(envelope["body"]))[0][0]))
    return ids


@pytest.fixture
def broker(settings: Settings):  # type: ignore[no-untyped-def]
    client = fresh_redis("reconciler")
    app = create_app(settings.model_copy(update={"broker_url": redis_url("reconciler")}))
    sent: list[tuple[str, int]] = []

    def send(stage: str, job_id: int) -> None:
        dispatch(app, settings, stage, job_id)
        sent.append((stage, job_id))

    yield client, send, sent
    client.flushdb()


def test_fresh_jobs_belong_to_the_dispatcher_undispatched_ones_are_recovered(
    settings: Settings, broker
) -> None:  # type: ignore[no-untyped-def]
    """A queued job just created is its creator's to dispatch: the reconciler leaves it
    alone. One that nobody sent within the grace period is recovered, once."""
    client, send, sent = broker
    created = utcnow()  # the pass runs "at" creation time: a 2 s stall must not age the jobs
    a = make_job(settings.database_url, "1.2.3.1")
    b = make_job(settings.database_url, "1.2.3.2")
    done = make_job(settings.database_url, "1.2.3.3", JobState.DELIVERED)
    assert not reconcile_once(settings, send, assemble=False, now=created).anything
    assert sent == []
    past = utcnow() - timedelta(seconds=UNDISPATCHED_GRACE_S + 1)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ScreeningJob).where(col(ScreeningJob.id).in_([a, b])).values(updated_at=past)
        )
    report = reconcile_once(settings, send, assemble=False)
    assert report.dispatched == [a, b]
    assert sent == [("prepare", a), ("prepare", b)]
    assert sorted(_queued_job_ids(client, "prepare")) == [a, b]
    assert _job(settings, a).dispatched_at is not None
    # A second pass right away sends nothing: the messages are in the broker.
    again = reconcile_once(settings, send, assemble=False)
    assert not again.anything
    assert _job(settings, done).state == JobState.DELIVERED.value


def test_lost_messages_are_resent_without_counting_attempts(settings: Settings, broker) -> None:  # type: ignore[no-untyped-def]
    client, send, sent = broker
    stale = settings.reconciler.stale_seconds
    prepared = make_job(settings.database_url, "1.2.4.1", JobState.PREPARED)
    inferred = make_job(settings.database_url, "1.2.4.2", JobState.INFERRED)
    recent = make_job(settings.database_url, "1.2.4.3", JobState.PREPARED)
    _age(settings, prepared, stale + 5)
    _age(settings, inferred, stale + 5)
    _age(settings, recent, stale - 60)
    report = reconcile_once(settings, send, assemble=False)
    assert sorted(report.resent) == sorted([(prepared, "infer"), (inferred, "report")])
    assert _queued_job_ids(client, "infer") == [prepared]
    assert _queued_job_ids(client, "report") == [inferred]
    assert _job(settings, prepared).attempts == 0
    assert _job(settings, prepared).state == JobState.PREPARED.value
    # Re-sent now: not stale again until another stale period passes.
    assert not reconcile_once(settings, send, assemble=False).anything


def test_stuck_running_job_is_handed_back_then_failed_for_good(settings: Settings, broker) -> None:  # type: ignore[no-untyped-def]
    client, send, sent = broker
    stale = settings.reconciler.stale_seconds
    job = make_job(settings.database_url, "1.2.5.1", JobState.INFERRING)
    _age(settings, job, stale + 1)
    report = reconcile_once(settings, send, assemble=False)
    assert report.resent == [(job, "infer")]
    row = _job(settings, job)
    assert (row.state, row.attempts) == (JobState.PREPARED.value, 1)
    assert _queued_job_ids(client, "infer") == [job]

    # A worker claims it and dies again, until the attempts run out.
    max_attempts = settings.reconciler.max_attempts
    _age(settings, job, stale + 1, state=JobState.INFERRING.value, attempts=max_attempts - 1)
    report = reconcile_once(settings, send, assemble=False)
    assert report.failed == [job] and report.resent == []
    row = _job(settings, job)
    assert row.state == JobState.FAILED.value
    assert row.reason is not None and "no progress in state 'inferring'" in row.reason
    assert f"{max_attempts} attempts" in row.reason


def test_assembler_output_is_dispatched_in_the_same_pass(settings: Settings, broker) -> None:  # type: ignore[no-untyped-def]
    from screener.db.models import Study

    client, send, sent = broker
    past = utcnow() - timedelta(seconds=settings.study_quiet_seconds + 5)
    with session_scope(settings.database_url) as session:
        session.add(
            Study(
                study_instance_uid="1.2.6.1",
                first_received_at=past,
                last_received_at=past,
                instance_count=1,
            )
        )
    report = reconcile_once(settings, send)
    assert len(report.assembled) == 1
    assert report.dispatched == report.assembled
    assert _queued_job_ids(client, "prepare") == report.assembled


def test_reported_jobs_waiting_for_the_pacs_belong_to_the_delivery_sweep(
    settings: Settings, broker
) -> None:  # type: ignore[no-untyped-def]
    """No deliver message every stale period for a job whose PACS is down: the sweep retries."""
    from screener.db.models import Delivery, DeliveryState, OutputObject

    client, send, sent = broker
    stale = settings.reconciler.stale_seconds
    waiting = make_job(settings.database_url, "1.2.9.1", JobState.REPORTED)
    lost = make_job(settings.database_url, "1.2.9.2", JobState.REPORTED)  # no delivery rows
    with session_scope(settings.database_url) as session:
        output = OutputObject(
            job_id=waiting,
            study_instance_uid="1.2.9.1",
            sop_instance_uid="1.2.9.1.99",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
            kind="sr",
            file_path="/nonexistent/sr.dcm",
        )
        session.add(output)
        session.flush()
        session.add(
            Delivery(
                output_id=output.id or 0, destination="P@h:1", state=DeliveryState.RETRYING.value
            )
        )
    _age(settings, waiting, stale + 5)
    _age(settings, lost, stale + 5)
    report = reconcile_once(settings, send, assemble=False)
    assert report.resent == [(lost, "deliver")]
    assert _queued_job_ids(client, "deliver") == [lost]


def test_a_worker_committing_during_the_scan_keeps_its_job_on_the_last_attempt(
    settings: Settings,
    broker,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job looked stuck on its last attempt, but its worker was slow, not dead: it
    commits between the scan and the give-up. The give-up is conditional (as the hand-back
    is), so the committed job moves on and no failure is recorded."""
    from screener.db.models import AuditLog
    from workers import jobstate, reconciler

    client, send, sent = broker
    job = make_job(settings.database_url, "1.2.5.9", JobState.INFERRING)
    _age(
        settings,
        job,
        settings.reconciler.stale_seconds + 1,
        attempts=settings.reconciler.max_attempts - 1,
    )
    real_stage_of_state = reconciler.stage_of_state

    def worker_commits_now(state: str) -> str | None:  # after the scan, before the give-up
        with session_scope(settings.database_url) as session:
            assert jobstate.finish_all(session, [job], "infer") == [job]
        return real_stage_of_state(state)

    monkeypatch.setattr(reconciler, "stage_of_state", worker_commits_now)
    report = reconcile_once(settings, send, assemble=False)
    assert report.failed == [] and report.resent == [] and sent == []
    row = _job(settings, job)
    assert row.state == JobState.INFERRED.value and row.reason is None
    with session_scope(settings.database_url) as session:
        actions = [a.action for a in session.exec(select(AuditLog)).all()]
    assert "job.failed" not in actions
