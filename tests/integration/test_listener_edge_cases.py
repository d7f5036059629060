"""Edge cases a real PACS produces: unknown SOP classes, huge images, non-image objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from sqlmodel import select

from screener.db.models import Instance
from screener.db.session import session_scope
from screener.dicom.listener import start_listener
from screener.offline_screening import screen_paths
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity, make_instance

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.99999.1"  # a vendor-private storage class


@pytest.fixture
def listener_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("SCREENER_LISTENER__PORT", "0")
    monkeypatch.setenv("SCREENER_STUDY_QUIET_SECONDS", "0")
    return Settings()


def _associate(port: int, contexts: list) -> object:  # type: ignore[type-arg]
    ae = AE(ae_title="EDGETEST")
    ae.requested_contexts = contexts
    ae.maximum_pdu_size = 0
    return ae.associate("127.0.0.1", port, ae_title="SCREENER")


def test_unknown_sop_class_is_refused_and_the_listener_keeps_serving(
    listener_settings: Settings,
) -> None:
    handle = start_listener(listener_settings, assemble=False)
    try:
        assoc = _associate(
            handle.port,
            [
                build_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian),
                build_context("1.2.840.10008.1.1"),
            ],
        )
        assert assoc.is_established  # type: ignore[attr-defined]
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}  # type: ignore[attr-defined]
        assert PRIVATE_SOP_CLASS not in accepted
        assert "1.2.840.10008.1.1" in accepted
        assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        handle.stop(5)


def test_a_huge_radiograph_is_stored_intact(listener_settings: Settings) -> None:
    """A 4096 x 4096 16-bit image (32 MiB): stored byte for byte, recorded once."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, size=(256, 256), dtype=np.uint8)
    ds = make_instance(pixels, study=StudyIdentity.new(), bits_stored=16, target_size=(4096, 4096))
    assert len(ds.PixelData) == 4096 * 4096 * 2
    handle = start_listener(listener_settings, assemble=False)
    try:
        assoc = _associate(
            handle.port, [build_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)]
        )
        assert assoc.send_c_store(ds).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        handle.stop(5)
    with session_scope(listener_settings.database_url) as session:
        rows = session.exec(
            select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
        ).all()
    assert len(rows) == 1
    import pydicom

    stored = pydicom.dcmread(rows[0].file_path)
    assert stored.PixelData == ds.PixelData


def test_a_non_image_object_is_reported_not_screened(tmp_path: Path) -> None:
    """An SR-like object in a study: no crash, the study says no frontal image."""
    study = StudyIdentity.new()
    ds = Dataset()
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = study.patient_id
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    (result,) = list(screen_paths([path], Settings()))
    assert result.status == "ignored"  # nothing screenable (issue 10)
    assert all(image.screened is False for image in result.images)  # never among images
    assert result.to_json()["study_covid_score"] is None


def test_control_characters_in_text_values_never_reach_the_database(
    listener_settings: Settings,
) -> None:
    """A NUL inside a text value (PostgreSQL refuses NUL in text: the C-STORE would be
    answered 0xA702, retry later, for ever): the value is recorded without it."""
    from pydicom.uid import ImplicitVRLittleEndian

    from screener.db.models import Series, Study
    from screener.dicom.dataset_check import read_header
    from tests.listener_support import encode_body, small_instance

    ds = small_instance(transfer_syntax=ImplicitVRLittleEndian)
    ds.PatientID = "12\x0034"
    ds.SeriesDescription = "PA\x00CHEST\x01"
    _, _, ts, body = encode_body(ds)
    header = read_header(body, ts)
    assert (header.patient_id, header.series_description) == ("1234", "PACHEST")
    handle = start_listener(listener_settings, assemble=False)
    try:
        assoc = _associate(handle.port, [build_context(ds.SOPClassUID, ts)])
        assert assoc.send_c_store(ds).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        handle.stop(5)
    with session_scope(listener_settings.database_url) as session:
        study = session.exec(
            select(Study).where(Study.study_instance_uid == ds.StudyInstanceUID)
        ).one()
        series = session.exec(
            select(Series).where(Series.series_instance_uid == ds.SeriesInstanceUID)
        ).one()
        assert (study.patient_id, series.series_description) == ("1234", "PACHEST")
