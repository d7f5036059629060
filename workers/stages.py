"""What the prepare, report and deliver stages do to a screening job (infer, batched across
studies, is :mod:`workers.infer_stage`).

Plain functions on (settings, job id), free of Celery, so the tasks and the tests call the
same code. Each stage claims the job (compare-and-set on its state), does its work into
files and rows keyed by the job id, and finishes the job; a stage that finds the job not
in its entry state does nothing. Sending the job on is the caller's (the dispatcher's).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, bindparam, delete, insert
from sqlalchemy.orm import Session
from sqlmodel import col, select

from screener.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    JobState,
    OutputObject,
    table_of,
    utcnow,
)
from screener.db.models import ImageResult as ImageResultRow
from screener.db.session import session_scope
from screener.results import ImageResult, ModelInfo, StudyResult, ThresholdInfo
from screener.settings import Settings
from screener.thresholds import threshold_by_version
from screener.timeutil import aware
from workers import jobstate, result_store

if TYPE_CHECKING:
    from screener.screening.prepare import PreparedImage

log = logging.getLogger(__name__)


class BadInput(Exception):
    """The job can never succeed as it is (retrying would not help)."""


class RedoStage(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The stage's inputs are gone: the job was moved back to the entry of ``stage``,
    which the caller dispatches."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


# ---------------------------------------------------------------- prepare


def study_instance_files(settings: Settings, study_id: int) -> list[Path]:
    """The newest version of every instance of a study, excluding the screener's own output."""
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Instance)
            .where(Instance.study_id == study_id, col(Instance.is_own_output).is_(False))
            .order_by(col(Instance.sop_instance_uid), col(Instance.version).desc())
        ).all()
    newest: dict[str, Path] = {}
    for row in rows:
        newest.setdefault(row.sop_instance_uid, Path(row.file_path))
    return list(newest.values())


def run_prepare(settings: Settings, job_id: int) -> bool:
    """Decode, filter views and pre-process every instance; True when the job moved on."""
    started = time.monotonic()
    job = jobstate.claim_job(settings, job_id, "prepare")
    if job is None:
        return False
    from screener.screening.prepare import prepare_instance

    files = study_instance_files(settings, job.study_id)
    if not files:
        raise BadInput("the study has no instances to screen")
    out_dir = result_store.prepared_dir(settings, job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.prepared"):
        stale.unlink()  # a re-run after a crash starts clean
    everything = []
    for index, path in enumerate(sorted(files)):
        prepared = prepare_instance(path, settings)  # never raises for bad input
        prepared.save(out_dir / f"{index:04d}.prepared")
        everything.append(prepared)
    if all(p.refused for p in everything):
        # nothing the screenability gate lets through: no inference, no output objects
        results = [
            ImageResult(source=p.source, skip_reason=p.skip_reason, refused=True)
            for p in everything
        ]
        ignore_job(settings, job_id, "prepare", job.study_instance_uid, results)
        return False
    return jobstate.finish_timed(settings, job_id, "prepare", started)


def ignore_job(
    settings: Settings,
    job_id: int,
    stage: str,
    study_instance_uid: str,
    results: list[ImageResult],
) -> bool:
    """Record a study with nothing screenable: job ``ignored`` with its reason, image rows
    with each object's skip reason, no output objects (issue 10)."""
    study = StudyResult(
        study_instance_uid=study_instance_uid,
        model=ModelInfo(name="", version=""),
        threshold=ThresholdInfo(value=0.0),
    )
    study.set_images(results)
    study.finalise_status()
    summary = study.to_json()
    summary.update(model=None, threshold=None, threshold_version=None, operating_point=None)
    save_image_rows(settings, job_id, results)
    moved = jobstate.end_early(
        settings,
        job_id,
        stage,
        JobState.IGNORED,
        reason=(study.reason or "nothing screenable")[:2000],
        result=summary,
    )
    if moved:
        jobstate.audit(
            settings,
            "job.ignored",
            actor="worker",
            job_id=job_id,
            study_instance_uid=study_instance_uid,
            detail={"reason": study.reason},
        )
        log.info("job %s ignored: %s", job_id, study.reason)
        result_store.remove_job_files(settings, job_id)
        if stage == "report":  # infer's results are no longer needed
            with session_scope(settings.database_url) as session:
                result_store.delete_results(session, [job_id])
    return moved


def load_prepared(
    settings: Settings, job_id: int, *, display: bool = True
) -> tuple[list[PreparedImage], list[str]]:
    """The job's prepared images and their file names (``display=False``: without the
    display image, which infer never needs); none when the folder is gone. Listed with
    ``os.listdir``: the same names as ``glob("*.prepared")`` at a fraction of its cost."""
    from screener.screening.prepare import PreparedImage

    directory = result_store.prepared_dir(settings, job_id)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".prepared"))
    except FileNotFoundError:
        return [], []
    return [PreparedImage.load(directory / n, display=display) for n in names], names


# ---------------------------------------------------------------- infer
# The infer stage lives in workers/infer_stage.py (the batching consumer's staged handler).


def save_image_rows(settings: Settings, job_id: int, results: list[ImageResult]) -> None:
    """Replace the job's image_results rows (idempotent: keyed by job id and SOP UID)."""
    with session_scope(settings.database_url) as session:
        replace_image_rows(session, {job_id: results})


IMAGE_ROWS = table_of(ImageResultRow)
_DELETE_IMAGE_ROWS = delete(IMAGE_ROWS).where(
    IMAGE_ROWS.c.job_id.in_(bindparam("ids", expanding=True))
)
_INSERT_IMAGE_ROWS = insert(IMAGE_ROWS)


