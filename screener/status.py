"""``screener status``: what has arrived, what is waiting, what went wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from screener.db.models import AuditLog, Instance, ScreeningJob, Study
from screener.db.session import session_scope
from screener.dicom import spool
from screener.settings import Settings, mask_url

# audit actions that are problems worth showing to an admin
ERROR_ACTIONS = (
    "instance.malformed",
    "instance.invalid_uid",
    "instance.uid_mismatch",
    "instance.disk_failure",
    "association.rejected",
    "job.failed",
    "delivery.dead",
)


@dataclass
class Status:
    database_url: str
    data_dir: str
    studies: dict[str, int]
    instances: int  # instance versions recorded (each is one file in the spool)
    jobs_by_state: dict[str, int]
    spool_bytes: int  # from the database: a status call never walks a large spool
    spool_filesystem_fill: float
    last_errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(settings: Settings, error_limit: int = 10) -> Status:
    """Read counters from the database and the spool (no side effects)."""
    with session_scope(settings.database_url) as session:
        complete = session.exec(
            select(func.count()).select_from(Study).where(col(Study.is_complete).is_(True))
        ).one()
        total = session.exec(select(func.count()).select_from(Study)).one()
        instances, spool_bytes = session.exec(
            select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0)).select_from(
                Instance
            )
        ).one()
        jobs = session.exec(
            select(ScreeningJob.state, func.count()).group_by(ScreeningJob.state)
        ).all()
        errors = session.exec(
            select(AuditLog)
            .where(col(AuditLog.action).in_(ERROR_ACTIONS))
            .order_by(col(AuditLog.id).desc())
            .limit(error_limit)
        ).all()
        failed_jobs = session.exec(
            select(ScreeningJob)
            .where(ScreeningJob.state == "failed")
            .order_by(col(ScreeningJob.updated_at).desc())
            .limit(error_limit)
        ).all()
    last_errors: list[dict[str, Any]] = [
        {
            "at": e.at.isoformat(),
            "action": e.action,
            "study_instance_uid": e.study_instance_uid,
            "detail": e.detail,
        }
        for e in errors
    ]
    last_errors += [
        {
            "at": j.updated_at.isoformat(),
            "action": "job.failed",
            "job_id": j.id,
            "detail": {"reason": j.reason},
        }
        for j in failed_jobs
    ]
    last_errors.sort(key=lambda e: str(e["at"]), reverse=True)
    fill = spool.filesystem_fill(settings.spool_dir) if settings.spool_dir.exists() else 0.0
    return Status(
        database_url=mask_url(settings.database_url),
        data_dir=str(settings.data_dir),
        studies={
            "total": int(total),
            "complete": int(complete),
            "receiving": int(total - complete),
        },
        instances=int(instances),
        jobs_by_state={str(state): int(n) for state, n in jobs},
        spool_bytes=int(spool_bytes),
        spool_filesystem_fill=round(fill, 4),
        last_errors=last_errors[:error_limit],
    )
