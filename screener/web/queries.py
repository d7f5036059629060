"""Database reads behind the web console and the JSON API (no writes here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Subquery, and_, false, func, true
from sqlmodel import Session, col, select

from screener.db.models import (
    AuditLog,
    Delivery,
    ImageResult,
    Instance,
    JobState,
    OutputObject,
    ScreeningJob,
    StageTiming,
    Study,
)
from screener.db.session import session_scope
from screener.settings import Settings
from screener.status import IN_PROGRESS, study_state
from screener.timeutil import aware


def _iso(value: datetime | None) -> str | None:
    return None if value is None else aware(value).isoformat()


@dataclass
class StudyRow:
    study_instance_uid: str
    accession_number: str | None
    state: str
    job_state: str | None
    reason: str | None
    received_at: datetime
    covid_score: float | None
    covid_positive: bool | None
    model: str | None
    threshold: float | None
    threshold_version: int | None
    deliveries: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "state": self.state,
            "job_state": self.job_state,
            "reason": self.reason,
            "received_at": _iso(self.received_at),
            "covid_score": self.covid_score,
            "covid_positive": self.covid_positive,
            "model": self.model,
            "threshold": self.threshold,
            "threshold_version": self.threshold_version,
            "deliveries": self.deliveries,
        }


def _latest_jobs(session: Session, study_ids: list[int]) -> dict[int, ScreeningJob]:
    rows = session.exec(
        select(ScreeningJob)
        .where(col(ScreeningJob.study_id).in_(study_ids))
        .where(ScreeningJob.state != JobState.SUPERSEDED.value)
        .order_by(col(ScreeningJob.id))
    ).all()
    return {job.study_id: job for job in rows}  # the newest wins


def _delivery_counts(session: Session, job_ids: list[int]) -> dict[int, dict[str, int]]:
    rows = session.exec(
        select(OutputObject.job_id, Delivery.state, func.count())
        .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
        .where(col(OutputObject.job_id).in_(job_ids))
        .group_by(col(OutputObject.job_id), col(Delivery.state))
    ).all()
    out: dict[int, dict[str, int]] = {}
    for job_id, state, n in rows:
        out.setdefault(int(job_id), {})[str(state)] = int(n)
    return out


def list_studies(
    settings: Settings,
    *,
    limit: int = 100,
    state: str | None = None,
    day_from: date | None = None,
    day_to: date | None = None,
    call: str | None = None,  # positive | negative
    accession: str | None = None,
) -> list[StudyRow]:
    """Newest studies first, with their newest job's state, score and deliveries.

    The state and call filters are applied in SQL, on each study's newest job that was not
    superseded, before the limit: a matching study is found however old it is.
    """
    with session_scope(settings.database_url) as session:
        query = select(Study).order_by(col(Study.last_received_at).desc(), col(Study.id).desc())
        if day_from is not None:
            start = datetime(day_from.year, day_from.month, day_from.day, tzinfo=UTC)
            query = query.where(col(Study.first_received_at) >= start)
        if day_to is not None and day_to < date.max:  # "to 9999-12-31": no end (no overflow)
            end = datetime(day_to.year, day_to.month, day_to.day, tzinfo=UTC) + timedelta(days=1)
            query = query.where(col(Study.first_received_at) < end)
        if accession:
            query = query.where(col(Study.accession_number).contains(accession.strip()))
        if state or call:
            condition = _newest_job_condition(state, call)
            if condition is None:
                return []  # no study can be in that state
            newest = _newest_jobs()
            query = (
                query.outerjoin(newest, newest.c.study_id == col(Study.id))
                .outerjoin(ScreeningJob, col(ScreeningJob.id) == newest.c.job_id)
                .where(condition)
            )
        studies = session.exec(query.limit(limit)).all()
        jobs = _latest_jobs(session, [s.id for s in studies if s.id is not None])
        counts = _delivery_counts(session, [j.id for j in jobs.values() if j.id is not None])
    rows: list[StudyRow] = []
    for study in studies:
        job = jobs.get(study.id or -1)
        rows.append(_row(study, job, counts.get(job.id or -1, {}) if job else {}))
    return rows


def _newest_jobs() -> Subquery:
    """Each study's newest job that was not superseded (what its state is read from)."""
    return (
        select(
            col(ScreeningJob.study_id).label("study_id"),
            func.max(ScreeningJob.id).label("job_id"),
        )
        .where(ScreeningJob.state != JobState.SUPERSEDED.value)
        .group_by(col(ScreeningJob.study_id))
        .subquery()
    )


RECEIVING = "receiving"  # a study without a job (see screener.status.study_state)
# study states that are the newest job's own state (see screener.status.study_state)
_OWN_STATES = tuple(
    s.value for s in (JobState.DELIVERED, JobState.COMPLETED, JobState.IGNORED, JobState.FAILED)
)


