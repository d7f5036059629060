"""The /metrics collector read straight from the database: types and counts that stay true
when studies are re-screened (SQLite and PostgreSQL)."""

from __future__ import annotations

from prometheus_client.core import Metric

from screener.db.models import ImageResult, JobState, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.metrics import DatabaseCollector
from screener.settings import Settings


def _metrics(settings: Settings) -> dict[str, Metric]:
    return {m.name: m for m in DatabaseCollector(settings).collect()}


def _job(settings: Settings, study_id: int, state: JobState, positive: bool) -> int:
    with session_scope(settings.database_url) as session:
        job = ScreeningJob(study_id=study_id, state=state.value, updated_at=utcnow())
        session.add(job)
        session.flush()
        session.add(
            ImageResult(
                job_id=job.id or 0,
                sop_instance_uid="1.2.3.4.5",
                screened=True,
                covid=0.9 if positive else 0.1,
                covid_positive=positive,
            )
        )
        return int(job.id or 0)


def _study(settings: Settings, uid: str) -> int:
    with session_scope(settings.database_url) as session:
        study = Study(study_instance_uid=uid)
        session.add(study)
        session.flush()
        return int(study.id or 0)


def _value(metric: Metric, **labels: str) -> float:
    [sample] = [s for s in metric.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(sample.value)


def test_a_rescreen_counts_each_study_and_image_once(settings: Settings) -> None:
    first, second = _study(settings, "1.2.3.1"), _study(settings, "1.2.3.2")
    _job(settings, first, JobState.FAILED, positive=True)
    _job(settings, second, JobState.FAILED, positive=True)
    before = _metrics(settings)
    assert _value(before["screener_studies_total"], state="failed") == 2
    assert _value(before["screener_images_screened_24h"]) == 2
    _job(settings, first, JobState.DELIVERED, positive=False)  # re-screened: now negative
    after = _metrics(settings)
    studies = after["screener_studies_total"]
    # a study left "failed": its count fell, which only a gauge may do
    assert studies.type == "gauge"
    assert _value(studies, state="failed") == 1 and _value(studies, state="delivered") == 1
    assert _value(after["screener_images_screened_24h"]) == 2  # not 3: the newest result
    assert _value(after["screener_positive_rate"]) == 0.5
