"""Retention: delivered outputs pruned after ``retention.outputs_days`` and never before
every destination acknowledged them; the spool kept unless ``retention.spool_days`` is set;
``reprocess`` names the studies whose images were pruned. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select
from typer.testing import CliRunner

from screener.db.models import (
    AuditLog,
    Delivery,
    DeliveryState,
    InferResult,
    JobState,
    OutputObject,
    ScreeningJob,
    Study,
    utcnow,
)
from screener.db.session import session_scope
from screener.delivery import record_outputs
from screener.reports.writer import write_study_outputs
from screener.reprocess import plan_reprocess
from screener.retention import prune
from screener.settings import Destination, Settings
from tests.report_results import make_job, make_result
from tests.workers_support import make_job as make_study_job

PACS_A = Destination(ae_title="PACSA", host="127.0.0.1", port=11001)
PACS_B = Destination(ae_title="PACSB", host="127.0.0.1", port=11002)
MODEL = ("cxr-test", "9.9")


def _with(settings: Settings, *destinations: Destination, **retention: float) -> Settings:
    return settings.model_copy(
        update={
            "delivery": settings.delivery.model_copy(update={"destinations": list(destinations)}),
            "retention": settings.retention.model_copy(update=retention),
        }
    )


def _study_outputs(tmp_path: Path, s: Settings, name: str) -> tuple[int, list[Path]]:
    result, _ = make_result(tmp_path / name, ["PA"], scores=[0.7])
    paths = write_study_outputs(result, s.outbox_dir / name, s)
    job_id = make_job(s, result.study_instance_uid)
    record_outputs(s, job_id, paths)
    return job_id, paths


def _set_deliveries(s: Settings, job_id: int, state: str, days_ago: float, dest: str = "") -> None:
    """Pretend the job's deliveries (to ``dest``, or all) reached ``state`` days ago."""
    when = utcnow() - timedelta(days=days_ago)
    with session_scope(s.database_url) as session:
        outputs = session.exec(select(OutputObject.id).where(OutputObject.job_id == job_id)).all()
        query = update(Delivery).where(col(Delivery.output_id).in_(list(outputs)))
        if dest:
            query = query.where(col(Delivery.destination) == dest)
        delivered_at = when if state == DeliveryState.DELIVERED.value else None
        session.execute(query.values(state=state, delivered_at=delivered_at, updated_at=when))


def _pruned(s: Settings, job_id: int) -> list[bool]:
    with session_scope(s.database_url) as session:
        rows = session.exec(select(OutputObject).where(OutputObject.job_id == job_id)).all()
        return [r.pruned_at is not None for r in rows]


def test_only_outputs_delivered_everywhere_and_old_enough_are_pruned(
    tmp_path: Path, settings: Settings
) -> None:
    s = _with(settings, PACS_A, PACS_B, outputs_days=30)
    old, old_paths = _study_outputs(tmp_path, s, "old")
    _set_deliveries(s, old, DeliveryState.DELIVERED.value, 31)
    recent, recent_paths = _study_outputs(tmp_path, s, "recent")
    _set_deliveries(s, recent, DeliveryState.DELIVERED.value, 29)
    half, half_paths = _study_outputs(tmp_path, s, "half")  # PACSB still retrying
    _set_deliveries(s, half, DeliveryState.DELIVERED.value, 60, dest=PACS_A.name)
    _set_deliveries(s, half, DeliveryState.RETRYING.value, 60, dest=PACS_B.name)
    dead, dead_paths = _study_outputs(tmp_path, s, "dead")
    _set_deliveries(s, dead, DeliveryState.DEAD.value, 90)
    waiting, waiting_paths = _study_outputs(tmp_path, s, "pending")  # never attempted
    nowhere_s = _with(settings, outputs_days=30)  # no destination: the only copy
    nowhere, nowhere_paths = _study_outputs(tmp_path, nowhere_s, "nowhere")

    dry = prune(s, dry_run=True)
    assert sorted(dry.outputs) == sorted(str(p) for p in old_paths)
    assert all(p.exists() for p in old_paths) and _pruned(s, old) == [False, False]

    report = prune(s)
    assert sorted(report.outputs) == sorted(str(p) for p in old_paths)
    assert report.bytes_freed > 0
    assert not any(p.exists() for p in old_paths)
    assert not (s.outbox_dir / "old").exists()  # its empty folder went too
    assert _pruned(s, old) == [True, True]
    for paths in (recent_paths, half_paths, dead_paths, waiting_paths, nowhere_paths):
        assert all(p.exists() for p in paths)
    for job in (recent, half, dead, waiting, nowhere):
        assert not any(_pruned(s, job))
    assert prune(s).outputs == []  # idempotent

    keep_all = _with(s, PACS_A, PACS_B, outputs_days=0)  # 0 = keep forever
    _set_deliveries(s, recent, DeliveryState.DELIVERED.value, 400)
    assert prune(keep_all).outputs == []
    assert all(p.exists() for p in recent_paths)


