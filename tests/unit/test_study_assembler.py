"""Study assembly rules on SQLite and PostgreSQL: quiet period, single-image rule, reopen."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlmodel import col, select

from screener.db.models import JobState, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.ingest import record_instance
from screener.settings import Settings
from screener.study_assembler import assemble_due_studies
from tests.unit.test_ingest import STUDY, header, received


def jobs(settings: Settings) -> list[ScreeningJob]:
    with session_scope(settings.database_url) as s:
        return list(s.exec(select(ScreeningJob).order_by(col(ScreeningJob.id))).all())


def test_study_completes_only_after_quiet_period(settings: Settings) -> None:
    settings.study_quiet_seconds = 30
    t0 = utcnow()
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"), now=t0)
    assert assemble_due_studies(settings, now=t0 + timedelta(seconds=29)) == []
    record_instance(
        settings.database_url, header(f"{STUDY}.1.2"), received("b"), now=t0 + timedelta(seconds=20)
    )
    # the second instance restarted the quiet period
    assert assemble_due_studies(settings, now=t0 + timedelta(seconds=31)) == []
    created = assemble_due_studies(settings, now=t0 + timedelta(seconds=51))
    assert len(created) == 1
    [job] = jobs(settings)
    assert job.id == created[0] and job.state == JobState.QUEUED.value
    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study)).one()
        assert study.is_complete and study.completed_at is not None
    # nothing more to do: completion happens once
    assert assemble_due_studies(settings, now=t0 + timedelta(seconds=100)) == []


def test_single_image_rule_completes_at_once(settings: Settings) -> None:
    result = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"), ["CR"])
    assert result.job_id is not None
    [job] = jobs(settings)
    assert job.state == JobState.QUEUED.value
    other = header(f"{STUDY}.1.1", modality="DX")
    # a DX instance under a CR-only rule waits for the quiet period
    res2 = record_instance(settings.database_url, replace_sop(other, "2.1"), received("b"), ["CR"])
    assert res2.job_id is None


def replace_sop(h, suffix: str):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(
        h,
        sop_instance_uid=f"{STUDY}.{suffix}",
        series_instance_uid=f"{STUDY}.{suffix.split('.')[0]}",
    )


def test_late_instance_reopens_and_supersedes(settings: Settings) -> None:
    settings.study_quiet_seconds = 10
    t0 = utcnow()
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"), now=t0)
    [first] = assemble_due_studies(settings, now=t0 + timedelta(seconds=11))
    record_instance(
        settings.database_url,
        header(f"{STUDY}.2.1", series=f"{STUDY}.2"),
        received("b"),
        now=t0 + timedelta(seconds=60),
    )
    with session_scope(settings.database_url) as s:
        assert not s.exec(select(Study)).one().is_complete  # reopened
    [second] = assemble_due_studies(settings, now=t0 + timedelta(seconds=71))
    old, new = jobs(settings)
    assert (old.id, new.id) == (first, second)
    assert old.state == JobState.SUPERSEDED.value and old.reason and str(second) in old.reason
    assert new.state == JobState.QUEUED.value and new.supersedes_job_id == first


def test_delivered_job_is_kept_when_study_changes(settings: Settings) -> None:
    settings.study_quiet_seconds = 0
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    [first] = assemble_due_studies(settings)
    with session_scope(settings.database_url) as s:
        job = s.get(ScreeningJob, first)
        assert job is not None
        job.state = JobState.DELIVERED.value
        s.add(job)
    record_instance(settings.database_url, header(f"{STUDY}.1.2"), received("b"))
    [second] = assemble_due_studies(settings)
    old, new = jobs(settings)
    assert old.state == JobState.DELIVERED.value  # what was delivered stays on record
    assert new.supersedes_job_id == first and new.id == second


def test_concurrent_assemblers_create_one_job(settings: Settings) -> None:
    settings.study_quiet_seconds = 0
    for i in range(3):
        record_instance(
            settings.database_url,
            header(f"{STUDY}.{i}.1", series=f"{STUDY}.{i}", study_instance_uid=f"{STUDY}{i}"),
            received(str(i)),
        )
    created: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        ids = assemble_due_studies(settings)
        with lock:
            created.extend(ids)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 3 and len(set(created)) == 3
    assert len(jobs(settings)) == 3
