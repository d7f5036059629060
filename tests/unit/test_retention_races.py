"""Retention against what happens between its listing and its deleting: a late image that
re-opens a study keeps its files, and an output row re-pointed by an identical re-screen
keeps its new file and stays unpruned. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import select

from screener import retention
from screener.db.models import Delivery, JobState, OutputObject, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.delivery import record_outputs
from screener.ingest import record_instance
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings
from tests.report_results import make_job, make_result
from tests.unit.test_ingest import STUDY, as_received, header
from tests.workers_support import make_job as make_study_job


def _with(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"retention": settings.retention.model_copy(update=changes)})


def test_a_late_image_arriving_while_the_spool_is_pruned_keeps_its_file(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _with(settings, spool_days=10)
    folder = s.spool_dir / STUDY
    folder.mkdir(parents=True)
    old = [folder / f"{i}.dcm" for i in range(2)]
    for f in old:
        f.write_bytes(b"\0" * 1000)
    make_study_job(s.database_url, STUDY, JobState.DELIVERED, files=old)
    with session_scope(s.database_url) as session:  # quiet for 20 days
        session.execute(update(Study).values(last_received_at=utcnow() - timedelta(days=20)))

    late = folder / "late.dcm"
    listed = retention.prunable_studies

    def listed_then_a_late_image(settings: Settings, now: datetime) -> list[tuple[int, str]]:
        studies = listed(settings, now)
        late.write_bytes(b"late image")  # the listener stores and records it meanwhile
        record_instance(s.database_url, header(STUDY + ".9.9"), as_received(b"late", str(late)))
        return studies

    monkeypatch.setattr(retention, "prunable_studies", listed_then_a_late_image)
    report = retention.prune(s)

    assert report.studies == [] and report.spool == []
    assert late.exists() and all(f.exists() for f in old)
    with session_scope(s.database_url) as session:
        assert session.exec(select(Study)).one().is_complete is False


def test_an_output_rewritten_by_a_rescreen_while_pruning_is_kept(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _with(settings, outputs_days=30).model_copy(
        update={
            "delivery": settings.delivery.model_copy(
                update={"destinations": [Destination(ae_title="PACSA", host="127.0.0.1", port=1)]}
            )
        }
    )
    result, _ = make_result(tmp_path / "study", ["PA"], scores=[0.7])
    first = make_job(s, result.study_instance_uid)
    record_outputs(s, first, write_study_outputs(result, s.outbox_dir / f"job-{first}", s))
    when = utcnow() - timedelta(days=31)
    with session_scope(s.database_url) as session:
        session.execute(update(Delivery).values(state="delivered", delivered_at=when))
        job = session.get(ScreeningJob, first)
        assert job is not None
        again = ScreeningJob(study_id=job.study_id)
        session.add(again)
        session.flush()
        second = int(again.id or 0)

    rewritten: list[Path] = []
    listed = retention.prunable_outputs

    def listed_then_rescreened(settings: Settings, now: datetime) -> list[tuple[int, str]]:
        outputs = listed(settings, now)
        # an identical re-screen reports meanwhile: same SOP Instance UIDs, new files
        rewritten.extend(write_study_outputs(result, s.outbox_dir / f"job-{second}", s))
        record_outputs(s, second, rewritten)
        return outputs

    monkeypatch.setattr(retention, "prunable_outputs", listed_then_rescreened)
    report = retention.prune(s)

    assert report.outputs == []
    assert rewritten and all(p.exists() for p in rewritten)
    with session_scope(s.database_url) as session:
        rows = session.exec(select(OutputObject)).all()
        assert rows and all(r.pruned_at is None and r.job_id == second for r in rows)
