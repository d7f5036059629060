"""``screener status``: what has arrived, what each study became, what needs attention.

A study's state is the state of its newest job that was not superseded: ``delivered`` only
when every destination acknowledged every output, ``completed`` when it was reported and no
destination is configured, ``ignored`` when nothing in it was screenable (with the reason),
``failed`` with the reason. ``status --check`` exits 1 when :attr:`Status.attention` is not
empty: failed jobs, dead letters, a destination that is down, a spool filesystem nearly full
(at 90% of ``listener.max_spool_fill``, before the listener refuses images), a broker that
does not answer (nothing is screened while it is away; the embedded one is a file).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from screener.db.models import AuditLog, Delivery, Instance, JobState, ScreeningJob, Study
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
IN_PROGRESS = "in_progress"
# `status --check` warns at this share of listener.max_spool_fill: before the listener
# starts refusing images (0xA700), not when it already does
SPOOL_ATTENTION_SHARE = 0.9


@dataclass
class Status:
    database_url: str
    data_dir: str
    studies: dict[str, int]
    instances: int  # instance versions recorded (each is one file in the spool)
    jobs_by_state: dict[str, int]
    spool_bytes: int  # from the database: a status call never walks a large spool
    spool_filesystem_fill: float
    # each study by the state of its newest job: delivered, completed, ignored, failed, ...
    studies_by_state: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed studies + reasons
    ignored: list[dict[str, Any]] = field(default_factory=list)  # ignored studies + reasons
    deliveries_by_state: dict[str, int] = field(default_factory=dict)
    destinations: list[dict[str, Any]] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # non-empty: `status --check` fails
    broker: str = "embedded"  # "embedded", "answers" or why it does not
    last_errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study_state(job_state: str | None) -> str:
    """What a study is, from its newest job's state (``receiving`` without a job)."""
    if job_state is None:
        return "receiving"
    terminal = {s.value for s in (JobState.DELIVERED, JobState.COMPLETED, JobState.IGNORED)}
    if job_state in terminal or job_state == JobState.FAILED.value:
        return job_state
    return IN_PROGRESS


def spool_attention(fill: float, max_fill: float) -> str:
    """A line when the spool filesystem is within the margin below the listener's refusal
    threshold (``SPOOL_ATTENTION_SHARE`` of it), so an admin acts before images are refused."""
    if fill < max_fill * SPOOL_ATTENTION_SHARE:
        return ""
    return (
        f"spool filesystem {fill * 100:.0f}% full for the service user (the listener refuses "
        f"images above {max_fill * 100:.0f}%)"
    )


def destination_states(settings: Settings) -> list[dict[str, Any]]:
    """Circuit-breaker state and backlog per configured destination."""
    from screener.delivery import destination_health

    return [d.to_json() for d in destination_health(settings)]


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
        newest = (
            select(func.max(ScreeningJob.id))
            .where(ScreeningJob.state != JobState.SUPERSEDED.value)
            .group_by(col(ScreeningJob.study_id))
        )
        latest = session.exec(
            select(ScreeningJob, Study)
            .join(Study, col(Study.id) == col(ScreeningJob.study_id))
            .where(col(ScreeningJob.id).in_(newest))
            .order_by(col(ScreeningJob.updated_at).desc())
        ).all()
        deliveries = session.exec(
            select(Delivery.state, func.count()).group_by(Delivery.state)
        ).all()
        errors = session.exec(
            select(AuditLog)
            .where(col(AuditLog.action).in_(ERROR_ACTIONS))
            .where(AuditLog.action != "job.failed")  # failed jobs are listed from their rows
            .order_by(col(AuditLog.id).desc())
            .limit(error_limit)
        ).all()
    by_state: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    ignored: list[dict[str, Any]] = []
    for job, study in latest:
        state = study_state(job.state)
        by_state[state] = by_state.get(state, 0) + 1
        entry = {
            "study_instance_uid": study.study_instance_uid,
            "job_id": job.id,
            "at": job.updated_at.isoformat(),
            "reason": job.reason or "(no reason recorded)",
        }
        if state == JobState.FAILED.value:
            failures.append(entry)
        elif state == JobState.IGNORED.value:
            ignored.append(entry)
    receiving = int(total) - len(latest)
    if receiving:
        by_state["receiving"] = receiving
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
            "at": f["at"],
            "action": "job.failed",
            "job_id": f["job_id"],
            "study_instance_uid": f["study_instance_uid"],
            "detail": {"reason": f["reason"]},
        }
        for f in failures[:error_limit]
    ]
    last_errors.sort(key=lambda e: str(e["at"]), reverse=True)
    fill = spool.filesystem_fill(settings.spool_dir) if settings.spool_dir.exists() else 0.0
    deliveries_by_state = {str(s): int(n) for s, n in deliveries}
    destinations = destination_states(settings)
    attention: list[str] = []
    if failures:
        attention.append(f"{len(failures)} studies failed")
    if deliveries_by_state.get("dead"):
        attention.append(f"{deliveries_by_state['dead']} dead deliveries")
    down = [str(d["name"]) for d in destinations if d.get("state") in ("down", "probing")]
    if down:
        attention.append(f"destination(s) down: {', '.join(down)}")
    unconfigured = [str(d["name"]) for d in destinations if d.get("state") == "unconfigured"]
    if unconfigured:
        attention.append(
            f"deliveries wait for destination(s) not configured: {', '.join(unconfigured)}"
        )
    spool_line = spool_attention(fill, settings.listener.max_spool_fill)
    if spool_line:
        attention.append(spool_line)
    broker = broker_state(settings)
    if broker not in ("embedded", "answers"):
        attention.append(f"{broker} at {mask_url(settings.broker_url)}: nothing is screened")
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
        studies_by_state=by_state,
        failures=failures[:error_limit],
        ignored=ignored[:error_limit],
        deliveries_by_state=deliveries_by_state,
        destinations=destinations,
        attention=attention,
        last_errors=last_errors[:error_limit],
        broker=broker,
    )


def broker_state(settings: Settings) -> str:
    """Whether the broker the workers read answers (bounded by the health check's timeouts):
    a broker that is away leaves studies received and never screened, which the database
    rows alone do not show."""
    from screener.web.health import check_broker, embedded_broker

    if embedded_broker(settings.broker_url):
        return "embedded"
    return check_broker(settings) or "answers"
