"""The synthetic DICOM factory writes valid, decodable CR/DX objects in every syntax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    make_study,
    pick_images,
    write_datasets,
)


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1]
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossless_round_trip(cxr_dir: Path, tmp_path: Path, ts: str, photometric: str) -> None:
    row = pick_images(cxr_dir, 1, label="normal")[0]
    pixels = corpus_image(cxr_dir, row["id"])[:128, :160]
    ds = make_instance(
        pixels,
        study=StudyIdentity.new(),
        photometric=photometric,
        bits_stored=12,
        transfer_syntax=ts,
        modality="DX",
    )
    (path,) = write_datasets([ds], tmp_path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ts
    stored = back.pixel_array.astype(np.int64)
    assert stored.max() <= 4095
    display = stored if photometric == "MONOCHROME2" else 4095 - stored
    # 12-bit values follow the 8-bit source (scale 4095/255, plus a little simulated noise)
    assert np.corrcoef(display.ravel(), pixels.ravel())[0, 1] > 0.99


def test_study_shares_identity_and_views(cxr_dir: Path) -> None:
    rows = pick_images(cxr_dir, 2, label="pneumonia")
    study = StudyIdentity.new(patient_id="P1", patient_name="DOE^JANE")
    lateral = pick_images(cxr_dir, 1, view="LATERAL", split=None)[0]
    datasets = make_study(
        [
            (corpus_image(cxr_dir, rows[0]["id"]), "PA"),
            (corpus_image(cxr_dir, lateral["id"]), "LATERAL"),
            (corpus_image(cxr_dir, rows[1]["id"]), None),
        ],
        study=study,
    )
    assert {d.StudyInstanceUID for d in datasets} == {study.study_instance_uid}
    assert len({d.SeriesInstanceUID for d in datasets}) == 3
    assert [getattr(d, "ViewPosition", None) for d in datasets] == ["PA", "LATERAL", None]
    assert all(d.PatientID == "P1" for d in datasets)


def test_large_radiograph_size(cxr_dir: Path) -> None:
    row = pick_images(cxr_dir, 1)[0]
    ds = make_instance(
        corpus_image(cxr_dir, row["id"]),
        study=StudyIdentity.new(),
        bits_stored=16,
        target_size=(2500, 2048),
    )
    assert len(ds.PixelData) == 2500 * 2048 * 2  # ~10 MB, like a real CR


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="modality"):
        make_instance(np.zeros((4, 4), np.uint8), study=StudyIdentity.new(), modality="CT")


def test_compression_keeps_the_requested_sop_instance_uid(cxr_dir: Path) -> None:
    pixels = corpus_image(cxr_dir, pick_images(cxr_dir, 1)[0]["id"])[:64, :64]
    ds = make_instance(
        pixels, study=StudyIdentity.new(), transfer_syntax=RLELossless, sop_instance_uid="1.2.3.4"
    )
    assert ds.SOPInstanceUID == "1.2.3.4" == ds.file_meta.MediaStorageSOPInstanceUID
