"""Re-screening stored studies with the current model and threshold (``screener reprocess``).

A re-screen is a new screening job (trigger ``reprocess``, ``supersedes_job_id`` = the
study's latest job) that goes through the same queues as a new study; the report stage
passes the study's previous outputs to the SR writer, so the new SR references them.
A study whose latest job was screened as now (:class:`Screening`: model name and version,
classifier scheme, threshold version and value) is skipped: its outputs would be identical
(same deterministic UIDs), and the PACS must never receive a duplicate of an unchanged
result. Each study that is re-screened says why (``why``). A study whose images are no longer in
the spool (pruned by ``retention.spool_days``, or lost) cannot be re-screened: it is named
with the action ``images_pruned`` and nothing is queued for it.
"""

from __future__ import annotations

import logging
import math
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
    why: str = ""  # what changed since the previous job (re-screened studies)

    def to_json(self) -> dict[str, object]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "last_received_at": self.last_received_at.isoformat(),
            "previous_job_id": self.previous_job_id,
            "previous_state": self.previous_state,
            "action": self.action,
            "why": self.why,
        }


@dataclass(frozen=True)
class Screening:
    """What a study's outputs depend on besides its images: a job records it when infer
    commits (``screening_jobs``), and reprocess compares it with what would run now."""

    model_name: str
    model_version: str
    scheme: str
    threshold_version: int
    threshold_value: float

    @property
    def model_ref(self) -> str:
        return f"{self.model_name}@{self.model_version}"

    def changes_since(self, job: ScreeningJob) -> list[str]:
        """What differs from what ``job`` recorded; a field the job has no value for (NULL:
        written before it was recorded) counts as unchanged."""
        changed = []
        if job.model_name is not None and job.model_name != self.model_name:
            changed.append(f"model {job.model_name} -> {self.model_name}")
        if job.model_version != self.model_version:
            changed.append(f"model version {job.model_version} -> {self.model_version}")
        if job.scheme is not None and job.scheme != self.scheme:
            changed.append(f"scheme {job.scheme} -> {self.scheme}")
        if job.threshold_version != self.threshold_version:
            changed.append(f"threshold version {job.threshold_version} -> {self.threshold_version}")
        elif job.threshold_value is not None and not math.isclose(
            job.threshold_value, self.threshold_value, rel_tol=0.0, abs_tol=1e-9
        ):
            changed.append(f"threshold {job.threshold_value:g} -> {self.threshold_value:g}")
        return changed


@dataclass
class ReprocessPlan:
    screening: Screening
    items: list[PlanItem] = field(default_factory=list)

    @property
    def model_ref(self) -> str:
        return self.screening.model_ref

    @property
    def threshold_version(self) -> int:
        return self.screening.threshold_version

    @property
    def images_pruned(self) -> list[str]:
        """Studies that cannot be re-screened: their images are gone from the spool."""
        return [i.study_instance_uid for i in self.items if i.action == "images_pruned"]


def current_model(settings: Settings) -> tuple[str, str]:
    """Name and version of the models the workers load (from the manifest, no engines)."""
    from engines.manifest import model_dir, read_manifest_json

    manifest = read_manifest_json(model_dir(settings.model.model_dir))
    return str(manifest["name"]), str(manifest["version"])


def current_screening(settings: Settings, model: tuple[str, str] | None = None) -> Screening:
    """What a worker started now would screen with: the model folder's manifest, the
    configured scheme and the threshold in force (``model``: name and version instead of the
    manifest's, for tests)."""
    name, version = model or current_model(settings)
    threshold = active_threshold(settings)
    return Screening(name, version, settings.model.scheme, threshold.version, threshold.value)


def decide(previous: ScreeningJob | None, now: Screening, force: bool) -> tuple[Action, str]:
    """What to do with a study given its latest job, and why (pure: the heart of the rules)."""
    if previous is None:
        return "rescreen", "never screened"
    if previous.state not in TERMINAL_STATES:
        return "in_progress", ""
    if previous.state not in (JobState.DELIVERED.value, JobState.COMPLETED.value):
        return "rescreen", f"last job {previous.state}"
    changed = now.changes_since(previous)
    if changed:
        return "rescreen", "; ".join(changed)
    return ("rescreen", "forced") if force else ("unchanged", "")


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
    now = current_screening(settings, model)
    plan = ReprocessPlan(now)
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
            action, why = decide(previous, now, force)
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
                    why=why,
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
                        "scheme": plan.screening.scheme,
                        "threshold_version": plan.threshold_version,
                        "why": item.why,
                    },
                )
            )
            created[item.study_instance_uid] = job.id
    if created:
        from workers.dispatch import send_created

        send_created(settings, list(created.values()))
    return created
