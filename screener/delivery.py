"""Delivery of the screener's outputs to the PACS, with its state in the database.

Every written file becomes an ``OutputObject``; every output x configured destination a
``Delivery`` row that moves pending -> sending -> delivered, or -> retrying (exponential
backoff) -> ... -> dead after ``delivery.max_attempts`` attempts. ``screener deliveries
retry`` puts dead letters back to pending. Destinations are attempted independently: one
that is down only delays its own rows. The database is the source of truth, so a crashed
sender leaves rows in ``sending`` that are picked up again once they are stale.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from screener.db.models import AuditLog, Delivery, DeliveryState, OutputObject, utcnow
from screener.db.session import session_scope
from screener.dicom.sender import send_files
from screener.reports.common import PredecessorRef
from screener.settings import Destination, Settings

log = logging.getLogger(__name__)

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"})
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
DUE_STATES = (DeliveryState.PENDING.value, DeliveryState.RETRYING.value)


def output_kind(sop_class_uid: str) -> str:
    if sop_class_uid.startswith(SR_PREFIX):
        return "sr"
    if sop_class_uid in SC_CLASSES:
        return "sc"
    if sop_class_uid == PARAMETRIC_MAP:
        return "pmap"
    return "other"


def backoff_delay(attempts: int, settings: Settings) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: base * 2^(attempts-1), capped."""
    base = settings.delivery.backoff_seconds
    seconds = min(settings.delivery.backoff_max_seconds, base * (2 ** max(0, attempts - 1)))
    return timedelta(seconds=seconds)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    from datetime import UTC

    return value.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- recording


