"""The screening job state machine, as compare-and-set updates on ``screening_jobs``.

Each worker stage moves a job from its entry state to its running state (``claim``), does
its work, and moves it on (``finish``); the states come from :mod:`workers.stage_graph`.
Every move is a conditional UPDATE, so a duplicate message, a superseded job or a job the
reconciler has taken back is simply skipped: that is what makes every task idempotent.
Stage results live in spool files keyed by the job id (prepared inputs) and in rows keyed
by the job id (infer's results, image rows), written before ``finish`` or in its
transaction. The ``*_all`` variants move many jobs in one
statement (the batching infer consumer). The statements are SQLAlchemy Core on the tables
(no ORM objects): they run once per job or batch on every worker's hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, bindparam, literal_column, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnClause

from screener.db.models import (
    TERMINAL_STATES,
    AuditLog,
    JobState,
    ScreeningJob,
    StageTiming,
    Study,
    table_of,
    utcnow,
)
from screener.db.session import get_engine, session_scope
from screener.settings import Settings
from workers.stage_graph import GRAPH, previous_stage

log = logging.getLogger(__name__)

JOBS = table_of(ScreeningJob)
STUDIES = table_of(Study)
Executor = Session | Connection  # an ORM session or a Core connection, in a transaction


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
    with get_engine(settings.database_url).begin() as conn:
        return _views(conn, job_ids)


# The hot statements are built once, with the job ids as an expanding parameter: building
# an UPDATE or SELECT and its cache key cost more CPU than running it on SQLite.
_VIEW_STATEMENT = (
    select(
        JOBS.c.id,
        JOBS.c.study_id,
        STUDIES.c.study_instance_uid,
        JOBS.c.state,
        JOBS.c.trigger,
        JOBS.c.threshold_version,
        JOBS.c.supersedes_job_id,
    )
    .join_from(JOBS, STUDIES, STUDIES.c.id == JOBS.c.study_id)
    .where(JOBS.c.id.in_(bindparam("ids", expanding=True)))
)


def _views(executor: Executor, job_ids: list[int]) -> list[JobView]:
    rows = executor.execute(_VIEW_STATEMENT, {"ids": job_ids})
    views = {row[0]: JobView(*row) for row in rows}
    return [views[i] for i in job_ids if i in views]


@cache
def _move_statement(from_states: frozenset[str], to_state: str, fields: tuple[str, ...]) -> Any:
    """UPDATE ... RETURNING id for one kind of move; parameters ``ids``, ``now`` and
    ``set_<field>`` for each extra field."""
    extra = {name: bindparam(f"set_{name}", type_=JOBS.c[name].type) for name in fields}
    return (
        update(JOBS)
        .where(
            JOBS.c.id.in_(bindparam("ids", expanding=True)),
            JOBS.c.state.in_(sorted(from_states)),
        )
        .values(state=to_state, updated_at=bindparam("now", type_=JOBS.c.updated_at.type), **extra)
        .returning(JOBS.c.id)
    )


def _move_all(
    executor: Executor,
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
    statement = _move_statement(
        frozenset(s.value for s in from_states), to_state.value, tuple(sorted(fields))
    )
    params = {"ids": ids, "now": now or utcnow()}
    params.update((f"set_{name}", value) for name, value in fields.items())
    result = executor.execute(statement, params)
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
    with get_engine(settings.database_url).begin() as conn:
        return _claim(conn, job_ids, stage)


def claim_views(settings: Settings, job_ids: list[int], stage: str) -> list[JobView]:
    """``claim_all`` and ``load_jobs`` of the claimed jobs as one statement (UPDATE ...
    RETURNING the view, the study's UID from a scalar subquery): the jobs this process now
    owns, in the order given, each once."""
    if not job_ids:
        return []
    with get_engine(settings.database_url).begin() as conn:
        rows = conn.execute(_claim_view_statement(stage), {"ids": job_ids, "now": utcnow()})
        views = {row[0]: JobView(*row) for row in rows}
    return [views.pop(i) for i in job_ids if i in views]


@cache
def _claim_view_statement(stage: str) -> Any:
    spec = GRAPH[stage]
    # spelled out: SQLite's RETURNING renders columns unqualified, even in a subquery
    job_study: ColumnClause[Any] = literal_column(f"{JOBS.name}.study_id")
    uid = select(STUDIES.c.study_instance_uid).where(STUDIES.c.id == job_study).scalar_subquery()
    return (
        update(JOBS)
        .where(JOBS.c.id.in_(bindparam("ids", expanding=True)), JOBS.c.state == spec.entry.value)
        .values(state=spec.running.value, updated_at=bindparam("now", type_=JOBS.c.updated_at.type))
        .returning(
            JOBS.c.id,
            JOBS.c.study_id,
            uid,
            JOBS.c.state,
            JOBS.c.trigger,
            JOBS.c.threshold_version,
            JOBS.c.supersedes_job_id,
        )
    )


def _claim(executor: Executor, job_ids: list[int], stage: str) -> list[int]:
    spec = GRAPH[stage]
    return _move_all(executor, job_ids, {spec.entry}, spec.running)


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
    settings: Settings,
    job_id: int,
    stage: str,
    started: float,
    *,
    also: Callable[[Session], object] | None = None,
    **fields: Any,
) -> bool:
    """``finish`` and the stage's duration row (``started``: ``time.monotonic()`` when the
    stage began) in one transaction; ``also``: more work that must commit with the move
    (run only when the job moved)."""
    with session_scope(settings.database_url) as session:
        moved = bool(finish_all(session, [job_id], stage, **fields))
        if moved:
            session.add(StageTiming(job_id=job_id, stage=stage, seconds=time.monotonic() - started))
            if also is not None:
                also(session)
    return moved


def finish_all(
    session: Executor,
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
