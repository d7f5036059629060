"""The whole service through Celery workers started as subprocesses, with real peers:
Orthanc (the PACS) -> listener -> prepare / infer (batching) / report / deliver workers on
real Redis and PostgreSQL -> SR and heatmaps back in Orthanc.

One scenario in steps (the machine has 2 cores; the models load once per worker):
1. four studies at once: all screened and delivered, with at least one engine batch that
   holds several studies;
2. the infer worker is killed with SIGKILL in the middle of a batch, then restarted: every
   study is screened and delivered exactly once;
3. the broker's Redis database is flushed mid-run: the reconciler re-sends the lost work;
4. a new threshold, then ``reprocess``: the new SR carries the new threshold and version
   and references the previous SR.
"""

from __future__ import annotations

import io
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlmodel import col, select

from screener.db.models import AuditLog, JobState, ScreeningJob, Study, utcnow
from screener.db.session import session_scope
from screener.settings import Destination, Settings
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_study,
    pick_images,
    write_datasets,
)
from tests.orthanc import OrthancServer, orthanc_available
from tests.workers_support import (
    fresh_redis,
    redis_url,
    require_models,
    screener_cmd,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed"),
]


class Service:
    """Listener + reconciler in this process, workers as subprocesses (as in production)."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        from workers.runner import child_env

        self.settings = settings
        self.logs = logs
        self.env = child_env(settings)
        self.workers: dict[str, Any] = {}
        self.stop_event = threading.Event()

    def start_worker(self, name: str, queues: str) -> None:
        self.workers[name] = start_process(
            screener_cmd("worker", "--queues", queues, "-c", "1", "-P", "solo"),
            self.env,
            self.logs / f"{name}.log",
        )

    def start(self) -> None:
        from screener.dicom.listener import start_listener
        from workers.runner import run_reconciler_loop

        self.listener = start_listener(self.settings, block=False, assemble=True)
        self.start_worker("cpu", "prepare,report,deliver")
        self.start_worker("infer", "infer")
        self.reconciler = threading.Thread(
            target=run_reconciler_loop,
            args=(self.settings, self.stop_event),
            kwargs={"assemble": False},
            daemon=True,
        )
        self.reconciler.start()

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.workers.values():
            stop_process(proc)
        self.listener.stop(drain_seconds=2)
        self.reconciler.join(10)


@pytest.fixture
def pipeline(
    tmp_path: Path, db_url: str, cxr_dir: Path
) -> Iterator[tuple[Service, OrthancServer, Settings]]:
    model_dir = require_models()
    fresh_redis("e2e")
    pacs = OrthancServer(tmp_path)
    settings = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url=redis_url("e2e"),
        study_quiet_seconds=1.0,
    )
    settings.listener.port = 0
    settings.listener.allowed_calling_ae_titles = ["ORTHANC"]
    settings.model.model_dir = model_dir
    settings.model.max_batch = 8
    # long enough to gather several studies in one batch even when the 2 cores are busy
    # (prepare runs with concurrency 1, so studies reach infer one after another)
    settings.model.max_wait_ms = 5000
    settings.reconciler.stale_seconds = 4
    settings.reconciler.interval_seconds = 1
    settings.reconciler.max_attempts = 5
    settings.delivery.backoff_seconds = 0.5
    settings.delivery.destinations = [
        Destination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
    ]
    settings.ensure_dirs()
    service = Service(settings, tmp_path)
    service.start()
    pacs.modalities["SCREENER"] = ("SCREENER", "127.0.0.1", service.listener.port)
    pacs.start()
    try:
        yield service, pacs, settings
    finally:
        service.stop()
        pacs.stop()
        fresh_redis("e2e")


def _upload_studies(
    pacs: OrthancServer, cxr_dir: Path, tmp_path: Path, n: int, seed: int
) -> dict[str, list[str]]:
    """n single-image frontal studies (the first one with a second, lateral-tagged image)."""
    pool = pick_images(cxr_dir, 14, view="PA", split="test")
    rows = pool[4 * seed : 4 * seed + n]
    lateral = pick_images(cxr_dir, 1, view="LATERAL", split="test")[0]
    studies: dict[str, list[str]] = {}
    for index in range(n):
        images: list[tuple[np.ndarray, str | None]] = [
            (corpus_image(cxr_dir, rows[index]["id"]), "PA")
        ]
        if index == 0:  # a real lateral radiograph beside the frontal one
            images.append((corpus_image(cxr_dir, lateral["id"]), "LATERAL"))
        identity = StudyIdentity.new()
        datasets = make_study(images, study=identity)
        paths = write_datasets(datasets, tmp_path / f"upload-{seed}-{index}")
        studies[identity.study_instance_uid] = [pacs.upload(p) for p in paths]
    return studies


def _send(pacs: OrthancServer, studies: dict[str, list[str]]) -> None:
    ids = [i for instance_ids in studies.values() for i in instance_ids]
    pacs.send_to_modality("SCREENER", ids)


def _jobs(settings: Settings, uids: list[str]) -> dict[str, list[ScreeningJob]]:
    with session_scope(settings.database_url) as session:
        out: dict[str, list[ScreeningJob]] = {}
        for study in session.exec(select(Study).where(col(Study.study_instance_uid).in_(uids))):
            out[study.study_instance_uid] = list(
                session.exec(
                    select(ScreeningJob)
                    .where(ScreeningJob.study_id == study.id)
                    .order_by(col(ScreeningJob.id))
                )
            )
        return out


def _all_delivered(settings: Settings, uids: list[str], jobs_per_study: int = 1) -> bool:
    jobs = _jobs(settings, uids)
    return len(jobs) == len(uids) and all(
        len(js) == jobs_per_study and js[-1].state == JobState.DELIVERED.value
        for js in jobs.values()
    )


def _srs(pacs: OrthancServer, uid: str) -> list[pydicom.Dataset]:
    ids = pacs.find_instances(StudyInstanceUID=uid, Modality="SR")
    return [pydicom.dcmread(io.BytesIO(pacs.instance_file(i))) for i in ids]


def _scs(pacs: OrthancServer, uid: str) -> list[str]:
    return [
        i
        for i in pacs.find_instances(StudyInstanceUID=uid)
        if pacs.instance_tags(i).get("SOPClassUID", "").startswith("1.2.840.10008.5.1.4.1.1.7")
    ]


def _sr_text(ds: pydicom.Dataset) -> str:
    """Every text, numeric and code meaning in the SR content tree, for assertions."""
    parts: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            for keyword in ("TextValue", "UID", "DateTime"):
                if keyword in item:
                    parts.append(str(item.get(keyword)))
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in item.get(seq, []):
                    parts.append(str(code.CodeMeaning))
            for measured in item.get("MeasuredValueSequence", []):
                parts.append(str(measured.NumericValue))
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return "\n".join(parts)


def _pids_in_state(settings: Settings, state: JobState) -> list[int]:
    with session_scope(settings.database_url) as session:
        return [
            int(j)
            for j in session.exec(select(ScreeningJob.id).where(ScreeningJob.state == state.value))
            if j is not None
        ]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_pipeline_batching_kill_flush_reprocess(
    pipeline: tuple[Service, OrthancServer, Settings], cxr_dir: Path, tmp_path: Path
) -> None:
    from screener.reprocess import plan_reprocess, queue_reprocess
    from screener.thresholds import set_threshold

    service, pacs, settings = pipeline

    # 1. Four studies at once: batched across studies, all delivered once.
    first = _upload_studies(pacs, cxr_dir, tmp_path, 4, seed=0)
    _send(pacs, first)
    uids = list(first)
    assert wait_for(lambda: _all_delivered(settings, uids), 150), _jobs(settings, uids)
    with session_scope(settings.database_url) as session:
        batches = [
            a.detail
            for a in session.exec(select(AuditLog).where(AuditLog.action == "infer.batch"))
            if a.detail
        ]
    multi = [b for b in batches if b["studies"] > 1]
    assert multi, batches
    # Segmentation and classification each ran once for the whole multi-study batch.
    assert min(b["engine_calls"] for b in multi) <= 2, multi
    for uid in uids:
        srs = _srs(pacs, uid)
        assert len(srs) == 1, uid
        job = _jobs(settings, [uid])[uid][-1]
        assert job.result is not None and job.result["threshold_version"] == 0
        screened = [im for im in job.result["images"] if im["screened"]]
        assert len(_scs(pacs, uid)) == len(screened)
    lateral_study = _jobs(settings, [uids[0]])[uids[0]][-1].result
    assert lateral_study is not None
    assert any(not im["screened"] for im in lateral_study["images"])

    # 2. kill -9 of the infer worker while a batch is being collected or run.
    second = _upload_studies(pacs, cxr_dir, tmp_path, 3, seed=1)
    _send(pacs, second)
    assert wait_for(lambda: bool(_pids_in_state(settings, JobState.INFERRING)), 60, 0.05)
    stop_process(service.workers["infer"], signal.SIGKILL)
    killed = _pids_in_state(settings, JobState.INFERRING)
    service.start_worker("infer", "infer")
    uids2 = list(second)
    assert wait_for(lambda: _all_delivered(settings, uids2), 150), _jobs(settings, uids2)
    for uid in uids2:
        assert len(_srs(pacs, uid)) == 1
    assert killed  # the kill hit jobs that were in the batch
    with session_scope(settings.database_url) as session:
        resent = {
            a.job_id for a in session.exec(select(AuditLog).where(AuditLog.action == "job.resent"))
        }
    assert set(killed) <= resent, (killed, resent)  # recovered by the reconciler

    # 3. The broker loses everything mid-run (Redis keeps nothing on disk here).
    third = _upload_studies(pacs, cxr_dir, tmp_path, 2, seed=2)
    _send(pacs, third)
    uids3 = list(third)
    assert wait_for(lambda: len(_jobs(settings, uids3)) == 2, 30)
    fresh_redis("e2e")  # FLUSHDB of the broker's database
    assert wait_for(lambda: _all_delivered(settings, uids3), 150), _jobs(settings, uids3)
    for uid in uids3:
        assert len(_srs(pacs, uid)) == 1

    # 4. New threshold, then reprocess one study: new SR with the new threshold.
    record = set_threshold(settings, 0.05, reason="e2e test", set_by="pytest")
    target = uids[1]
    plan = plan_reprocess(settings, utcnow() - timedelta(hours=1), studies=[target])
    created = queue_reprocess(settings, plan, actor="pytest")
    assert list(created) == [target]
    assert wait_for(lambda: _all_delivered(settings, [target], jobs_per_study=2), 120)
    srs = sorted(_srs(pacs, target), key=lambda d: str(d.ContentTime))
    assert len(srs) == 2
    new_sr = srs[-1]
    text = _sr_text(new_sr)
    assert "0.05" in text, text
    old_uid = srs[0].SOPInstanceUID
    predecessors = [
        ref.ReferencedSOPInstanceUID
        for study in new_sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert old_uid in predecessors
    job = _jobs(settings, [target])[target][-1]
    assert job.threshold_version == record.version and job.trigger == "reprocess"
    # Nothing else was re-screened: the other studies still have one SR each.
    for uid in uids[2:]:
        assert len(_srs(pacs, uid)) == 1