def _spool_study(s: Settings, uid: str, state: JobState, days_ago: float) -> list[Path]:
    folder = s.spool_dir / uid
    folder.mkdir(parents=True)
    files = [folder / f"{i}.dcm" for i in range(2)]
    for f in files:
        f.write_bytes(b"\0" * 1000)
    make_study_job(s.database_url, uid, state, files=files)
    when = utcnow() - timedelta(days=days_ago)
    with session_scope(s.database_url) as session:
        session.execute(
            update(Study)
            .where(col(Study.study_instance_uid) == uid)
            .values(first_received_at=when, last_received_at=when)
        )
    return files


def test_spool_is_kept_by_default_and_reprocess_names_pruned_studies(
    tmp_path: Path, settings: Settings
) -> None:
    s = _with(settings, spool_days=0)
    old = _spool_study(s, "1.7.1", JobState.DELIVERED, 20)
    busy = _spool_study(s, "1.7.2", JobState.INFERRING, 20)
    fresh = _spool_study(s, "1.7.3", JobState.DELIVERED, 2)
    outside = tmp_path / "elsewhere.dcm"  # a row pointing outside the spool is never touched
    outside.write_bytes(b"x")
    make_study_job(s.database_url, "1.7.4", JobState.DELIVERED, files=[outside])
    assert prune(s).spool == []  # default: keep (reprocess re-screens from the spool)

    s10 = _with(settings, spool_days=10)
    assert prune(s10, dry_run=True).studies == ["1.7.1"] and all(p.exists() for p in old)
    report = prune(s10)
    assert report.studies == ["1.7.1"] and len(report.spool) == 2
    assert not any(p.exists() for p in old) and not (s.spool_dir / "1.7.1").exists()
    assert all(p.exists() for p in busy + fresh) and outside.exists()

    since = utcnow() - timedelta(days=30)
    plan = plan_reprocess(s10, since, force=True, model=MODEL)
    actions = {i.study_instance_uid: i.action for i in plan.items}
    assert actions["1.7.1"] == "images_pruned"
    assert actions["1.7.2"] == "in_progress" and actions["1.7.3"] == "rescreen"
    assert plan.images_pruned == ["1.7.1"]


def test_cli_prune_dry_run_and_json(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from screener.cli import app
    from screener.settings import get_settings

    s = _with(settings, PACS_A)
    job, paths = _study_outputs(tmp_path, s, "cli")
    _set_deliveries(s, job, DeliveryState.DELIVERED.value, 45)
    monkeypatch.setenv("SCREENER_DATABASE_URL", s.database_url)
    monkeypatch.setenv("SCREENER_DATA_DIR", str(s.data_dir))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        dry = runner.invoke(app, ["retention", "prune", "--dry-run", "--json"])
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout)["outputs"] == len(paths) and all(p.exists() for p in paths)
        real = runner.invoke(app, ["retention", "prune"])
        assert real.exit_code == 0, real.output
        assert "removed 2 delivered outputs" in real.stdout
        assert not any(p.exists() for p in paths)
    finally:
        get_settings.cache_clear()


def test_the_sweep_prunes(tmp_path: Path, settings: Settings) -> None:
    from workers.reconciler import sweep_once

    s = _with(settings, PACS_A)
    job, paths = _study_outputs(tmp_path, s, "swept")
    _set_deliveries(s, job, DeliveryState.DELIVERED.value, 31)
    s = _with(settings, outputs_days=30)  # nothing to send: only the pruning acts
    assert sweep_once(s, prune=False).pruned_outputs == 0
    assert sweep_once(s, prune=True).pruned_outputs == len(paths)
    assert not any(p.exists() for p in paths)