def _newest_job_condition(state: str | None, call: str | None) -> ColumnElement[bool] | None:
    """The SQL form of ``study_state(job.state) == state`` and of the study call, on the
    outer-joined newest job (NULL: no job yet); None when ``state`` is no study state."""
    conditions: list[ColumnElement[bool]] = []
    if state == RECEIVING:
        conditions.append(col(ScreeningJob.id).is_(None))
    elif state == IN_PROGRESS:
        conditions.append(col(ScreeningJob.id).is_not(None))
        conditions.append(col(ScreeningJob.state).not_in(_OWN_STATES))
    elif state in _OWN_STATES:
        conditions.append(col(ScreeningJob.state) == state)
    elif state:
        return None
    if call:
        positive = col(ScreeningJob.result)["study_covid_positive"].as_boolean()
        conditions.append(positive == (true() if call == "positive" else false()))
    return and_(*conditions)


def _row(study: Study, job: ScreeningJob | None, deliveries: dict[str, int]) -> StudyRow:
    result = (job.result if job else None) or {}
    return StudyRow(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        state=study_state(job.state if job else None),
        job_state=job.state if job else None,
        reason=job.reason if job else None,
        received_at=aware(study.first_received_at),
        covid_score=result.get("study_covid_score"),
        covid_positive=result.get("study_covid_positive"),
        model=result.get("model"),
        threshold=result.get("threshold"),
        threshold_version=job.threshold_version if job else None,
        deliveries=deliveries,
    )


@dataclass
class StudyDetail:
    row: StudyRow
    job_id: int | None
    images: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    result: dict[str, Any]


def study_detail(settings: Settings, uid: str) -> StudyDetail | None:
    with session_scope(settings.database_url) as session:
        study = session.exec(select(Study).where(Study.study_instance_uid == uid)).first()
        if study is None or study.id is None:
            return None
        job = _latest_jobs(session, [study.id]).get(study.id)
        instances = {
            i.sop_instance_uid: i
            for i in session.exec(select(Instance).where(Instance.study_id == study.id)).all()
        }
        images: list[dict[str, Any]] = []
        outputs: list[dict[str, Any]] = []
        timeline: list[dict[str, Any]] = [
            {"stage": "received (first instance)", "at": _iso(study.first_received_at)},
            {"stage": "received (last instance)", "at": _iso(study.last_received_at)},
            {"stage": "study complete", "at": _iso(study.completed_at)},
        ]
        if job is not None and job.id is not None:
            for im in session.exec(
                select(ImageResult)
                .where(ImageResult.job_id == job.id)
                .order_by(col(ImageResult.id))
            ).all():
                inst = instances.get(im.sop_instance_uid)
                images.append(
                    {
                        "sop_instance_uid": im.sop_instance_uid,
                        "view": im.view,
                        "view_source": im.view_source,
                        "screened": im.screened,
                        "skip_reason": im.skip_reason,
                        "covid": im.covid,
                        "pneumonia": im.pneumonia,
                        "normal": im.normal,
                        "covid_positive": im.covid_positive,
                        "modality": inst.modality if inst else None,
                    }
                )
            job_outputs = session.exec(
                select(OutputObject)
                .where(OutputObject.job_id == job.id)
                .order_by(col(OutputObject.id))
            ).all()
            by_output: dict[int, list[Delivery]] = {}
            for d in session.exec(  # one query for every output's deliveries
                select(Delivery)
                .where(col(Delivery.output_id).in_([o.id for o in job_outputs]))
                .order_by(col(Delivery.id))
            ).all():
                by_output.setdefault(d.output_id, []).append(d)
            for out in job_outputs:
                outputs.append(
                    {
                        "sop_instance_uid": out.sop_instance_uid,
                        "kind": out.kind,
                        "exists": Path(out.file_path).exists(),
                        "deliveries": [_delivery_json(d) for d in by_output.get(out.id or 0, [])],
                    }
                )
            timeline.append({"stage": "job created", "at": _iso(job.created_at)})
            for t in session.exec(
                select(StageTiming)
                .where(StageTiming.job_id == job.id)
                .order_by(col(StageTiming.id))
            ).all():
                timeline.append(
                    {"stage": t.stage, "at": _iso(t.finished_at), "seconds": round(t.seconds, 3)}
                )
            timeline.append({"stage": f"job {job.state}", "at": _iso(job.updated_at)})
        result = (job.result if job else None) or {}
        counts = _delivery_counts(session, [job.id]) if job and job.id else {}
        row = _row(study, job, counts.get(job.id or -1, {}) if job else {})
    return StudyDetail(
        row=row,
        job_id=job.id if job else None,
        images=images,
        outputs=outputs,
        timeline=timeline,
        result=result,
    )


