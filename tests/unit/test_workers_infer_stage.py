"""The infer stage on the real models, through the threaded batching consumer on the
embedded broker: engine threads run only engine calls, the glue runs in its pool, a batch
holds several studies in two engine calls, the results file holds only the networks' grid,
and the report stage gets back exactly what the offline pipeline draws."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import col, select

from screener.db.models import AuditLog, InferResult, JobState, ScreeningJob
from screener.db.models import ImageResult as ImageResultRow
from screener.db.session import session_scope
from screener.results import ThresholdInfo
from screener.settings import Settings
from screener.thresholds import active_threshold
from tests.workers_support import make_job, require_models
from workers import result_store, stages
from workers.batching import BatchingConsumer, BatchPolicy
from workers.celery_app import TASK_FOR_QUEUE, create_app


@pytest.fixture(scope="module")
def models() -> Any:
    require_models()
    from screener.screening.models import ScreeningModels

    return ScreeningModels.from_settings(Settings())  # type: ignore[call-arg]


def _state(settings: Settings, job_id: int) -> str:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job.state


def _prepared_jobs(settings: Settings, cxr_dir: Path, tmp_path: Path) -> list[int]:
    """Three studies: PA + lateral, and two single PA images; prepared by the real stage."""
    from screener.testing.dicom_factory import (
        corpus_image,
        make_study,
        pick_images,
        write_datasets,
    )

    frontal = pick_images(cxr_dir, 3, view="PA", split="test")
    lateral = pick_images(cxr_dir, 1, view="LATERAL", split="test")[0]
    jobs = []
    for index, row in enumerate(frontal):
        images: list[tuple[np.ndarray, str | None]] = [(corpus_image(cxr_dir, row["id"]), "PA")]
        if index == 0:
            images.append((corpus_image(cxr_dir, lateral["id"]), "LATERAL"))
        files = write_datasets(make_study(images), tmp_path / f"study-{index}")
        job = make_job(settings.database_url, f"1.2.826.0.1.77.{index}", files=files)
        assert stages.run_prepare(settings, job)
        jobs.append(job)
    return jobs


def test_consumer_runs_the_models_in_stages_and_persists_only_the_grid(
    sqlite_settings: Settings, cxr_dir: Path, tmp_path: Path, models: Any
) -> None:
    from screener.screening.cam import expand_to_display
    from screener.screening.prepare import PreparedImage
    from workers.infer_stage import ScreeningHandler

    settings = sqlite_settings
    jobs = _prepared_jobs(settings, cxr_dir, tmp_path)
    lost = make_job(settings.database_url, "1.2.826.0.1.77.9", JobState.PREPARED)  # no files

    seen: dict[str, set[str]] = {"engine": set(), "plan": set()}
    for engine in (models.segmenter, models.classifier):
        original = engine.infer

        def infer(batch: np.ndarray, original: Any = original) -> Any:
            seen["engine"].add(threading.current_thread().name)
            return original(batch)

        engine.infer = infer
    plan = models.plan

    def traced_plan(*args: Any) -> Any:
        seen["plan"].add(threading.current_thread().name)
        return plan(*args)

    models.plan = traced_plan
    try:
        app = create_app(Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"))  # type: ignore[call-arg]
        for job_id in [*jobs, lost]:
            app.send_task(
                TASK_FOR_QUEUE["infer"], args=[job_id], queue="infer", routing_key="infer"
            )
        handler = ScreeningHandler(settings, models, glue_threads=2)
        # the batch closes when its 4 images are in, however late the last one is admitted
        # (a 1 s wait split it on a loaded machine)
        consumer = BatchingConsumer(app, "infer", handler, BatchPolicy(4, 30.0))
        consumer.run(idle_timeout_s=2.0)
        handler.close()
    finally:
        del models.plan
        for engine in (models.segmenter, models.classifier):
            del engine.infer

    assert [_state(settings, j) for j in jobs] == [JobState.INFERRED.value] * 3
    assert _state(settings, lost) == JobState.QUEUED.value  # inputs gone: prepare again
    with session_scope(settings.database_url) as session:
        recorded = {
            (j.model_name, j.model_version, j.scheme, j.threshold_version, j.threshold_value)
            for j in session.exec(select(ScreeningJob).where(col(ScreeningJob.id).in_(jobs)))
        }
    # what reprocess compares: the scheme and the value applied, not only the versions
    info = models.model_info
    applied = active_threshold(settings, models.manifest)
    assert recorded == {(info.name, info.version, info.scheme, 0, applied.value)}
    assert seen["engine"] == {"infer-segment", "infer-classify"}, seen
    assert seen["plan"] and all(n.startswith("infer-glue") for n in seen["plan"]), seen
    with session_scope(settings.database_url) as session:
        batches = [
            a.detail for a in session.exec(select(AuditLog).where(AuditLog.action == "infer.batch"))
        ]
        rows = session.exec(select(ImageResultRow)).all()
    assert batches and batches[0] is not None
    assert batches[0]["studies"] == 3 and batches[0]["engine_calls"] == 2, batches
    assert len(rows) == 4 and sum(r.screened for r in rows) == 3

    with session_scope(settings.database_url) as session:
        payloads = {r.job_id: r.payload for r in session.exec(select(InferResult))}
    assert sorted(payloads) == sorted(jobs)  # committed with the state, for moved jobs only
    for job_id in jobs:
        assert not (result_store.job_dir(settings, job_id) / "results.bin").exists()
        assert len(payloads[job_id]) < 64_000 * 2  # grid arrays only, never display-size ones
        stored, names = result_store.decode_results(payloads[job_id])
        assert stored.threshold is not None and stored.threshold.version == 0  # what it applied
        for result in stored.images:
            assert result.grid is not None and result.display_image is None
            assert result.grid.lung.dtype == np.uint8 and result.grid.lung.shape == (224, 224)
            if result.screened:
                assert result.grid.cam is not None and result.grid.cam.dtype == np.float16
        # The report stage gets what the offline pipeline produces from the same inputs.
        loaded, _, _ = result_store.load_results(settings, job_id)
        prepared = [
            PreparedImage.load(result_store.prepared_dir(settings, job_id) / n) for n in names
        ]
        offline = models.infer(prepared, ThresholdInfo(0.5))
        for got, want in zip(loaded, offline, strict=True):
            assert got.screened == want.screened and got.view == want.view
            if not want.screened:
                continue
            # the report stage draws from the grid: display image and crop box only
            assert got.display_image is not None and got.grid is not None
            assert got.cam is None and got.lung_mask is None
            assert got.cam_box == want.cam_box
            # ... and brought to display size, the grid gives what the offline path has
            expand_to_display(got, got.display_image)
            expand_to_display(want, want.display_image)
            assert got.probabilities and want.probabilities and got.cam is not None
            assert want.cam is not None
            for name in ("covid", "pneumonia", "normal"):
                assert got.probabilities[name] == pytest.approx(want.probabilities[name], abs=1e-6)
            assert got.heatmap_lung_fraction == pytest.approx(want.heatmap_lung_fraction, abs=1e-5)
            np.testing.assert_array_equal(got.display_image, want.display_image)
            np.testing.assert_array_equal(got.lung_mask, want.lung_mask)
            assert got.cam_box == want.cam_box
            assert got.cam.shape == want.cam.shape
            diff = np.abs(got.cam.astype(np.float32) - want.cam.astype(np.float32))
            assert float(diff.max()) <= 1.5 / 255  # float16 grid: at most one 8-bit level
        expand_to_display(stored.images[0], None)  # no display image: nothing to fill, no error
        assert stored.images[0].cam is None


def test_report_without_readable_results_sends_the_job_back_to_infer(
    sqlite_settings: Settings,
) -> None:
    job = make_job(sqlite_settings.database_url, "1.2.826.0.1.78.1", JobState.INFERRED)
    with pytest.raises(stages.RedoStage) as redo:
        stages.run_report(sqlite_settings, job)
    assert redo.value.stage == "infer"
    assert _state(sqlite_settings, job) == JobState.PREPARED.value
