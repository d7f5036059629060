"""The reconciler: the database is the source of truth, the broker only carries work.

It is not the normal path: when a stage commits, the dispatcher (:mod:`workers.dispatch`)
sends the job on at once. The reconciler recovers what a crash or a lost message left
behind. Every ``reconciler.interval_seconds`` it looks for jobs whose state has not
advanced: a queued job no dispatcher sent within ``UNDISPATCHED_GRACE_S`` (its creator died
between commit and send) is sent to the first stage; a job waiting in an entry state for
``reconciler.stale_seconds`` (its message was lost, e.g. Redis restarted or was flushed) is
sent again; a job stuck in a running state (its worker died) is handed back to the entry
state and sent again, counting an attempt; after ``reconciler.max_attempts`` such attempts
the job is failed with the reason, visible in ``screener status``. Re-sending is always
safe because every task is idempotent. With ``assemble`` it also hosts the study assembler
(every tick: studies whose quiet period is over), whose new jobs it dispatches at once.

It also runs the delivery sweep (:func:`run_delivery_sweep`) in a thread beside it: every
``delivery.sweep_interval_seconds``, or sooner when a retry or a probe is due, it sends
what is due (:func:`screener.delivery.deliver_pending`, circuit breaker included), lets
job states follow their deliveries (:func:`screener.delivery.settle_jobs`) and, hourly,
prunes by the retention rules (:func:`screener.retention.prune`). So both ``screener
serve`` (reconciler thread) and the distributed deployment (``screener reconcile``) retry
without waiting for new jobs. A job in ``reported`` whose deliveries are still waiting
belongs to the sweep and is not re-sent to the deliver queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, or_, update
from sqlmodel import col, select

from screener.db.models import Delivery, JobState, OutputObject, ScreeningJob, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from screener.timeutil import aware
from workers import jobstate
from workers.dispatch import Dispatcher
from workers.heartbeat import Heartbeat
from workers.stage_graph import FIRST_STAGE, GRAPH, stage_of_state

log = logging.getLogger(__name__)

Send = Callable[[str, int], None]  # (stage, job id): publish the stage's task
UNDISPATCHED_GRACE_S = 2.0  # a queued job not sent by its creator this long after: recover


def _sender(send: Send | Dispatcher) -> Send:
    if isinstance(send, Dispatcher):
        return lambda stage, job_id: send.send(stage, [job_id])
    return send


@dataclass
class ReconcileReport:
    assembled: list[int] = field(default_factory=list)  # jobs created by the assembler
    dispatched: list[int] = field(default_factory=list)  # queued jobs sent to the first stage
    resent: list[tuple[int, str]] = field(default_factory=list)  # (job, stage) re-sent
    failed: list[int] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.assembled or self.dispatched or self.resent or self.failed)


def recover_undispatched(
    settings: Settings,
    send: Send,
    now: datetime,
    report: ReconcileReport,
    grace_s: float = UNDISPATCHED_GRACE_S,
) -> None:
    """Queued jobs that no dispatcher sent (created, then the creator died or had none)."""
    cutoff = now - timedelta(seconds=min(grace_s, settings.reconciler.stale_seconds))
    with session_scope(settings.database_url) as session:
        ids = session.exec(
            select(ScreeningJob.id)
            .where(
                ScreeningJob.state == GRAPH[FIRST_STAGE].entry.value,
                col(ScreeningJob.dispatched_at).is_(None),
                col(ScreeningJob.updated_at) < cutoff,
            )
            .order_by(col(ScreeningJob.id))
        ).all()
    for job_id in ids:
        assert job_id is not None
        send(FIRST_STAGE, job_id)
        report.dispatched.append(job_id)
    if ids and grace_s > 0:
        log.warning("%d queued job(s) never dispatched: sent to %s", len(ids), FIRST_STAGE)


def _update_unchanged(
    settings: Settings, job_id: int, state: str, updated_at: datetime, values: dict[str, object]
) -> bool:
    """Update a stale job only if nobody touched it since the scan (compare-and-set on its
    state and ``updated_at``): a slow worker that committed meanwhile keeps its job."""
    with session_scope(settings.database_url) as session:
        result = session.execute(
            update(ScreeningJob)
            .where(
                col(ScreeningJob.id) == job_id,
                col(ScreeningJob.state) == state,
                col(ScreeningJob.updated_at) == updated_at,
            )
            .values(values)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _fail_unchanged(
    settings: Settings,
    job_id: int,
    state: str,
    updated_at: datetime,
    reason: str,
    now: datetime,
) -> bool:
    """Fail a stuck job for good if it is as the scan saw it; the audit row only then."""
    failed = JobState.FAILED.value
    if not _update_unchanged(
        settings,
        job_id,
        state,
        updated_at,
        {"state": failed, "reason": reason[:2000], "updated_at": now},
    ):
        return False
    jobstate.audit(
        settings, "job.failed", job_id=job_id, actor="reconciler", detail={"reason": reason}
    )
    log.warning("job %s failed: %s", job_id, reason)
    return True


def recover_stale(settings: Settings, send: Send, now: datetime, report: ReconcileReport) -> None:
    cutoff = now - timedelta(seconds=settings.reconciler.stale_seconds)
    work_states = [s.entry.value for s in GRAPH.values()] + [
        s.running.value for s in GRAPH.values()
    ]
    from screener.delivery import WAITING_STATES

    # reported with deliveries still waiting: the delivery sweep retries them
    sweep_owned = (col(ScreeningJob.state) == JobState.REPORTED.value) & exists(
        select(Delivery.id)
        .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
        .where(
            col(OutputObject.job_id) == col(ScreeningJob.id),
            col(Delivery.state).in_(WAITING_STATES),
        )
    )
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(ScreeningJob).where(
                col(ScreeningJob.state).in_(work_states),
                col(ScreeningJob.updated_at) < cutoff,
                or_(
                    col(ScreeningJob.dispatched_at).is_(None),
                    col(ScreeningJob.dispatched_at) < cutoff,
                ),
                ~sweep_owned,
            )
        ).all()
        stale = [(r.id, r.state, r.attempts, r.updated_at) for r in rows]
    running = {s.running.value for s in GRAPH.values()}
    for job_id, state, attempts, updated_at in stale:
        assert job_id is not None
        stage = stage_of_state(state)
        assert stage is not None
        if state in running:
            if attempts + 1 >= settings.reconciler.max_attempts:
                reason = (
                    f"no progress in state {state!r} after {attempts + 1} attempts "
                    f"(stale after {settings.reconciler.stale_seconds:g} s each)"
                )
                if _fail_unchanged(settings, job_id, state, updated_at, reason, now):
                    report.failed.append(job_id)
                continue
            entry = GRAPH[stage].entry.value  # handed back, if as the scan saw it
            if not _update_unchanged(
                settings,
                job_id,
                state,
                updated_at,
                {"state": entry, "attempts": attempts + 1, "updated_at": now},
            ):
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
    send: Send | Dispatcher,
    *,
    now: datetime | None = None,
    assemble: bool = True,
    stale_scan: bool = True,
) -> ReconcileReport:
    """One pass; safe to run in several processes at once (all moves are conditional).

    ``assemble``: complete quiet studies and dispatch their new jobs at once;
    ``stale_scan``: recover what has not advanced (undispatched, lost, stuck)."""
    now = aware(now) or utcnow()
    report = ReconcileReport()
    send = _sender(send)
    if assemble:
        from screener.study_assembler import assemble_due_studies

        report.assembled = assemble_due_studies(settings, now=now)
        for job_id in report.assembled:  # the assembly committed: dispatch now
            send(FIRST_STAGE, job_id)
            report.dispatched.append(job_id)
    if stale_scan:
        recover_undispatched(settings, send, now, report)
        recover_stale(settings, send, now, report)
    return report


@dataclass
class SweepReport:
    attempted: int = 0
    delivered: int = 0
    probes: int = 0
    jobs_delivered: list[int] = field(default_factory=list)
    jobs_failed: list[int] = field(default_factory=list)
    pruned_outputs: int = 0
    pruned_spool: int = 0

    @property
    def anything(self) -> bool:
        return bool(
            self.attempted
            or self.jobs_delivered
            or self.jobs_failed
            or self.pruned_outputs
            or self.pruned_spool
        )


SWEEP_PASS_ROWS = 500  # rows one delivery pass claims at most


def sweep_once(
    settings: Settings,
    *,
    now: datetime | None = None,
    prune: bool = False,
    max_passes: int = 20,
    beat: Callable[[], None] | None = None,
) -> SweepReport:
    """Send what is due (passes of up to ``SWEEP_PASS_ROWS`` rows until none is left),
    settle job states. ``beat`` before each pass: a backlog after an outage takes many
    passes, and the sweep that works through it is alive (``/healthz``)."""
    from screener.delivery import deliver_pending, settle_jobs

    report = SweepReport()
    for _ in range(max_passes):
        if beat is not None:
            beat()
        summary = deliver_pending(settings, now=now, limit=SWEEP_PASS_ROWS)
        report.attempted += summary.attempted
        report.delivered += summary.delivered
        report.probes += summary.probes
        if summary.attempted < SWEEP_PASS_ROWS:  # a short pass: nothing more is due
            break
    settled = settle_jobs(settings, now=now)
    report.jobs_delivered, report.jobs_failed = settled.delivered, settled.failed
    if prune:
        from screener.retention import prune as run_prune

        pruned = run_prune(settings, now=now)
        report.pruned_outputs, report.pruned_spool = len(pruned.outputs), len(pruned.spool)
    return report


RETENTION_INTERVAL_S = 3600.0  # the sweep prunes this often (and once at start)


def run_delivery_sweep(
    settings: Settings, stop_event: threading.Event, *, min_wait_s: float = 1.0
) -> None:
    """Loop until ``stop_event``: a sweep every ``sweep_interval_seconds``, sooner when a
    retry or a probe is due; retention every hour. Survives database hiccups."""
    from screener.delivery import next_due

    interval = settings.delivery.sweep_interval_seconds
    log.info(
        "delivery sweep: every %g s, give up after %g h",
        interval,
        settings.delivery.give_up_after_hours,
    )
    next_prune = 0.0
    heartbeat = Heartbeat("delivery-sweep", settings.data_dir)
    while not stop_event.is_set():
        heartbeat.beat()
        wait = interval
        try:
            prune = time.monotonic() >= next_prune
            report = sweep_once(settings, prune=prune, beat=heartbeat.beat)
            if prune:
                next_prune = time.monotonic() + RETENTION_INTERVAL_S
            if report.anything:
                log.info(
                    "delivery sweep: %d attempted (%d probes), %d delivered; jobs %d "
                    "delivered, %d failed; pruned %d outputs, %d spool files",
                    report.attempted,
                    report.probes,
                    report.delivered,
                    len(report.jobs_delivered),
                    len(report.jobs_failed),
                    report.pruned_outputs,
                    report.pruned_spool,
                )
            due = next_due(settings)
            if due is not None:
                wait = (due - utcnow()).total_seconds()
        except Exception:  # the loop must survive a DB or network hiccup
            log.exception("delivery sweep failed; retrying in %g s", interval)
        stop_event.wait(min(interval, max(min_wait_s, wait)))


def run_reconciler(
    settings: Settings,
    send: Send | Dispatcher,
    stop_event: threading.Event,
    *,
    tick_s: float = 0.5,
    assemble: bool = True,
    sweep: bool = True,
) -> None:
    """Loop until ``stop_event``: with ``assemble`` complete quiet studies every tick (and
    dispatch their jobs), recover every interval; with ``sweep`` the delivery sweep runs in
    a thread beside it."""
    sweeper: threading.Thread | None = None
    if sweep:
        sweeper = threading.Thread(
            target=run_delivery_sweep,
            args=(settings, stop_event),
            name="delivery-sweep",
            daemon=True,
        )
        sweeper.start()
    log.info(
        "reconciler: tick %.1f s, stale after %g s, check every %g s, max %d attempts",
        tick_s,
        settings.reconciler.stale_seconds,
        settings.reconciler.interval_seconds,
        settings.reconciler.max_attempts,
    )
    next_scan = 0.0
    heartbeat = Heartbeat("reconciler", settings.data_dir)
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
        # without assembly there is nothing to do between recovery scans
        stop_event.wait(tick_s if assemble else max(tick_s, next_scan - time.monotonic()))
    if sweeper is not None:
        sweeper.join(timeout=10)