def record_outputs(settings: Settings, job_id: int, paths: Iterable[Path]) -> list[OutputObject]:
    """Register written files and queue one delivery per configured destination.

    Idempotent: an output already known by its SOP Instance UID (an identical re-screen)
    keeps its row and its deliveries; what was delivered is not sent again.
    """
    headers = [(Path(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
    destinations = [d.name for d in settings.delivery.destinations]
    outputs: list[OutputObject] = []
    with session_scope(settings.database_url) as session:
        for path, ds in headers:
            sop = str(ds.SOPInstanceUID)
            row = session.exec(
                select(OutputObject).where(OutputObject.sop_instance_uid == sop)
            ).first()
            if row is None:
                row = OutputObject(
                    job_id=job_id,
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_instance_uid=sop,
                    sop_class_uid=str(ds.SOPClassUID),
                    kind=output_kind(str(ds.SOPClassUID)),
                    file_path=str(path),
                )
                session.add(row)
                session.flush()
            else:
                # identical re-screen: same UID, same content; the newest job and copy own it
                row.file_path = str(path)
                row.job_id = job_id
                session.add(row)
            known = set(
                session.exec(select(Delivery.destination).where(Delivery.output_id == row.id)).all()
            )
            for name in destinations:
                if name not in known:
                    session.add(Delivery(output_id=row.id or 0, destination=name))
            outputs.append(row)
        session.add(
            AuditLog(
                actor="delivery",
                action="outputs.recorded",
                job_id=job_id,
                study_instance_uid=headers[0][1].StudyInstanceUID if headers else None,
                detail={"outputs": len(outputs), "destinations": destinations},
            )
        )
    return outputs


def previous_outputs_for_study(
    settings: Settings, study_instance_uid: str, exclude_job_id: int | None = None
) -> list[PredecessorRef]:
    """SRs written for this study by earlier jobs: the Predecessor Documents of a re-screen."""
    with session_scope(settings.database_url) as session:
        query = select(OutputObject).where(
            OutputObject.study_instance_uid == study_instance_uid,
            OutputObject.kind == "sr",
        )
        if exclude_job_id is not None:
            query = query.where(OutputObject.job_id != exclude_job_id)
        rows = session.exec(query.order_by(col(OutputObject.id))).all()
        return [
            PredecessorRef(
                study_instance_uid=r.study_instance_uid,
                series_instance_uid=r.series_instance_uid,
                sop_instance_uid=r.sop_instance_uid,
                sop_class_uid=r.sop_class_uid,
            )
            for r in rows
            if r.series_instance_uid
        ]


# --------------------------------------------------------------------------- sending


@dataclass
class DeliverySummary:
    """What one ``deliver_pending`` pass did (also logged and shown by the CLI)."""

    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # destination -> last error

    def to_json(self) -> dict[str, object]:
        return {
            "attempted": self.attempted,
            "delivered": self.delivered,
            "retrying": self.retrying,
            "dead": self.dead,
            "errors": dict(self.errors),
        }


def _claim_due(session: Session, now: datetime, stale_before: datetime, limit: int) -> list[int]:
    """Mark up to ``limit`` due rows as sending; returns the ids this process now owns."""
    due = or_(
        (col(Delivery.state).in_(DUE_STATES))
        & (col(Delivery.next_attempt_at).is_(None) | (col(Delivery.next_attempt_at) <= now)),
        (col(Delivery.state) == DeliveryState.SENDING.value)
        & (col(Delivery.updated_at) < stale_before),
    )
    ids = list(
        session.exec(select(Delivery.id).where(due).order_by(col(Delivery.id)).limit(limit)).all()
    )
    claimed: list[int] = []
    for delivery_id in ids:
        # conditional update: two senders never both own a row
        result = session.execute(
            update(Delivery)
            .where(col(Delivery.id) == delivery_id, due)
            .values(state=DeliveryState.SENDING.value, updated_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(int(delivery_id or 0))
    return claimed


def deliver_pending(
    settings: Settings, now: datetime | None = None, limit: int = 500
) -> DeliverySummary:
    """Try the deliveries that are due (at most ``limit``), one association per destination.

    Safe to run in several processes at once: each row is claimed by one of them.
    """
    now = now or utcnow()
    stale_before = now - timedelta(seconds=settings.reconciler.stale_seconds)
    summary = DeliverySummary()
    with session_scope(settings.database_url) as session:
        claimed = _claim_due(session, now, stale_before, limit)
    if not claimed:
        return summary

    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Delivery, OutputObject)
            .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
            .where(col(Delivery.id).in_(claimed))
            .order_by(col(Delivery.id))
        ).all()
        work: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for delivery, output in rows:
            work[delivery.destination].append((int(delivery.id or 0), Path(output.file_path)))

    configured = {d.name: d for d in settings.delivery.destinations}
    for name, items in work.items():
        destination = configured.get(name)
        outcome_errors: dict[int, str | None]
        if destination is None:
            outcome_errors = {i: f"destination {name} is no longer configured" for i, _ in items}
        else:
            outcome_errors = _send(settings, destination, items)
        _settle(settings, name, outcome_errors, now, summary)
    log.info("delivery pass: %s", summary.to_json())
    return summary


def _send(
    settings: Settings, destination: Destination, items: Sequence[tuple[int, Path]]
) -> dict[int, str | None]:
    try:
        outcome = send_files(
            destination, [p for _, p in items], calling_ae_title=settings.listener.ae_title
        )
    except Exception as exc:  # never let one destination break the pass
        log.exception("sending to %s failed", destination.name)
        return {i: f"sender error: {exc}" for i, _ in items}
    return {i: outcome.per_file.get(p, "not attempted") for i, p in items}


def _settle(
    settings: Settings,
    destination: str,
    errors: dict[int, str | None],
    now: datetime,
    summary: DeliverySummary,
) -> None:
    max_attempts = settings.delivery.max_attempts
    delivered: list[int] = []
    with session_scope(settings.database_url) as session:
        for delivery_id, error in errors.items():
            row = session.get(Delivery, delivery_id)
            if row is None:
                continue
            summary.attempted += 1
            row.attempts += 1
            row.updated_at = now
            if error is None:
                row.state = DeliveryState.DELIVERED.value
                row.delivered_at = now
                row.last_error = None
                row.next_attempt_at = None
                summary.delivered += 1
                delivered.append(delivery_id)
            elif row.attempts >= max_attempts:
                row.state = DeliveryState.DEAD.value
                row.last_error = error
                row.next_attempt_at = None
                summary.dead += 1
                summary.errors[destination] = error
                session.add(
                    AuditLog(
                        actor="delivery",
                        action="delivery.dead",
                        detail={
                            "delivery_id": delivery_id,
                            "destination": destination,
                            "attempts": row.attempts,
                            "error": error,
                        },
                    )
                )
            else:
                row.state = DeliveryState.RETRYING.value
                row.last_error = error
                row.next_attempt_at = now + backoff_delay(row.attempts, settings)
                summary.retrying += 1
                summary.errors[destination] = error
            session.add(row)
        if delivered:
            session.add(
                AuditLog(
                    actor="delivery",
                    action="delivery.delivered",
                    detail={"destination": destination, "delivery_ids": delivered},
                )
            )


# --------------------------------------------------------------------------- admin


def retry_dead(settings: Settings, ids: Sequence[int] | None = None) -> int:
    """Re-queue dead letters (all), or the given ids when dead, retrying or pending."""
    with session_scope(settings.database_url) as session:
        query = update(Delivery)
        if ids:
            # never a delivered row (no duplicates) nor one being sent right now
            query = query.where(
                col(Delivery.id).in_(list(ids)),
                col(Delivery.state).in_(
                    [
                        DeliveryState.DEAD.value,
                        DeliveryState.RETRYING.value,
                        DeliveryState.PENDING.value,
                    ]
                ),
            )
        else:
            query = query.where(col(Delivery.state) == DeliveryState.DEAD.value)
        result = session.execute(
            query.values(
                state=DeliveryState.PENDING.value,
                attempts=0,
                next_attempt_at=None,
                updated_at=utcnow(),
            )
        )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        session.add(
            AuditLog(
                actor="cli",
                action="delivery.retry",
                detail={"ids": list(ids or []), "requeued": count},
            )
        )
    return count


@dataclass
class DeliveryRow:
    """One delivery as the CLI shows it."""

    id: int
    destination: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    kind: str
    sop_instance_uid: str
    study_instance_uid: str
    job_id: int

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        for key in ("next_attempt_at", "delivered_at"):
            value = _aware(data[key])  # type: ignore[arg-type]
            data[key] = None if value is None else value.isoformat()
        return data


def list_deliveries(
    settings: Settings, states: Sequence[str] | None = None, limit: int = 1000
) -> list[DeliveryRow]:
    with session_scope(settings.database_url) as session:
        query = select(Delivery, OutputObject).join(
            OutputObject, col(OutputObject.id) == col(Delivery.output_id)
        )
        if states:
            query = query.where(col(Delivery.state).in_(list(states)))
        rows = session.exec(query.order_by(col(Delivery.id).desc()).limit(limit)).all()
        return [
            DeliveryRow(
                id=int(d.id or 0),
                destination=d.destination,
                state=d.state,
                attempts=d.attempts,
                last_error=d.last_error,
                next_attempt_at=_aware(d.next_attempt_at),
                delivered_at=_aware(d.delivered_at),
                kind=o.kind,
                sop_instance_uid=o.sop_instance_uid,
                study_instance_uid=o.study_instance_uid,
                job_id=o.job_id,
            )
            for d, o in rows
        ]


def job_delivered(settings: Settings, job_id: int) -> bool | None:
    """True when every delivery of the job's outputs is delivered; None if it has none."""
    with session_scope(settings.database_url) as session:
        states = session.exec(
            select(Delivery.state)
            .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
            .where(OutputObject.job_id == job_id)
        ).all()
    if not states:
        return None
    return all(s == DeliveryState.DELIVERED.value for s in states)
