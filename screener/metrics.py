"""Prometheus metrics, read from the database at scrape time.

The database is the source of truth for every process (listener, Celery workers, the
batching consumer), so one collector that counts rows is correct across all of them without
a multiprocess registry, and it is a pure reader: nothing in the data path depends on it.
No label carries patient data (destinations, states, stages, model names only).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from sqlalchemy import case, func
from sqlmodel import col, select

from screener.db.models import (
    Delivery,
    ImageResult,
    Instance,
    JobState,
    ScreeningJob,
    StageTiming,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
QUEUE_STATES = {  # jobs waiting for each stage
    "prepare": (JobState.QUEUED.value,),
    "infer": (JobState.PREPARED.value,),
    "report": (JobState.INFERRED.value,),
    "deliver": (JobState.REPORTED.value, JobState.DELIVERING.value),
}
POSITIVE_RATE_WINDOW = timedelta(hours=24)


class DatabaseCollector:
    """A prometheus_client collector whose ``collect`` runs a few aggregate queries."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list[Metric]:
        return []  # no describe-time queries: registration must not touch the database

    def collect(self) -> Iterator[Metric]:
        from screener.status import study_state

        url = self.settings.database_url
        with session_scope(url) as session:
            instances = session.exec(select(func.count()).select_from(Instance)).one()
            newest = (
                select(func.max(ScreeningJob.id))
                .where(ScreeningJob.state != JobState.SUPERSEDED.value)
                .group_by(col(ScreeningJob.study_id))
            )
            latest = session.exec(
                select(ScreeningJob.state, func.count())
                .where(col(ScreeningJob.id).in_(newest))
                .group_by(col(ScreeningJob.state))
            ).all()
            jobs = session.exec(
                select(ScreeningJob.state, func.count()).group_by(col(ScreeningJob.state))
            ).all()
            deliveries = session.exec(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    col(Delivery.destination), col(Delivery.state)
                )
            ).all()
            bucket_cols = [
                func.sum(case((col(StageTiming.seconds) <= b, 1), else_=0)) for b in STAGE_BUCKETS
            ]
            stages = session.exec(
                select(
                    StageTiming.stage,
                    func.count(),
                    func.coalesce(func.sum(StageTiming.seconds), 0.0),
                    *bucket_cols,
                ).group_by(col(StageTiming.stage))
            ).all()
            since = utcnow() - POSITIVE_RATE_WINDOW
            screened, positive = session.exec(
                select(
                    func.count(),
                    func.coalesce(
                        func.sum(case((col(ImageResult.covid_positive).is_(True), 1), else_=0)), 0
                    ),
                )
                .join(ScreeningJob, col(ScreeningJob.id) == col(ImageResult.job_id))
                .where(
                    col(ImageResult.screened).is_(True),
                    col(ScreeningJob.updated_at) >= since,
                    # a re-screened study counts once, with its newest result (as the
                    # monitoring page does): not the earlier job's images as well
                    col(ScreeningJob.id).in_(newest),
                )
            ).one()
        yield CounterMetricFamily(
            "screener_instances_received",
            "DICOM instances received and recorded (each version once).",
            value=int(instances),
        )
        by_state: dict[str, int] = {}
        for state, n in latest:
            key = study_state(str(state))
            by_state[key] = by_state.get(key, 0) + int(n)
        # A gauge under the name the console and dashboards know: a study moves between
        # states (a re-screen, a dead letter retried), so its count can fall, which a
        # counter must never do (Prometheus would read a reset and increase() would count
        # the whole value again: a failed-studies alert with nothing newly failed).
        totals = GaugeMetricFamily(
            "screener_studies_total",
            "Studies by the terminal state of their newest job (a study can change state).",
            labels=["state"],
        )
        for state in ("delivered", "completed", "ignored", "failed"):
            totals.add_metric([state], by_state.get(state, 0))
        yield totals
        job_states = GaugeMetricFamily(
            "screener_jobs", "Screening jobs by state.", labels=["state"]
        )
        for state, n in jobs:
            job_states.add_metric([str(state)], int(n))
        yield job_states
        delivery = GaugeMetricFamily(
            "screener_deliveries",
            "Output deliveries by state and destination (dead: dead letters).",
            labels=["state", "destination"],
        )
        for destination, state, n in deliveries:
            delivery.add_metric([str(state), str(destination)], int(n))
        yield delivery
        queue = GaugeMetricFamily(
            "screener_queue_depth", "Jobs waiting for each stage.", labels=["stage"]
        )
        job_counts = {str(s): int(n) for s, n in jobs}
        for stage, states in QUEUE_STATES.items():
            queue.add_metric([stage], sum(job_counts.get(s, 0) for s in states))
        yield queue
        hist = HistogramMetricFamily(
            "screener_stage_duration_seconds",
            "Time from a stage claiming a job to finishing it.",
            labels=["stage"],
        )
        for row in stages:
            stage, count, total = row[0], row[1], row[2]
            cumulative: list[int] = list(row[3:])
            buckets = [
                (str(b), int(c or 0)) for b, c in zip(STAGE_BUCKETS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", int(count)))
            hist.add_metric([str(stage)], buckets, float(total))
        yield hist
        rate = GaugeMetricFamily(
            "screener_positive_rate",
            "Share of images screened positive in the last 24 hours (NaN: none screened).",
        )
        rate.add_metric([], int(positive) / int(screened) if screened else float("nan"))
        yield rate
        yield GaugeMetricFamily(
            "screener_images_screened_24h",
            "Images screened in the last 24 hours.",
            value=int(screened),
        )
        yield from _model_metrics(self.settings)


def _model_metrics(settings: Settings) -> Iterator[Metric]:
    from screener.thresholds import active_record

    record = active_record(settings)
    threshold = GaugeMetricFamily(
        "screener_threshold", "The active COVID-19 score threshold.", labels=["version"]
    )
    threshold.add_metric([str(record.version)], record.value)
    yield threshold
    info = InfoMetricFamily("screener_model", "The screening model the service is configured with.")
    info.add_metric([], model_labels(settings))
    yield info


def model_labels(settings: Settings) -> dict[str, str]:
    """Name, version, scheme and engine of the configured model (from its manifest)."""
    labels: dict[str, str] = {"engine": settings.model.engine, "scheme": settings.model.scheme}
    try:
        from engines.manifest import load_manifest

        manifest = load_manifest(settings.model.model_dir or None)
        labels["name"] = str(getattr(manifest, "name", ""))
        labels["version"] = str(getattr(manifest, "version", ""))
    except Exception:  # noqa: S110 - the model is optional for a metrics reader
        pass
    return labels


def exposition(settings: Settings) -> bytes:
    """The text exposition of every screener metric (``GET /metrics``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings))
    return generate_latest(registry)
