"""Re-screening stored studies with the current model and threshold (``screener reprocess``).

A re-screen is a new screening job (trigger ``reprocess``, ``supersedes_job_id`` = the
study's latest job) that goes through the same queues as a new study; the report stage
passes the study's previous outputs to the SR writer, so the new SR references them.
A study whose latest job already used the current model version and threshold version
is skipped: its outputs would be identical (same deterministic UIDs), and the PACS must
never receive a duplicate of an unchanged result. A study whose images are no longer in
the spool (pruned by ``retention.spool_days``, or lost) cannot be re-screened: it is named
with the action ``images_pruned`` and nothing is queued for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from sqlalchemy import func
from sqlmodel import col, select

from screener.db.models import TERMINAL_STATES, AuditLog, JobState, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.retention import missing_images
from screener.settings import Settings
from screener.thresholds import active_threshold
from screener.timeutil import aware

log = logging.getLogger(__name__)

Action = Literal["rescreen", "unchanged", "in_progress", "images_pruned"]


@dataclass(frozen=True)
class PlanItem:
    study_id: int
    study_instance_uid: str
    last_received_at: datetime
    previous_job_id: int | None
    previous_state: str | None
    action: Action

    def to_json(self) -> dict[str, object]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "last_received_at": self.last_received_at.isoformat(),
            "previous_job_id": self.previous_job_id,
            "previous_state": self.previous_state,
            "action": self.action,
        }


@dataclass
class ReprocessPlan:
    model_name: str
    model_version: str
    threshold_version: int
    items: list[PlanItem] = field(default_factory=list)

    @property
    def model_ref(self) -> str:
        return f"{self.model_name}@{self.model_version}"

    @property
    def images_pruned(self) -> list[str]:
        """Studies that cannot be re-screened: their images are gone from the spool."""
        return [i.study_instance_uid for i in self.items if i.action == "images_pruned"]


def current_model(settings: Settings) -> tuple[str, str]:
    """Name and version of the models the workers load (from the manifest, no engines)."""
    from engines.manifest import model_dir, read_manifest_json

    manifest = read_manifest_json(model_dir(settings.model.model_dir))
    return str(manifest["name"]), str(manifest["version"])


def decide(
    previous: ScreeningJob | None, model_version: str, threshold_version: int, force: bool
) -> Action:
    """What to do with a study given its latest job (pure: the heart of the rules)."""
    if previous is None:
        return "rescreen"
    if previous.state not in TERMINAL_STATES:
        return "in_progress"
    same = (
        previous.state in (JobState.DELIVERED.value, JobState.COMPLETED.value)
        and previous.model_version == model_version
        and previous.threshold_version == threshold_version
    )
    return "unchanged" if same and not force else "rescreen"


def plan_reprocess(
    settings: Settings,
    since: datetime,
    until: datetime | None = None,
    *,
    studies: list[str] | None = None,
    force: bool = False,
    model: tuple[str, str] | None = None,
) -> ReprocessPlan:
    """Complete studies with instances received in [since, until), and what to do with each."""
    name, version = model or current_model(settings)
    threshold = active_threshold(settings)
    plan = ReprocessPlan(name, version, threshold.version)
    with session_scope(settings.database_url) as session:
        query = select(Study).where(
            col(Study.is_complete).is_(True),
            col(Study.own_output_only).is_(False),
            col(Study.last_received_at) >= since,
        )
        if until is not None:
            query = query.where(col(Study.first_received_at) < until)
        if studies:
            query = query.where(col(Study.study_instance_uid).in_(studies))
        for study in session.exec(query.order_by(col(Study.last_received_at))).all():
            previous = session.exec(
                select(ScreeningJob)
                .where(ScreeningJob.study_id == study.id)
                .order_by(col(ScreeningJob.id).desc())
                .limit(1)
            ).first()
            assert study.id is not None
            action = decide(previous, version, threshold.version, force)
            if action == "rescreen" and missing_images(settings, study.id):
                action = "images_pruned"
            plan.items.append(
                PlanItem(
                    study_id=study.id,
                    study_instance_uid=study.study_instance_uid,
                    last_received_at=aware(study.last_received_at),
                    previous_job_id=None if previous is None else previous.id,
                    previous_state=None if previous is None else previous.state,
                    action=action,
                )
            )
    return plan


def queue_reprocess(settings: Settings, plan: ReprocessPlan, actor: str = "cli") -> dict[str, int]:
    """Create a queued job per study to re-screen and dispatch them to the first stage
    (if the broker is down, the reconciler's recovery sends them later).

    A study whose latest job is no longer the planned one (another ``reprocess`` run, or
    new images, queued a job since the plan was made) is left alone: the study row is
    locked (PostgreSQL) and its latest job read again in the transaction that adds ours,
    so two overlapping runs never queue the same study twice."""
    created: dict[str, int] = {}
    for item in plan.items:
        if item.action != "rescreen":
            continue
        now = utcnow()
        with session_scope(settings.database_url) as session:
            session.exec(select(Study.id).where(Study.id == item.study_id).with_for_update())
            latest = session.exec(
                select(func.max(ScreeningJob.id)).where(ScreeningJob.study_id == item.study_id)
            ).one()
            if latest != item.previous_job_id:
                log.info(
                    "study id %s: job %s was queued since the plan; not re-screened again",
                    item.study_id,
                    latest,
                )
                continue
            job = ScreeningJob(
                study_id=item.study_id,
                state=JobState.QUEUED.value,
                trigger="reprocess",
                supersedes_job_id=item.previous_job_id,
                created_at=now,
                updated_at=now,
            )
            session.add(job)
            session.flush()
            assert job.id is not None
            session.add(
                AuditLog(
                    actor=actor,
                    action="job.reprocess",
                    study_instance_uid=item.study_instance_uid,
                    job_id=job.id,
                    detail={
                        "supersedes": item.previous_job_id,
                        "model": plan.model_ref,
                        "threshold_version": plan.threshold_version,
                    },
                )
            )
            created[item.study_instance_uid] = job.id
    if created:
        from workers.dispatch import send_created

        send_created(settings, list(created.values()))
    return created
