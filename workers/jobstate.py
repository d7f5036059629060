"""The screening job state machine, as compare-and-set updates on ``screening_jobs``.

Each worker stage moves a job from its entry state to a running state (``claim``), does
its work, and moves it on (``finish``). Both moves are conditional UPDATEs, so a duplicate
message, a superseded job or a job the reconciler has taken back is simply skipped: that
is what makes every task idempotent. Stage results live in files keyed by the job id and
in rows keyed by (job id, SOP instance UID), written before ``finish``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from screener.db.models import TERMINAL_STATES, AuditLog, JobState, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.settings import Settings

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("prepare", "infer", "report", "deliver")
ENTRY_STATE: dict[str, JobState] = {
    "prepare": JobState.QUEUED,
    "infer": JobState.PREPARED,
    "report": JobState.INFERRED,
    "deliver": JobState.REPORTED,
}
RUNNING_STATE: dict[str, JobState] = {
    "prepare": JobState.PREPARING,
    "infer": JobState.INFERRING,
    "report": JobState.REPORTING,
    "deliver": JobState.DELIVERING,
}
DONE_STATE: dict[str, JobState] = {
    "prepare": JobState.PREPARED,
    "infer": JobState.INFERRED,
    "report": JobState.REPORTED,
    "deliver": JobState.DELIVERED,
}
STAGE_OF_STATE: dict[str, str] = {
    **{state.value: stage for stage, state in ENTRY_STATE.items()},
    **{state.value: stage for stage, state in RUNNING_STATE.items()},
}


@dataclass(frozen=True)
class JobView:
    """What a stage needs to know about its job (detached from any session)."""

    id: int
    study_id: int
    study_instance_uid: str
    state: str
    trigger: str
    threshold_version: int | None
    supersedes_job_id: int | None


def load_job(settings: Settings, job_id: int) -> JobView | None:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        if job is None:
            return None
        study = session.get(Study, job.study_id)
        assert job.id is not None and study is not None
        return JobView(
            id=job.id,
            study_id=job.study_id,
            study_instance_uid=study.study_instance_uid,
            state=job.state,
            trigger=job.trigger,
            threshold_version=job.threshold_version,
            supersedes_job_id=job.supersedes_job_id,
        )


def _move(
    settings: Settings,
    job_id: int,
    from_states: set[JobState],
    to_state: JobState,
    now: datetime | None = None,
    **fields: Any,
) -> bool:
    with session_scope(settings.database_url) as session:
        result = session.execute(
            update(ScreeningJob)
            .where(
                col(ScreeningJob.id) == job_id,
                col(ScreeningJob.state).in_([s.value for s in from_states]),
            )
            .values(state=to_state.value, updated_at=now or utcnow(), **fields)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def claim(settings: Settings, job_id: int, stage: str) -> bool:
    """Entry state -> running state; False: someone else has it, or it is finished."""
    return _move(settings, job_id, {ENTRY_STATE[stage]}, RUNNING_STATE[stage])


def claim_many(settings: Settings, job_ids: list[int], stage: str) -> list[int]:
    """The subset of ``job_ids`` this process now owns for ``stage``."""
    return [job_id for job_id in job_ids if claim(settings, job_id, stage)]


def finish(
    settings: Settings,
    job_id: int,
    stage: str,
    *,
    to_state: JobState | None = None,
    **fields: Any,
) -> bool:
    """Running state -> done state (or ``to_state``, e.g. completed without destinations);
    False when the reconciler or a newer job took it over."""
    target = to_state or DONE_STATE[stage]
    return _move(settings, job_id, {RUNNING_STATE[stage]}, target, **fields)


def release(settings: Settings, job_id: int, stage: str) -> bool:
    """Running state -> entry state, so a retry (or the reconciler) can claim it again."""
    return _move(settings, job_id, {RUNNING_STATE[stage]}, ENTRY_STATE[stage])


def send_back(settings: Settings, job_id: int, stage: str, *, to_stage: str) -> bool:
    """Running state of ``stage`` -> entry state of an earlier stage (lost intermediate files)."""
    return _move(settings, job_id, {RUNNING_STATE[stage]}, ENTRY_STATE[to_stage])


def fail(settings: Settings, job_id: int, reason: str, actor: str) -> bool:
    """Mark a job failed for good (unless it is already terminal), with an audit row."""
    live = {s for s in JobState if s not in TERMINAL_STATES}
    moved = _move(settings, job_id, live, JobState.FAILED, reason=reason[:2000])
    if moved:
        audit(settings, "job.failed", job_id=job_id, actor=actor, detail={"reason": reason})
        log.warning("job %s failed: %s", job_id, reason)
    return moved


def audit(
    settings: Settings,
    action: str,
    *,
    actor: str,
    job_id: int | None = None,
    study_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    with session_scope(settings.database_url) as session:
        session.add(
            AuditLog(
                actor=actor[:64],
                action=action,
                job_id=job_id,
                study_instance_uid=study_instance_uid,
                detail=detail,
            )
        )


def job_states(settings: Settings, job_ids: list[int]) -> dict[int, str]:
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(ScreeningJob.id, ScreeningJob.state).where(col(ScreeningJob.id).in_(job_ids))
        ).all()
        return {int(i): str(s) for i, s in rows if i is not None}