def _delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "next_attempt_at": _iso(d.next_attempt_at),
        "delivered_at": _iso(d.delivered_at),
    }


def output_file(settings: Settings, uid: str, sop_instance_uid: str) -> Path | None:
    """The outbox file of one output object of a study (for the heatmap PNG)."""
    with session_scope(settings.database_url) as session:
        out = session.exec(
            select(OutputObject).where(
                OutputObject.study_instance_uid == uid,
                OutputObject.sop_instance_uid == sop_instance_uid,
            )
        ).first()
    if out is None:
        return None
    path = Path(out.file_path)
    return path if path.exists() else None


def audit_log(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(AuditLog).order_by(col(AuditLog.id).desc()).limit(limit)).all()
    return [
        {
            "at": _iso(r.at),
            "actor": r.actor,
            "action": r.action,
            "study_instance_uid": r.study_instance_uid,
            "job_id": r.job_id,
            "detail": r.detail,
        }
        for r in rows
    ]


def monitoring(settings: Settings, days: int = 14) -> dict[str, Any]:
    """Daily volume and positive rate; COVID-19 score histograms per station (calling AE)."""
    since = datetime.now(UTC) - timedelta(days=days)
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(ImageResult, ScreeningJob.updated_at, Instance.calling_ae_title)
            .join(ScreeningJob, col(ScreeningJob.id) == col(ImageResult.job_id))
            .join(
                Instance,
                col(Instance.sop_instance_uid) == col(ImageResult.sop_instance_uid),
                isouter=True,
            )
            .where(col(ImageResult.screened).is_(True))
            .where(col(ScreeningJob.updated_at) >= since)
            .where(ScreeningJob.state != JobState.SUPERSEDED.value)
        ).all()
        studies = session.exec(
            select(Study.first_received_at).where(col(Study.first_received_at) >= since)
        ).all()
    daily: dict[str, dict[str, int]] = {}
    for received in studies:
        day = aware(received).date().isoformat()
        daily.setdefault(day, {"studies": 0, "images": 0, "positive": 0})["studies"] += 1
    edges = [i / 10 for i in range(11)]
    stations: dict[str, list[int]] = {}
    seen: set[str] = set()
    for im, at, station in rows:
        if im.sop_instance_uid in seen:  # one instance may have several versions
            continue
        seen.add(im.sop_instance_uid)
        day = aware(at).date().isoformat()
        entry = daily.setdefault(day, {"studies": 0, "images": 0, "positive": 0})
        entry["images"] += 1
        entry["positive"] += int(bool(im.covid_positive))
        hist = stations.setdefault(station or "(unknown)", [0] * 10)
        if im.covid is not None:
            hist[min(9, int(im.covid * 10))] += 1
    return {
        "daily": [{"day": d, **v} for d, v in sorted(daily.items())],
        "edges": edges,
        "stations": stations,
        "validation": _validation_reference(settings),
    }


def _validation_reference(settings: Settings) -> dict[str, Any]:
    """What the model card says about validation, for comparison (no raw scores ship).

    The threshold is the manifest's operating point on the calibrated scale the service
    applies (metrics.json's ``threshold`` is the raw network's cut, shown beside it), both
    rounded down by :func:`~engines.model_card.shipped_threshold` as the model card, the SR
    and version 0 state them: ``round()`` showed 0.1238 beside a card and SRs saying 0.1237."""
    import json

    from engines.manifest import load_manifest, model_dir
    from engines.model_card import shipped_threshold

    path = model_dir(settings.model.model_dir or None) / "metrics.json"
    try:
        data = json.loads(path.read_text())
        scheme = data["schemes"][settings.model.scheme]
        point = load_manifest(settings.model.model_dir or None).operating_point(
            settings.model.scheme
        )
    except (OSError, ValueError, KeyError):
        return {}
    return {
        "scheme": settings.model.scheme,
        "threshold": shipped_threshold(point.threshold),
        "raw_threshold": (
            None if point.raw_threshold is None else shipped_threshold(point.raw_threshold)
        ),
        "val_sensitivity": scheme.get("val_sensitivity"),
        "test_sensitivity": scheme.get("test_sensitivity"),
        "test_specificity": scheme.get("test_specificity"),
    }


def model_card(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The shipped model card (markdown) and metrics."""
    import json

    from engines.manifest import model_dir

    directory = model_dir(settings.model.model_dir or None)
    card = directory / "MODEL_CARD.md"
    metrics = directory / "metrics.json"
    text = card.read_text() if card.exists() else "(no model card in the model directory)"
    data = json.loads(metrics.read_text()) if metrics.exists() else {}
    return text, data
