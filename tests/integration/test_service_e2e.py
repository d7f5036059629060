"""`screener serve` as an operator starts it: one command, embedded defaults (SQLite, the
SQLite broker, onnxruntime), configured only by SCREENER_* variables; a real Orthanc sends
a study and gets the SR and heatmap back; SIGTERM stops everything cleanly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from sqlmodel import select

from screener.db.models import ScreeningJob
from screener.db.session import session_scope
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_study,
    pick_images,
    write_datasets,
)
from tests.listener_support import echo_ok
from tests.orthanc import OrthancServer, free_port, orthanc_available
from tests.workers_support import (
    child_pids,
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


def test_serve_screens_a_study_from_orthanc(tmp_path: Path, cxr_dir: Path) -> None:
    model_dir = require_models()
    port = free_port()
    pacs = OrthancServer(tmp_path, modalities={"SCREENER": ("SCREENER", "127.0.0.1", port)})
    data = tmp_path / "data"
    env = {
        "SCREENER_DATA_DIR": str(data),
        "SCREENER_LISTENER__PORT": str(port),
        "SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES": '["ORTHANC"]',
        "SCREENER_STUDY_QUIET_SECONDS": "1",
        "SCREENER_MODEL__MODEL_DIR": model_dir,
        "SCREENER_DELIVERY__DESTINATIONS": json.dumps(
            [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}]
        ),
    }
    serve = start_process(screener_cmd("serve"), env, tmp_path / "serve.log")
    try:
        with pacs:
            rows = pick_images(cxr_dir, 1, view="PA", split="test")
            identity = StudyIdentity.new()
            files = write_datasets(
                make_study([(corpus_image(cxr_dir, rows[0]["id"]), "PA")], study=identity),
                tmp_path / "study",
            )
            ids = [pacs.upload(f) for f in files]
            assert wait_for(lambda: echo_ok(port), 60), (tmp_path / "serve.log").read_text()[-3000:]
            # a worker killed (OOM killer, an operator's kill -9) is restarted by serve, which
            # keeps listening; the study below is screened by the new infer worker
            # serve starts its workers after the listener answers: wait for the infer one
            assert wait_for(lambda: len(child_pids(serve.pid, "infer")) == 1, 60), child_pids(
                serve.pid, ""
            )
            infer = child_pids(serve.pid, "infer")
            assert len(infer) == 1, child_pids(serve.pid, "")
            os.kill(infer[0], signal.SIGKILL)
            assert wait_for(lambda: child_pids(serve.pid, "infer") not in ([], infer), 30), (
                tmp_path / "serve.log"
            ).read_text()[-3000:]
            assert len(child_pids(serve.pid, "infer")) == 1
            assert serve.poll() is None
            pacs.send_to_modality("SCREENER", ids)
            uid = identity.study_instance_uid
            assert wait_for(
                lambda: bool(pacs.find_instances(StudyInstanceUID=uid, Modality="SR")), 120
            ), (tmp_path / "serve.log").read_text()[-3000:]
            db = f"sqlite:///{data / 'screener.sqlite3'}"
            assert wait_for(lambda: _states(db) == ["delivered"], 60), _states(db)
            with session_scope(db) as session:
                (job,) = session.exec(select(ScreeningJob)).all()
            assert job.result is not None
            screened = sum(1 for im in job.result["images"] if im["screened"])
            # the source, the SR and one heatmap SC per screened image, in the same study
            assert len(pacs.find_instances(StudyInstanceUID=uid)) == 2 + screened
        assert (data / "broker.sqlite3").exists()  # the embedded broker, no server
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(40)
        finally:
            stop_process(serve, signal.SIGKILL)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _states(db: str) -> list[str]:
    with session_scope(db) as session:
        return [j.state for j in session.exec(select(ScreeningJob)).all()]
