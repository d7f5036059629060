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

from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from screener.db.models import (
    TERMINAL_STATES,
    AuditLog,
    JobState,
    ScreeningJob,
    Study,
    table_of,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings
from screener.timeutil import aware

log = logging.getLogger(__name__)


_STUDIES = table_of(Study)
_JOBS = table_of(ScreeningJob)
_AUDIT = table_of(AuditLog)
_PREVIOUS_JOBS = (
    sa_select(_JOBS.c.id, _JOBS.c.state)
    .where(_JOBS.c.study_id == bindparam("study"))
    .order_by(_JOBS.c.id.desc())
)
_NEW_JOB = insert(_JOBS).returning(_JOBS.c.id)
_SUPERSEDE = (
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    .values(state=JobState.SUPERSEDED.value, reason=bindparam("why"), updated_at=bindparam("now"))
)


def _audit(
    session: Session, action: str, study_uid: str, job_id: int | None, detail: dict[str, object]
) -> None:
    session.execute(
        insert(_AUDIT),
        {
            "at": utcnow(),
            "actor": "assembler",
            "action": action,
            "study_instance_uid": study_uid,
            "job_id": job_id,
            "detail": detail,
        },
    )


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
    Core statements with RETURNING (SQLite >= 3.35, PostgreSQL): the listener completes a
    single-image study inside the transaction that records its instance, before the
    C-STORE is answered, and ORM objects here cost more than the statements.
    """
    stmt = update(_STUDIES).where(_STUDIES.c.id == study_id, _STUDIES.c.is_complete.is_(False))
    if cutoff is not None:
        stmt = stmt.where(_STUDIES.c.last_received_at <= cutoff)
    study = session.execute(
        stmt.values(is_complete=True, completed_at=now).returning(
            _STUDIES.c.study_instance_uid, _STUDIES.c.own_output_only, _STUDIES.c.instance_count
        )
    ).first()
    if study is None:
        return None
    if study.own_output_only:
        _audit(
            session,
            "study.complete_own_output",
            study.study_instance_uid,
            None,
            {"reason": "only the screener's own output; not screened"},
        )
        log.info("study %s complete: own output only, not screened", study.study_instance_uid)
        return None
    previous = session.execute(_PREVIOUS_JOBS, {"study": study_id}).all()
    supersedes = previous[0].id if previous else None
    job_id: int = session.execute(
        _NEW_JOB,
        {
            "study_id": study_id,
            "state": JobState.QUEUED.value,
            "reason": None,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "dispatched_at": None,
            "model_name": None,
            "model_version": None,
            "threshold_version": None,
            "supersedes_job_id": supersedes,
            "trigger": "ingest",
            "result": None,
        },
    ).scalar_one()
    unfinished = [row.id for row in previous if row.state not in TERMINAL_STATES]
    if unfinished:
        session.execute(
            _SUPERSEDE,
            {
                "ids": unfinished,
                "why": f"superseded by job {job_id}: study changed after completion",
                "now": now,
            },
        )
    _audit(
        session,
        "job.queued",
        study.study_instance_uid,
        job_id,
        {"reason": reason, "instances": study.instance_count, "supersedes": supersedes},
    )
    log.info(
        "study %s complete (%s, %d instances): job %s queued%s",
        study.study_instance_uid,
        reason,
        study.instance_count,
        job_id,
        f", supersedes job {supersedes}" if supersedes else "",
    )
    return job_id


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
