"""Study assembly: decide when a study is complete and hand it to the workers as a job.

DICOM has no "study finished" message, so a study is complete when no instance of it has
arrived for ``study_quiet_seconds`` (what mercure and Orthanc do), or at once when the
completion rule says so (``listener.single_image_complete_modalities``, e.g. a CR study is
one image). Completion creates a :class:`ScreeningJob` in state ``queued``: the hand-off to
the workers, who poll the database for queued jobs. A study that receives a new instance
after completion is reopened by ingest; its next completion creates a new job and marks
the previous unfinished job ``superseded``.

Completion is a conditional UPDATE (``is_complete = false AND last_received_at <= cutoff``),
so several assemblers (the listener's thread, the workers' reconciler) may run at once and a
study is completed, and a job created, exactly once per quiet period.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from screener.db.models import (
    TERMINAL_STATES,
    AuditLog,
    JobState,
    ScreeningJob,
    Study,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings
from screener.timeutil import aware

log = logging.getLogger(__name__)


def complete_study(
    session: Session,
    study_id: int,
    now: datetime,
    cutoff: datetime | None = None,
    reason: str = "quiet period",
) -> int | None:
    """Mark a study complete and queue a screening job; return the new job id.

    Returns None when another assembler got there first, when an instance arrived after
    ``cutoff``, or when the study holds only the screener's own output (never screened).
    """
    stmt = update(Study).where(col(Study.id) == study_id, col(Study.is_complete).is_(False))
    if cutoff is not None:
        stmt = stmt.where(col(Study.last_received_at) <= cutoff)
    result = session.execute(stmt.values(is_complete=True, completed_at=now))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    study = session.get(Study, study_id)
    assert study is not None
    session.refresh(study)
    if study.own_output_only:
        session.add(
            AuditLog(
                actor="assembler",
                action="study.complete_own_output",
                study_instance_uid=study.study_instance_uid,
                detail={"reason": "only the screener's own output; not screened"},
            )
        )
        log.info("study %s complete: own output only, not screened", study.study_instance_uid)
        return None
    previous = session.exec(
        select(ScreeningJob)
        .where(ScreeningJob.study_id == study_id)
        .order_by(col(ScreeningJob.id).desc())
    ).all()
    job = ScreeningJob(
        study_id=study_id,
        state=JobState.QUEUED.value,
        created_at=now,
        updated_at=now,
        supersedes_job_id=previous[0].id if previous else None,
        trigger="ingest",
    )
    session.add(job)
    session.flush()
    for old in previous:
        if old.state not in TERMINAL_STATES:
            old.state = JobState.SUPERSEDED.value
            old.reason = f"superseded by job {job.id}: study changed after completion"
            old.updated_at = now
            session.add(old)
    session.add(
        AuditLog(
            actor="assembler",
            action="job.queued",
            study_instance_uid=study.study_instance_uid,
            job_id=job.id,
            detail={
                "reason": reason,
                "instances": study.instance_count,
                "supersedes": job.supersedes_job_id,
            },
        )
    )
    log.info(
        "study %s complete (%s, %d instances): job %s queued%s",
        study.study_instance_uid,
        reason,
        study.instance_count,
        job.id,
        f", supersedes job {job.supersedes_job_id}" if job.supersedes_job_id else "",
    )
    assert job.id is not None
    return job.id


def due_study_ids(session: Session, cutoff: datetime) -> list[int]:
    """Incomplete studies whose last instance arrived at or before ``cutoff``."""
    rows = session.exec(
        select(Study.id).where(
            col(Study.is_complete).is_(False), col(Study.last_received_at) <= cutoff
        )
    ).all()
    return [int(r) for r in rows if r is not None]


def assemble_due_studies(settings: Settings, now: datetime | None = None) -> list[int]:
    """Complete every study that has been quiet for ``study_quiet_seconds``.

    Safe to call concurrently from several processes; returns the ids of jobs created.
    """
    now = aware(now or utcnow())
    cutoff = now - timedelta(seconds=settings.study_quiet_seconds)
    with session_scope(settings.database_url) as session:
        candidates = due_study_ids(session, cutoff)
    created: list[int] = []
    for study_id in candidates:
        with session_scope(settings.database_url) as session:
            job_id = complete_study(session, study_id, now, cutoff=cutoff)
        if job_id is not None:
            created.append(job_id)
    return created
