"""The screening job state machine, as compare-and-set updates on ``screening_jobs``.

Each worker stage moves a job from its entry state to its running state (``claim``), does
its work, and moves it on (``finish``); the states come from :mod:`workers.stage_graph`.
Every move is a conditional UPDATE, so a duplicate message, a superseded job or a job the
reconciler has taken back is simply skipped: that is what makes every task idempotent.
Stage results live in files keyed by the job id and in rows keyed by (job id, SOP
instance UID), written before ``finish``. The ``*_all`` variants move many jobs in one
statement (the batching infer consumer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession
from sqlmodel import col, select

from screener.db.models import (
    TERMINAL_STATES,
    AuditLog,
    JobState,
    ScreeningJob,
    StageTiming,
    Study,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings
from workers.stage_graph import GRAPH, previous_stage

log = logging.getLogger(__name__)


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
    views = load_jobs(settings, [job_id])
    return views[0] if views else None


def load_jobs(settings: Settings, job_ids: list[int]) -> list[JobView]:
    """The jobs among ``job_ids`` that exist, in the order given (one query)."""
    if not job_ids:
        return []
    with session_scope(settings.database_url) as session:
        return _views(session, job_ids)


def _views(session: SQLModelSession, job_ids: list[int]) -> list[JobView]:
    rows = session.exec(
        select(ScreeningJob, Study.study_instance_uid)
        .join(Study, col(Study.id) == col(ScreeningJob.study_id))
        .where(col(ScreeningJob.id).in_(job_ids))
    ).all()
    views = {
        int(job.id): JobView(
            id=int(job.id),
            study_id=job.study_id,
            study_instance_uid=uid,
            state=job.state,
            trigger=job.trigger,
            threshold_version=job.threshold_version,
            supersedes_job_id=job.supersedes_job_id,
        )
        for job, uid in rows
        if job.id is not None
    }
    return [views[i] for i in job_ids if i in views]


def _move_all(
    session: Session,
    job_ids: Iterable[int],
    from_states: set[JobState],
    to_state: JobState,
    now: datetime | None = None,
    **fields: Any,
) -> list[int]:
    """Move every job of ``job_ids`` that is in ``from_states``; returns those moved."""
    ids = list(job_ids)
    if not ids:
        return []
    result = session.execute(
        update(ScreeningJob)
        .where(
            col(ScreeningJob.id).in_(ids),
            col(ScreeningJob.state).in_([s.value for s in from_states]),
        )
        .values(state=to_state.value, updated_at=now or utcnow(), **fields)
        .returning(col(ScreeningJob.id))
    )
    return sorted(int(job_id) for (job_id,) in result if job_id is not None)


def _move(
    settings: Settings, job_id: int, from_states: set[JobState], to_state: JobState, **fields: Any
) -> bool:
    with session_scope(settings.database_url) as session:
        return bool(_move_all(session, [job_id], from_states, to_state, **fields))


def claim(settings: Settings, job_id: int, stage: str) -> bool:
    """Entry state -> running state; False: someone else has it, or it is finished."""
    return bool(claim_all(settings, [job_id], stage))


def claim_job(settings: Settings, job_id: int, stage: str) -> JobView | None:
    """``claim`` and ``load_job`` in one transaction: the job, or None when not ours."""
    with session_scope(settings.database_url) as session:
        if not _claim(session, [job_id], stage):
            return None
        views = _views(session, [job_id])
    return views[0] if views else None


def claim_all(settings: Settings, job_ids: list[int], stage: str) -> list[int]:
    """One statement: the jobs of ``job_ids`` this process now owns for ``stage``."""
    with session_scope(settings.database_url) as session:
        return _claim(session, job_ids, stage)


def _claim(session: Session, job_ids: list[int], stage: str) -> list[int]:
    spec = GRAPH[stage]
    return _move_all(session, job_ids, {spec.entry}, spec.running)


def finish(
    settings: Settings,
    job_id: int,
    stage: str,
    *,
    to_state: JobState | None = None,
    **fields: Any,
) -> bool:
    """Running state -> done state (or an early outcome of the stage, e.g. ``completed``
    without destinations); False when the reconciler or a newer job took it over."""
    with session_scope(settings.database_url) as session:
        return bool(finish_all(session, [job_id], stage, to_state=to_state, **fields))


def finish_timed(
    settings: Settings, job_id: int, stage: str, started: float, **fields: Any
) -> bool:
    """``finish`` and the stage's duration row (``started``: ``time.monotonic()`` when the
    stage began) in one transaction."""
    with session_scope(settings.database_url) as session:
        moved = bool(finish_all(session, [job_id], stage, **fields))
        if moved:
            session.add(StageTiming(job_id=job_id, stage=stage, seconds=time.monotonic() - started))
    return moved


def finish_all(
    session: Session,
    job_ids: list[int],
    stage: str,
    *,
    to_state: JobState | None = None,
    **fields: Any,
) -> list[int]:
    """``finish`` for many jobs inside the caller's transaction (so rows written beside it
    commit together with the state); returns the jobs moved."""
    spec = GRAPH[stage]
    target = to_state or spec.done
    if target != spec.done and target not in spec.early_outcomes:
        raise ValueError(f"{stage} cannot end a job in {target}")
    return _move_all(session, job_ids, {spec.running}, target, **fields)


def release(settings: Settings, job_id: int, stage: str) -> bool:
    """Running state -> entry state, so a retry (or the reconciler) can claim it again."""
    spec = GRAPH[stage]
    return _move(settings, job_id, {spec.running}, spec.entry)


def redo_previous(settings: Settings, job_id: int, stage: str) -> str | None:
    """Running state of ``stage`` -> entry state of the stage before it (its inputs are
    lost or unreadable); returns that stage, to be dispatched, or None if not moved."""
    before = previous_stage(stage)
    if before is None:
        raise ValueError(f"{stage} has no previous stage")
    moved = _move(settings, job_id, {GRAPH[stage].running}, GRAPH[before].entry)
    return before if moved else None


def end_early(
    settings: Settings, job_id: int, stage: str, outcome: JobState, **fields: Any
) -> bool:
    """Running state of ``stage`` -> one of its early outcomes (e.g. ``ignored``)."""
    if outcome not in GRAPH[stage].early_outcomes:
        raise ValueError(f"{stage} cannot end a job in {outcome}")
    return _move(settings, job_id, {GRAPH[stage].running}, outcome, **fields)


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
