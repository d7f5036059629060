"""The reconciler: the database is the source of truth, the broker only carries work.

Every tick it (1) completes studies whose quiet period is over (ingest's assembler), (2)
dispatches jobs the assembler queued and nobody has sent yet, and (3) every
``reconciler.interval_seconds`` looks for jobs whose state has not advanced for
``reconciler.stale_seconds``: a job waiting in an entry state (its message was lost, e.g.
Redis restarted or was flushed) is sent again; a job stuck in a running state (its worker
died) is handed back to the entry state and sent again, counting an attempt; after
``reconciler.max_attempts`` such attempts the job is failed with the reason, visible in
``screener status``. Re-sending is always safe because every task is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, update
from sqlmodel import col, select

from screener.db.models import JobState, ScreeningJob, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from workers import jobstate
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)

Send = Callable[[str, int], None]  # (stage, job id): publish the stage's task


@dataclass
class ReconcileReport:
    assembled: list[int] = field(default_factory=list)  # jobs created by the assembler
    dispatched: list[int] = field(default_factory=list)  # fresh queued jobs sent
    resent: list[tuple[int, str]] = field(default_factory=list)  # (job, stage) re-sent
    failed: list[int] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.assembled or self.dispatched or self.resent or self.failed)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def dispatch_fresh(settings: Settings, send: Send, report: ReconcileReport) -> None:
    with session_scope(settings.database_url) as session:
        ids = session.exec(
            select(ScreeningJob.id)
            .where(
                ScreeningJob.state == JobState.QUEUED.value,
                col(ScreeningJob.dispatched_at).is_(None),
            )
            .order_by(col(ScreeningJob.id))
        ).all()
    for job_id in ids:
        assert job_id is not None
        send("prepare", job_id)
        report.dispatched.append(job_id)


def recover_stale(settings: Settings, send: Send, now: datetime, report: ReconcileReport) -> None:
    cutoff = now - timedelta(seconds=settings.reconciler.stale_seconds)
    work_states = [s.value for s in jobstate.ENTRY_STATE.values()] + [
        s.value for s in jobstate.RUNNING_STATE.values()
    ]
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(ScreeningJob).where(
                col(ScreeningJob.state).in_(work_states),
                col(ScreeningJob.updated_at) < cutoff,
                or_(
                    col(ScreeningJob.dispatched_at).is_(None),
                    col(ScreeningJob.dispatched_at) < cutoff,
                ),
            )
        ).all()
        stale = [(r.id, r.state, r.attempts, r.updated_at) for r in rows]
    running = {s.value for s in jobstate.RUNNING_STATE.values()}
    for job_id, state, attempts, updated_at in stale:
        assert job_id is not None
        stage = jobstate.STAGE_OF_STATE[state]
        if state in running:
            if attempts + 1 >= settings.reconciler.max_attempts:
                reason = (
                    f"no progress in state {state!r} after {attempts + 1} attempts "
                    f"(stale after {settings.reconciler.stale_seconds:g} s each)"
                )
                if jobstate.fail(settings, job_id, reason, "reconciler"):
                    report.failed.append(job_id)
                continue
            # Hand it back only if nobody touched it since we looked (compare-and-set).
            with session_scope(settings.database_url) as session:
                result = session.execute(
                    update(ScreeningJob)
                    .where(
                        col(ScreeningJob.id) == job_id,
                        col(ScreeningJob.state) == state,
                        col(ScreeningJob.updated_at) == updated_at,
                    )
                    .values(
                        state=jobstate.ENTRY_STATE[stage].value,
                        attempts=attempts + 1,
                        updated_at=now,
                    )
                )
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    continue
        send(stage, job_id)
        report.resent.append((job_id, stage))
        jobstate.audit(
            settings,
            "job.resent",
            actor="reconciler",
            job_id=job_id,
            detail={"state": state, "stage": stage, "attempts": attempts},
        )
        log.warning("job %s stale in state %s: re-sent to %s", job_id, state, stage)


def reconcile_once(
    settings: Settings,
    send: Send,
    *,
    now: datetime | None = None,
    assemble: bool = True,
    stale_scan: bool = True,
) -> ReconcileReport:
    """One pass; safe to run in several processes at once (all moves are conditional)."""
    now = _aware(now) or utcnow()
    report = ReconcileReport()
    if assemble:
        from screener.study_assembler import assemble_due_studies

        report.assembled = assemble_due_studies(settings, now=now)
    dispatch_fresh(settings, send, report)
    if stale_scan:
        recover_stale(settings, send, now, report)
    return report


def run_reconciler(
    settings: Settings,
    send: Send,
    stop_event: threading.Event,
    *,
    tick_s: float = 0.5,
    assemble: bool = True,
) -> None:
    """Loop until ``stop_event``: assemble and dispatch every tick, recover every interval."""
    log.info(
        "reconciler: tick %.1f s, stale after %g s, check every %g s, max %d attempts",
        tick_s,
        settings.reconciler.stale_seconds,
        settings.reconciler.interval_seconds,
        settings.reconciler.max_attempts,
    )
    next_scan = 0.0
    heartbeat = Heartbeat("reconciler")
    while not stop_event.is_set():
        heartbeat.beat()
        scan = time.monotonic() >= next_scan
        try:
            report = reconcile_once(settings, send, assemble=assemble, stale_scan=scan)
            if report.anything:
                log.info(
                    "reconciler: %d assembled, %d dispatched, %d re-sent, %d failed",
                    len(report.assembled),
                    len(report.dispatched),
                    len(report.resent),
                    len(report.failed),
                )
        except Exception:  # the loop must survive a DB or broker hiccup
            log.exception("reconciler pass failed; retrying next tick")
        if scan:
            next_scan = time.monotonic() + settings.reconciler.interval_seconds
        stop_event.wait(tick_s)
