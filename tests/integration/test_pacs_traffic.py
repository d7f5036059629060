"""What a real PACS sends, end to end through `screener serve` with a real Orthanc.

One study as a hospital archive holds it: a CR chest radiograph of a patient with a
Japanese name (``\\ISO 2022 IR 87``), an X-Ray Radiation Dose SR, a Key Object Selection
and a Grayscale Presentation State, pushed by Orthanc's REST ``modalities/.../store`` to
the running listener. The screener screens the radiograph only, sends back one SR (not
PARTIAL, the name intact) and one heatmap; a dose SR arriving after delivery is recorded
and nothing more is sent: the PACS still holds exactly one AI SR for the study.
"""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path

import pydicom
import pytest
from sqlmodel import col, select

from screener.db.models import Instance, ScreeningJob
from screener.db.session import session_scope
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_companion,
    make_instance,
    pick_images,
    write_datasets,
)
from tests.listener_support import echo_ok
from tests.orthanc import OrthancServer, free_port, orthanc_available
from tests.workers_support import (
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

JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
JAPANESE_CHARSET = ["", "ISO 2022 IR 87"]
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _ai_srs(pacs: OrthancServer, uid: str) -> list[str]:
    return [
        i
        for i in pacs.find_instances(StudyInstanceUID=uid, Modality="SR")
        if pacs.instance_tags(i).get("SOPClassUID") == COMPREHENSIVE_SR
    ]


def _jobs(db: str) -> list[tuple[str, dict | None]]:  # type: ignore[type-arg]
    with session_scope(db) as session:
        rows = session.exec(select(ScreeningJob).order_by(col(ScreeningJob.id))).all()
        return [(j.state, j.result) for j in rows]


def test_orthanc_study_with_non_images_and_a_late_dose_report(
    tmp_path: Path, cxr_dir: Path
) -> None:
    model_dir = require_models()
    port = free_port()
    pacs = OrthancServer(tmp_path, modalities={"SCREENER": ("SCREENER", "127.0.0.1", port)})
    data = tmp_path / "data"
    env = {
        "SCREENER_DATA_DIR": str(data),
        "SCREENER_LISTENER__PORT": str(port),
        "SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES": '["ORTHANC"]',
        "SCREENER_STUDY_QUIET_SECONDS": "2",
        "SCREENER_MODEL__MODEL_DIR": model_dir,
        "SCREENER_HTTP__ENABLED": "false",
        "SCREENER_DELIVERY__DESTINATIONS": json.dumps(
            [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}]
        ),
    }
    log_path = tmp_path / "serve.log"
    serve = start_process(screener_cmd("serve"), env, log_path)
    try:
        with pacs:
            identity = StudyIdentity.new(patient_name=JAPANESE_NAME)
            row = pick_images(cxr_dir, 1, view="PA", split="test")[0]
            datasets = [make_instance(corpus_image(cxr_dir, row["id"]), study=identity)]
            datasets += [
                make_companion(kind, study=identity, instance_number=n)
                for n, kind in enumerate(["dose_sr", "kos", "gsps"], start=1)
            ]
            for ds in datasets:
                ds.SpecificCharacterSet = JAPANESE_CHARSET
            files = write_datasets(datasets, tmp_path / "study")
            assert str(pydicom.dcmread(files[0]).PatientName) == JAPANESE_NAME
            ids = [pacs.upload(f) for f in files]
            assert wait_for(lambda: echo_ok(port), 90), log_path.read_text()[-3000:]
            pacs.send_to_modality("SCREENER", ids)  # one push, four SOP classes
            uid = identity.study_instance_uid
            db = f"sqlite:///{data / 'screener.sqlite3'}"
            assert wait_for(lambda: [s for s, _ in _jobs(db)] == ["delivered"], 180), (
                _jobs(db),
                log_path.read_text()[-3000:],
            )
            ((_, result),) = _jobs(db)
            assert result is not None and result["status"] == "screened"
            assert len(result["images"]) == 1 and result["images"][0]["screened"]
            reasons = sorted(o["skip_reason"] for o in result["ignored_objects"])
            assert len(reasons) == 3 and all(r.startswith("not an image") for r in reasons)

            (sr_id,) = _ai_srs(pacs, uid)
            sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_id)))
            assert sr.CompletionFlag == "COMPLETE"  # non-images never make it PARTIAL
            assert str(sr.PatientName) == JAPANESE_NAME
            assert sr.SpecificCharacterSet == "ISO_IR 192"
            # source CR + dose SR + KOS + GSPS + AI SR + one heatmap SC
            assert len(pacs.find_instances(StudyInstanceUID=uid)) == 6

            # A dose report arrives after the study's SR was delivered.
            late = make_companion("dose_sr", study=identity, instance_number=9)
            late.SpecificCharacterSet = JAPANESE_CHARSET
            (late_file,) = write_datasets([late], tmp_path / "late")
            pacs.send_to_modality("SCREENER", [pacs.upload(late_file)])
            assert wait_for(lambda: _recorded(db, late.SOPInstanceUID), 60)
            time.sleep(8)  # quiet period (2 s) and a reconciler pass: nothing may start
            assert [s for s, _ in _jobs(db)] == ["delivered"]
            assert len(_ai_srs(pacs, uid)) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(40)
        finally:
            stop_process(serve, signal.SIGKILL)


def _recorded(db: str, sop_uid: str) -> bool:
    with session_scope(db) as session:
        row = session.exec(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first()
        return row is not None and bool(row.skip_reason)