def replace_image_rows(
    session: Session | Connection, results: dict[int, list[ImageResult]]
) -> None:
    """Replace the image_results rows of several jobs in the caller's transaction (Core
    statements on the table: one DELETE, one executemany INSERT)."""
    if not results:
        return
    session.execute(_DELETE_IMAGE_ROWS, {"ids": list(results)})
    rows = [
        {
            "job_id": job_id,
            "sop_instance_uid": r.source.sop_instance_uid,
            "view": r.view,
            "view_source": r.view_source,
            "screened": r.screened,
            "skip_reason": r.skip_reason,
            "covid": (r.probabilities or {}).get("covid"),
            "pneumonia": (r.probabilities or {}).get("pneumonia"),
            "normal": (r.probabilities or {}).get("normal"),
            "covid_positive": r.covid_positive,
            "heatmap_lung_fraction": r.heatmap_lung_fraction,
        }
        for job_id, job_results in results.items()
        for r in job_results
    ]
    if rows:
        session.execute(_INSERT_IMAGE_ROWS, rows)


# ---------------------------------------------------------------- report


def run_report(settings: Settings, job_id: int) -> bool:
    """Write the SR and heatmap SCs to the outbox and record them for delivery."""
    started = time.monotonic()
    job = jobstate.claim_job(settings, job_id, "report")
    if job is None:
        return False
    from screener.delivery import previous_outputs_for_study, record_outputs
    from screener.reports.writer import write_study_outputs
    from screener.screening.study_result import assemble_study

    try:
        results, model, applied = result_store.load_results(settings, job_id)
    except (OSError, ValueError, LookupError) as exc:  # lost, or written by an older version
        log.warning("job %s: image results unreadable (%s); back to infer", job_id, exc)
        if jobstate.redo_previous(settings, job_id, "report") is not None:
            raise RedoStage("infer") from exc
        return False
    # the threshold infer applied to the images (version 0 is the manifest of the networks
    # that scored them, whatever model.json says now)
    threshold = applied or threshold_by_version(settings, job.threshold_version or 0)
    study = assemble_study(job.study_instance_uid, results, model, threshold, settings.disclaimer)
    if study.status == "ignored":
        ignore_job(settings, job_id, "report", job.study_instance_uid, results)
        return False
    predecessors = previous_outputs_for_study(
        settings, job.study_instance_uid, exclude_job_id=job_id
    )
    out_dir = settings.outbox_dir / f"job-{job_id}"
    paths = write_study_outputs(study, out_dir, settings, predecessors=predecessors)
    record_outputs(settings, job_id, paths)
    study.outputs = [str(p) for p in paths]
    moved = jobstate.finish_timed(
        settings,
        job_id,
        "report",
        started,
        also=lambda session: result_store.delete_results(session, [job_id]),  # with the move
        result=study.to_json(),
    )
    if moved:
        result_store.remove_job_files(settings, job_id)
        log.info(
            "study %s: %s, score %s, call %s, model %s, threshold %.4f, destinations %s",
            study.study_instance_uid,
            study.status,
            "-" if study.study_covid_score is None else f"{study.study_covid_score:.4f}",
            {True: "positive", False: "negative", None: "-"}[study.study_covid_positive],
            study.model.ref,
            threshold.value,
            ",".join(d.name for d in settings.delivery.destinations) or "none",
        )
    return moved


# ---------------------------------------------------------------- deliver


@dataclass(frozen=True)
class DeliveryOutcome:
    state: str  # delivered | completed | waiting | failed | skipped
    retry_in_s: float | None = None
    reason: str | None = None


def job_delivery_states(
    settings: Settings, job_id: int
) -> list[tuple[str, datetime | None, str | None]]:
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Delivery.state, Delivery.next_attempt_at, Delivery.last_error)
            .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
            .where(OutputObject.job_id == job_id)
        ).all()
        return [(str(s), n, e) for s, n, e in rows]


def run_deliver(settings: Settings, job_id: int, now: datetime | None = None) -> DeliveryOutcome:
    """One delivery pass for the job's outputs, and the job's state from its deliveries.

    delivered: every output acknowledged by every destination; completed: no destination
    is configured; failed: a delivery was given up (the reason names it); waiting: the job
    goes back to ``reported`` and the delivery sweep sends the rest and settles the job.
    """
    if not jobstate.claim(settings, job_id, "deliver"):
        return DeliveryOutcome("skipped")
    from screener.delivery import dead_letter_reason, deliver_pending

    if not job_delivery_states(settings, job_id):
        jobstate.finish(settings, job_id, "deliver", to_state=JobState.COMPLETED)
        return DeliveryOutcome("completed")
    deliver_pending(settings, now=now)
    rows = job_delivery_states(settings, job_id)
    if any(s == DeliveryState.DEAD.value for s, _, _ in rows):
        reason = dead_letter_reason(settings, job_id) or "delivery dead-lettered"
        jobstate.fail(settings, job_id, reason, "worker:deliver")
        return DeliveryOutcome("failed", reason=reason)
    waiting = [n for s, n, _ in rows if s != DeliveryState.DELIVERED.value]
    if waiting:
        jobstate.release(settings, job_id, "deliver")
        moment = now or utcnow()
        due = [aware(n) for n in waiting if n is not None]
        delay = settings.delivery.sweep_interval_seconds
        if due:
            delay = min(delay, max(0.5, (min(due) - moment).total_seconds()))
        return DeliveryOutcome("waiting", retry_in_s=delay)
    jobstate.finish(settings, job_id, "deliver")
    return DeliveryOutcome("delivered")


__all__ = [
    "BadInput",
    "DeliveryOutcome",
    "RedoStage",
    "run_deliver",
    "run_prepare",
    "run_report",
]
