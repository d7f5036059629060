"""Swapping models: a new manifest brings its own threshold (not the shipped model's
configured one), a running infer worker keeps applying the threshold of the networks it
loaded (an export into the live folder does not mix models and thresholds, infer and
report), and a network that is not the one its manifest describes is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest
from engines.model_card import shipped_threshold
from screener.db.models import JobState, ScreeningJob
from screener.db.session import session_scope
from screener.screening.models import ScreeningModels
from screener.settings import Settings
from screener.thresholds import active_threshold, embedded_info
from tests.workers_support import require_models

NETWORKS = ("segmenter.onnx", "classifier-crop.onnx", "classifier-segment.onnx")


def _model_dir(tmp_path: Path, **changes: Any) -> Path:
    """The shipped networks (linked, not copied) under a manifest with ``changes``."""
    require_models()
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in NETWORKS:
        (folder / name).symlink_to(SHIPPED_WEIGHTS_DIR / name)
    manifest = json.loads((SHIPPED_WEIGHTS_DIR / "model.json").read_text())
    manifest.update(changes)
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


def _new_version(folder: Path, version: str, crop_threshold: float) -> None:
    """What `screener export` into the live folder leaves: a new version, its own point."""
    manifest = json.loads((folder / "model.json").read_text())
    manifest["version"] = version
    manifest["thresholds"]["crop"] = crop_threshold
    manifest["operating_points"]["crop"]["threshold"] = crop_threshold
    (folder / "model.json").write_text(json.dumps(manifest))


def test_a_swapped_model_is_judged_at_its_own_operating_point(tmp_path: Path) -> None:
    """The configured threshold.default_value (0.1237) used to judge every model."""
    folder = _model_dir(tmp_path)
    _new_version(folder, "2.0.0", 0.61234)
    settings = Settings(data_dir=tmp_path / "data")
    settings.model.model_dir = str(folder)
    info = embedded_info(settings)
    assert info.value == shipped_threshold(0.61234) == 0.6123
    assert "@2.0.0" in info.operating_point and "specificity" in info.operating_point
    assert "configured by this site" not in info.operating_point
    settings.threshold.default_value = 0.5  # a site that pins its own value keeps it
    pinned = embedded_info(settings)
    assert pinned.value == 0.5 and "operating point not measured" in pinned.operating_point


def test_a_running_worker_keeps_its_networks_threshold_through_report(
    sqlite_settings: Settings, cxr_dir: Path, tmp_path: Path
) -> None:
    from tests.unit.test_workers_infer_stage import _prepared_jobs
    from workers import stages
    from workers.batching import BatchingConsumer, BatchPolicy
    from workers.celery_app import TASK_FOR_QUEUE, create_app
    from workers.infer_stage import ScreeningHandler

    settings = sqlite_settings
    folder = _model_dir(tmp_path)
    settings.model.model_dir = str(folder)
    models = ScreeningModels.from_settings(settings)
    loaded = embedded_info(settings)
    jobs = _prepared_jobs(settings, cxr_dir, tmp_path)

    _new_version(folder, "9.0.0", 0.99)  # exported into the live folder while running
    assert active_threshold(settings).value == shipped_threshold(0.99)  # what disk says now
    assert active_threshold(settings, models.manifest) == loaded  # what the networks go with

    app = create_app(Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"))  # type: ignore[call-arg]
    for job_id in jobs:
        app.send_task(TASK_FOR_QUEUE["infer"], args=[job_id], queue="infer", routing_key="infer")
    handler = ScreeningHandler(settings, models, glue_threads=1)
    BatchingConsumer(app, "infer", handler, BatchPolicy(8, 1.0)).run(idle_timeout_s=2.0)
    handler.close()
    for job_id in jobs:
        assert stages.run_report(settings, job_id)
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(ScreeningJob).where(ScreeningJob.state == JobState.REPORTED))
        results = [job.result for job in rows]
    assert len(results) == len(jobs)
    for result in results:
        assert result is not None
        assert result["threshold"] == loaded.value != shipped_threshold(0.99)
        assert "@1.3.0" in result["operating_point"] and "@9.0.0" not in result["operating_point"]


def test_a_network_that_is_not_the_manifests_is_refused(tmp_path: Path) -> None:
    """Another file under the manifest's name was reported under its name, calibration and
    threshold; an input size this version does not build failed every study."""
    folder = _model_dir(tmp_path)
    (folder / "classifier-crop.onnx").unlink()
    (folder / "classifier-crop.onnx").symlink_to(SHIPPED_WEIGHTS_DIR / "classifier-segment.onnx")
    settings = Settings(data_dir=tmp_path / "data")
    settings.model.model_dir = str(folder)
    with pytest.raises(ValueError, match="is not the network .*@1.3.0 describes"):
        ScreeningModels.from_settings(settings)
    ScreeningModels.from_settings(settings, scheme="segment")  # the rest still loads

    other = tmp_path / "other"
    other.mkdir()
    wider = _model_dir(other, input_shape=[1, 256, 256])
    settings.model.model_dir = str(wider)
    with pytest.raises(ValueError, match=r"this version builds \(1, 224, 224\)"):
        ScreeningModels.from_settings(settings)
    assert load_manifest(wider).input_shape == (1, 256, 256)
    shutil.rmtree(other)