def test_infer_results_of_ended_jobs_are_dropped_and_waiting_ones_kept(settings: Settings) -> None:
    from workers import result_store

    ended = make_study_job(settings.database_url, "1.2.826.0.1.81.1", JobState.FAILED)
    waiting = make_study_job(settings.database_url, "1.2.826.0.1.81.2", JobState.INFERRED)
    with session_scope(settings.database_url) as session:
        result_store.insert_results(session.connection(), {ended: b"ended", waiting: b"first run"})
    with session_scope(settings.database_url) as session:  # inferred again: replaced
        result_store.insert_results(session.connection(), {waiting: b"waiting"})

    assert prune(settings, dry_run=True).infer_results == 1
    assert prune(settings).to_json()["infer_results"] == 1
    with session_scope(settings.database_url) as session:
        left = {r.job_id: r.payload for r in session.exec(select(InferResult))}
    assert left == {waiting: b"waiting"}
    assert prune(settings).infer_results == 0


def _job_state(s: Settings, job_id: int, state: JobState) -> None:
    with session_scope(s.database_url) as session:
        session.execute(
            update(ScreeningJob).where(col(ScreeningJob.id) == job_id).values(state=state.value)
        )


def _age(paths: list[Path], hours: float) -> None:
    when = time.time() - hours * 3600
    for path in paths:
        os.utime(path, (when, when))


def test_outbox_files_no_row_names_in_folders_of_ended_jobs_are_removed(
    tmp_path: Path, settings: Settings
) -> None:
    s = _with(settings, PACS_A, outputs_days=0)  # keep delivered outputs forever
    result, _ = make_result(tmp_path / "study", ["PA"], scores=[0.7])
    first = make_job(s, result.study_instance_uid)
    old = write_study_outputs(result, s.outbox_dir / f"job-{first}", s)
    record_outputs(s, first, old)
    _job_state(s, first, JobState.DELIVERED)
    with session_scope(s.database_url) as session:  # an identical re-screen of the study
        study_id = session.exec(select(ScreeningJob.study_id)).first()
        again = ScreeningJob(study_id=study_id or 0, state=JobState.DELIVERED.value)
        session.add(again)
        session.flush()
        second = int(again.id or 0)
    new = write_study_outputs(result, s.outbox_dir / f"job-{second}", s)
    record_outputs(s, second, new)  # the same SOP Instance UIDs: the rows now name `new`
    assert sorted(p.name for p in old) == sorted(p.name for p in new)

    failed = make_job(s, "1.2.826.0.1.82.1")  # its report wrote, then the job failed
    _job_state(s, failed, JobState.FAILED)
    unrecorded = s.outbox_dir / f"job-{failed}" / "sr_1.2.3.dcm"
    fresh = s.outbox_dir / f"job-{failed}" / "sr_1.2.4.dcm"  # younger than the grace
    running = make_job(s, "1.2.826.0.1.82.2")  # still in its report stage
    writing = s.outbox_dir / f"job-{running}" / "sr_1.2.5.dcm"
    foreign = s.outbox_dir / "by-hand" / "note.dcm"  # not a job folder: never touched
    unknown = s.outbox_dir / "job-999999" / "sr_1.2.6.dcm"  # no such job here
    for path in (unrecorded, fresh, writing, foreign, unknown):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 100)
    _age([*old, *new, unrecorded, writing, foreign, unknown], hours=2)

    dry = prune(s, dry_run=True)
    assert sorted(dry.orphaned) == sorted(map(str, [*old, unrecorded]))
    assert all(p.exists() for p in old) and unrecorded.exists()

    report = prune(s)
    assert sorted(report.orphaned) == sorted(map(str, [*old, unrecorded]))
    assert report.to_json()["orphaned_outputs"] == len(old) + 1
    assert report.outputs == [] and report.bytes_freed > 0
    assert not (s.outbox_dir / f"job-{first}").exists()  # its empty folder went too
    assert all(p.exists() for p in new)
    for kept in (fresh, writing, foreign, unknown):
        assert kept.exists()
    with session_scope(s.database_url) as session:
        rows = session.exec(select(OutputObject)).all()
        assert sorted(Path(r.file_path).name for r in rows) == sorted(p.name for p in new)
        assert all(r.job_id == second and Path(r.file_path).is_file() for r in rows)
        audit = session.exec(select(AuditLog).where(AuditLog.action == "retention.pruned")).one()
        assert audit.detail["orphaned_outputs"] == len(old) + 1
    assert prune(s).orphaned == []  # idempotent
