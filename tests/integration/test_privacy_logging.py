"""Patient names and IDs never reach the logs at INFO level (listener, ingest, screening)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from screener.dicom.listener import start_listener
from screener.offline_screening import screen_paths
from screener.settings import Settings
from screener.study_assembler import assemble_due_studies
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_study,
    pick_images,
    write_datasets,
)

PATIENT_NAME = "ZZPRIVATE^ALICE"
PATIENT_ID = "ZZID-8842"


def test_no_patient_identity_in_info_logs(
    cxr_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCREENER_LISTENER__PORT", "0")
    monkeypatch.setenv("SCREENER_STUDY_QUIET_SECONDS", "0")
    settings = Settings()
    rows = pick_images(cxr_dir, 2, label="pneumonia")
    study = StudyIdentity.new(patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    datasets = make_study(
        [(corpus_image(cxr_dir, r["id"]), v) for r, v in zip(rows, ["PA", None], strict=True)],
        study=study,
    )
    paths = write_datasets(datasets, tmp_path / "in")
    caplog.set_level(logging.INFO)

    handle = start_listener(settings, assemble=False)
    try:
        ae = AE(ae_title="PRIVACYTEST")
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", handle.port, ae_title=settings.listener.ae_title)
        assert assoc.is_established
        for path in paths:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
    finally:
        handle.stop(5)
    assert assemble_due_studies(settings)  # the study completed and a job was created
    results = list(screen_paths(paths, settings))
    assert results and results[0].status == "screened"

    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert text, "nothing was logged at INFO: the test would prove nothing"
    for secret in (PATIENT_NAME, "ZZPRIVATE", "ALICE", PATIENT_ID):
        assert secret not in text
