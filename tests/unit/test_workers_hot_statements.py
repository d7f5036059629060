"""The infer consumer's database statements, built once and run as SQLAlchemy Core (both
databases): the claim that reads the jobs back in the same statement, the moves with extra
fields, and the image rows that replace a job's earlier ones."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlmodel import col, select

from screener.db.models import ImageResult as ImageResultRow
from screener.db.models import JobState, ScreeningJob, Study
from screener.db.session import get_engine, session_scope
from screener.results import ImageResult, SourceImageRef
from screener.settings import Settings
from tests.workers_support import make_job
from workers import jobstate
from workers.stages import replace_image_rows, save_image_rows


@contextmanager
def _statements(settings: Settings) -> Iterator[list[str]]:
    """The SQL statements run on the settings' engine meanwhile (commits not counted)."""
    seen: list[str] = []
    engine = get_engine(settings.database_url)

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _job(settings: Settings, job_id: int) -> ScreeningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job


def test_claim_views_claims_and_reads_in_one_statement(settings: Settings) -> None:
    a = make_job(settings.database_url, "1.2.9.1", JobState.PREPARED)
    b = make_job(settings.database_url, "1.2.9.2", JobState.PREPARED)
    taken = make_job(settings.database_url, "1.2.9.3", JobState.INFERRING)
    before = _job(settings, a).updated_at
    with _statements(settings) as seen:
        views = jobstate.claim_views(settings, [b, taken, 999_999, a, b], "infer")
    assert seen == ["UPDATE"]
    # in the order given, each job once; not ours (running elsewhere, unknown) left out
    assert [v.id for v in views] == [b, a]
    with session_scope(settings.database_url) as session:
        uids = dict(session.exec(select(col(Study.id), col(Study.study_instance_uid))).all())
    for view in views:
        job = _job(settings, view.id)
        assert view == jobstate.JobView(
            id=view.id,
            study_id=job.study_id,
            study_instance_uid=uids[job.study_id],
            state=JobState.INFERRING.value,
            trigger="ingest",
            threshold_version=None,
            supersedes_job_id=None,
        )
        assert job.state == JobState.INFERRING.value and job.updated_at > before
    assert views[0].study_instance_uid == "1.2.9.2"
    # the same answer as claiming and loading apart; a second claim finds nothing
    assert jobstate.load_jobs(settings, [b, a]) == views
    assert jobstate.claim_views(settings, [a, b], "infer") == []
    assert jobstate.claim_views(settings, [], "infer") == []


def test_moves_set_their_extra_fields_in_a_session_or_on_a_connection(
    settings: Settings,
) -> None:
    a = make_job(settings.database_url, "1.2.9.4", JobState.INFERRING)
    b = make_job(settings.database_url, "1.2.9.5", JobState.INFERRING)
    fields: dict[str, Any] = {"model_name": "m", "model_version": "v2", "threshold_version": 7}
    with get_engine(settings.database_url).begin() as conn:
        assert jobstate.finish_all(conn, [a, 999_999], "infer", **fields) == [a]
    with session_scope(settings.database_url) as session:
        assert jobstate.finish_all(session, [a, b], "infer", threshold_version=None) == [b]
    first, second = _job(settings, a), _job(settings, b)
    assert (first.state, first.model_name, first.model_version, first.threshold_version) == (
        JobState.INFERRED.value,
        "m",
        "v2",
        7,
    )
    assert second.state == JobState.INFERRED.value and second.model_name is None
    # a JSON field through the cached statement, and a reason through another
    report = make_job(settings.database_url, "1.2.9.6", JobState.REPORTING)
    summary = {"status": "negative", "images": [{"covid": 0.25}], "outputs": []}
    assert jobstate.finish_timed(settings, report, "report", time.monotonic(), result=summary)
    assert _job(settings, report).result == summary
    assert jobstate.fail(settings, b, "gone", actor="pytest")
    assert (_job(settings, b).state, _job(settings, b).reason) == (JobState.FAILED.value, "gone")


def _result(uid: str, covid: float | None) -> ImageResult:
    source = SourceImageRef(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        series_instance_uid="1.2.9",
        study_instance_uid="1.2",
    )
    result = ImageResult(source=source)
    if covid is not None:
        result.screened = True
        result.probabilities = {"covid": covid, "pneumonia": 0.1, "normal": 1 - covid - 0.1}
        result.covid_positive = covid > 0.5
        result.heatmap_lung_fraction = 0.75
    else:
        result.skip_reason = "lateral"
    return result


def test_image_rows_replace_a_jobs_earlier_rows(settings: Settings) -> None:
    a = make_job(settings.database_url, "1.2.9.7", JobState.INFERRING)
    b = make_job(settings.database_url, "1.2.9.8", JobState.INFERRING)
    save_image_rows(settings, a, [_result("1.1", 0.9), _result("1.2", None)])
    save_image_rows(settings, b, [_result("2.1", 0.2)])
    with _statements(settings) as seen, get_engine(settings.database_url).begin() as conn:
        replace_image_rows(conn, {a: [_result("1.1", 0.3)], b: []})
    assert seen == ["DELETE", "INSERT"]
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(ImageResultRow).order_by(col(ImageResultRow.id))).all()
    got = [(r.job_id, r.sop_instance_uid, r.screened, r.covid, r.covid_positive) for r in rows]
    assert got == [(a, "1.1", True, 0.3, False)]
    assert rows[0].heatmap_lung_fraction == 0.75 and rows[0].normal == 1 - 0.3 - 0.1
