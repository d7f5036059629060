"""`screener reprocess`: which studies are re-screened, on SQLite and PostgreSQL.

The full path (re-screen through the queues, new SR referencing the previous one, new
threshold in the SR) is in test_workers_pipeline.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select
from typer.testing import CliRunner

from engines.manifest import SHIPPED_WEIGHTS_DIR
from screener.cli import app
from screener.db.models import JobState, ScreeningJob, Study
from screener.db.session import session_scope
from screener.reprocess import Screening, decide, plan_reprocess, queue_reprocess
from screener.settings import Settings
from screener.thresholds import active_threshold, set_threshold
from tests.workers_support import make_job

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _study(settings: Settings, uid: str, received: datetime, state: JobState, **job: object) -> int:
    job_id = make_job(settings.database_url, uid, state)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Study)
            .where(col(Study.study_instance_uid) == uid)
            .values(first_received_at=received, last_received_at=received)
        )
        if job:
            session.execute(
                update(ScreeningJob).where(col(ScreeningJob.id) == job_id).values(**job)
            )
    return job_id


def _delivered(screened: Screening) -> ScreeningJob:
    """A delivered job that recorded ``screened``."""
    return ScreeningJob(
        study_id=1,
        state="delivered",
        model_name=screened.model_name,
        model_version=screened.model_version,
        scheme=screened.scheme,
        threshold_version=screened.threshold_version,
        threshold_value=screened.threshold_value,
    )


def test_decide_rules() -> None:
    now = Screening("cxr", "1", "crop", 2, 0.25)
    done = _delivered(now)
    assert decide(None, now, force=False) == ("rescreen", "never screened")
    assert decide(done, now, force=False) == ("unchanged", "")
    assert decide(done, now, force=True) == ("rescreen", "forced")
    assert decide(done, replace(now, model_version="2"), force=False) == (
        "rescreen",
        "model version 1 -> 2",
    )
    assert decide(done, replace(now, threshold_version=3), force=False)[0] == "rescreen"
    running = ScreeningJob(study_id=1, state="inferring", model_version="1", threshold_version=2)
    assert decide(running, now, force=True) == ("in_progress", "")
    failed = ScreeningJob(study_id=1, state="failed", model_version="1", threshold_version=2)
    assert decide(failed, now, force=False) == ("rescreen", "last job failed")


def test_decide_sees_what_model_version_and_threshold_version_do_not_say() -> None:
    """Another model under the same version, another classifier scheme, or a pinned
    version-0 value: the outputs change although model version and threshold version do
    not (before: every study "unchanged", the switch never reached the PACS)."""
    now = Screening("cxr", "1", "crop", 0, 0.1237)
    done = _delivered(now)
    assert decide(done, now, force=False) == ("unchanged", "")
    assert decide(done, replace(now, scheme="segment"), force=False) == (
        "rescreen",
        "scheme crop -> segment",
    )
    assert decide(done, replace(now, model_name="other"), force=False) == (
        "rescreen",
        "model cxr -> other",
    )
    assert decide(done, replace(now, threshold_value=0.2), force=False) == (
        "rescreen",
        "threshold 0.1237 -> 0.2",
    )
    # rows from before revision 0007 (no scheme, no value): judged by what they record
    legacy = ScreeningJob(
        study_id=1, state="delivered", model_name="cxr", model_version="1", threshold_version=0
    )
    assert decide(legacy, replace(now, scheme="segment"), force=False) == ("unchanged", "")


def test_plan_window_filter_and_queue(settings: Settings) -> None:
    model = ("cxr", "1.0.0")
    old = _study(
        settings,
        "1.9.1",
        T0 - timedelta(days=10),
        JobState.DELIVERED,
        model_version="1.0.0",
        threshold_version=0,
    )
    in_window = _study(
        settings,
        "1.9.2",
        T0 + timedelta(hours=1),
        JobState.DELIVERED,
        model_version="0.9.0",
        threshold_version=0,
    )
    same = _study(
        settings,
        "1.9.3",
        T0 + timedelta(hours=2),
        JobState.DELIVERED,
        model_version="1.0.0",
        threshold_version=0,
    )
    busy = _study(settings, "1.9.4", T0 + timedelta(hours=3), JobState.REPORTING)
    later = _study(settings, "1.9.5", T0 + timedelta(days=5), JobState.FAILED)

    plan = plan_reprocess(settings, T0, T0 + timedelta(days=1), model=model)
    actions = {i.study_instance_uid: i.action for i in plan.items}
    assert actions == {"1.9.2": "rescreen", "1.9.3": "unchanged", "1.9.4": "in_progress"}
    assert plan.threshold_version == 0

    # A new threshold makes every finished study in the window due again.
    set_threshold(settings, 0.3, reason="test")
    plan = plan_reprocess(settings, T0, T0 + timedelta(days=1), model=model)
    assert {i.study_instance_uid: i.action for i in plan.items}["1.9.3"] == "rescreen"

    only = plan_reprocess(settings, T0, None, studies=["1.9.5"], model=model)
    assert [(i.study_instance_uid, i.previous_job_id) for i in only.items] == [("1.9.5", later)]

    created = queue_reprocess(settings, plan)
    assert set(created) == {"1.9.2", "1.9.3"}
    with session_scope(settings.database_url) as session:
        new = session.exec(
            select(ScreeningJob).where(col(ScreeningJob.id).in_(list(created.values())))
        ).all()
    assert {j.supersedes_job_id for j in new} == {in_window, same}
    assert {(j.state, j.trigger) for j in new} == {("queued", "reprocess")}
    assert old not in {j.supersedes_job_id for j in new} and busy not in created.values()


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    # the shipped manifest (thresholds come from it), renamed: a model the DB has not seen
    shipped = json.loads((SHIPPED_WEIGHTS_DIR / "model.json").read_text())
    shipped.update(name="cxr-test", version="9.9")
    (directory / "model.json").write_text(json.dumps(shipped))
    monkeypatch.setenv("SCREENER_MODEL__MODEL_DIR", str(directory))
    return directory


def test_cli_dry_run_changes_nothing_then_queues(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    _study(sqlite_settings, "1.8.1", T0, JobState.DELIVERED, model_version="1", threshold_version=0)
    runner = CliRunner()
    args = ["reprocess", "--since", "2026-03-01", "--until", "2026-03-02", "--json"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["model"] == "cxr-test@9.9"
    assert [(s["study_instance_uid"], s["action"], s["job_id"]) for s in report["studies"]] == [
        ("1.8.1", "rescreen", None)
    ]
    with session_scope(sqlite_settings.database_url) as session:
        assert len(session.exec(select(ScreeningJob)).all()) == 1

    real = runner.invoke(app, args)
    assert real.exit_code == 0, real.output
    job_id = json.loads(real.stdout)["studies"][0]["job_id"]
    with session_scope(sqlite_settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None and job.trigger == "reprocess" and job.state == "queued"

    bad = runner.invoke(app, ["reprocess", "--since", "yesterday"])
    assert bad.exit_code == 2


def test_cli_names_a_study_uid_it_did_not_find(sqlite_settings: Settings, model_dir: Path) -> None:
    """A mistyped --study printed an empty plan and exit 0: "nothing to do"."""
    _study(sqlite_settings, "1.8.1", T0, JobState.DELIVERED, model_version="1", threshold_version=0)
    runner = CliRunner()
    args = ["reprocess", "--since", "2026-03-01", "--until", "2026-03-02", "--dry-run"]
    found = runner.invoke(app, [*args, "--study", "1.8.1", "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout)["not_found"] == []
    typo = runner.invoke(app, [*args, "--study", "1.8.1", "--study", "1.8.9", "--json"])
    assert typo.exit_code == 1, typo.output
    report = json.loads(typo.stdout)
    assert report["not_found"] == ["1.8.9"]
    assert [s["study_instance_uid"] for s in report["studies"]] == ["1.8.1"]  # the rest planned
    text = runner.invoke(app, [*args, "--study", "1.8.9"])
    assert text.exit_code == 1 and "not found: 1.8.9" in text.output


def test_overlapping_runs_queue_a_study_once(settings: Settings) -> None:
    """Two ``reprocess`` runs planned before either queued: the second finds the study's
    latest job changed and leaves it (it queued a second job superseding the same one)."""
    model = ("cxr", "1.0.0")
    first = _study(settings, "1.9.7", T0, JobState.FAILED, model_version="1.0.0")
    plans = [plan_reprocess(settings, T0, None, model=model) for _ in range(2)]
    assert [i.action for p in plans for i in p.items] == ["rescreen", "rescreen"]
    created = [queue_reprocess(settings, p) for p in plans]
    assert len(created[0]) == 1 and created[1] == {}
    with session_scope(settings.database_url) as session:
        jobs = session.exec(select(ScreeningJob).order_by(col(ScreeningJob.id))).all()
    assert [(j.state, j.supersedes_job_id) for j in jobs] == [
        ("failed", None),
        ("queued", first),
    ]


def test_switching_the_scheme_re_screens_and_says_why(settings: Settings) -> None:
    """The site switched ``model.scheme`` (same model version, threshold version 0): every
    study screened with the other classifier is due again, and the plan says why."""
    model = ("cxr", "1.0.0")
    _study(
        settings,
        "1.9.7",
        T0 + timedelta(hours=1),
        JobState.DELIVERED,
        model_name="cxr",
        model_version="1.0.0",
        scheme="crop",
        threshold_version=0,
        threshold_value=active_threshold(settings).value,
    )
    plan = plan_reprocess(settings, T0, None, model=model)
    assert [(i.action, i.why) for i in plan.items] == [("unchanged", "")]

    switched = settings.model_copy(
        update={"model": settings.model.model_copy(update={"scheme": "segment"})}
    )
    [item] = plan_reprocess(switched, T0, None, model=model).items
    assert item.action == "rescreen" and item.why.startswith("scheme crop -> segment"), item
    assert item.to_json()["why"] == item.why
