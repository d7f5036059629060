"""Outputs of the real pipeline: real decoding (and, once weights ship, real inference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

from screener.reports.writer import write_study_outputs
from screener.results import ImageResult, StudyResult
from screener.screening.prepare import prepare_instance
from screener.settings import Settings
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    make_study,
    pick_images,
    write_datasets,
)
from tests.dicom_validation import assert_valid, dsrdump
from tests.report_results import MODEL, THRESHOLD, cam_blob, content_items, lung_mask

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.mark.parametrize(
    ("transfer_syntax", "photometric"),
    [
        (ExplicitVRLittleEndian, "MONOCHROME2"),
        (RLELossless, "MONOCHROME1"),
        (JPEG2000Lossless, "MONOCHROME2"),
        (JPEGLosslessSV1, "MONOCHROME1"),
    ],
)
def test_outputs_from_really_prepared_images(
    cxr_dir: Path, tmp_path: Path, transfer_syntax: UID, photometric: str
) -> None:
    """The pipeline's own decode/VOI/MONOCHROME2 stage feeds the heatmap; all valid."""
    row = pick_images(cxr_dir, 1, label="covid", view="PA")[0]
    ds = make_instance(
        corpus_image(cxr_dir, row["id"]),
        study=StudyIdentity.new(),
        transfer_syntax=transfer_syntax,
        photometric=photometric,
        target_size=(600, 500),
    )
    (path,) = write_datasets([ds], tmp_path / "src")
    settings = Settings(data_dir=tmp_path / "data")
    prepared = prepare_instance(path, settings)
    assert prepared.skip_reason is None and prepared.display_image is not None
    shape = prepared.display_image.shape
    image = ImageResult(
        source=prepared.source,
        view="PA",
        view_tag="PA",
        screened=True,
        probabilities={"covid": 0.7, "pneumonia": 0.2, "normal": 0.1},
        covid_positive=True,
        display_image=prepared.display_image,
        cam=cam_blob(shape),
        lung_mask=lung_mask(shape),
    )
    result = StudyResult(
        study_instance_uid=ds.StudyInstanceUID, model=MODEL, threshold=THRESHOLD, images=[image]
    )
    paths = write_study_outputs(result, tmp_path / "out", settings)
    assert len(paths) == 2
    sc = pydicom.dcmread(paths[1])
    # MONOCHROME1 sources come out the right way round: lungs darker than the mediastinum
    gray = sc.pixel_array.astype(float).mean(axis=2)
    rows, cols = gray.shape
    middle = gray[rows // 3 : 2 * rows // 3, int(cols * 0.45) : int(cols * 0.55)].mean()
    right_lung = gray[rows // 3 : 2 * rows // 3, int(cols * 0.6) : int(cols * 0.75)].mean()
    assert middle > right_lung
    for p in paths:
        assert_valid(p)


def test_real_pipeline_writes_valid_outputs(cxr_dir: Path, tmp_path: Path) -> None:
    """End to end in-process: factory study -> screen_paths -> SR + SC, validated."""
    from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
    from screener.offline_screening import screen_paths

    if not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists():
        pytest.skip(f"no shipped weights in {SHIPPED_WEIGHTS_DIR} yet")
    frontal = corpus_image(cxr_dir, pick_images(cxr_dir, 1, label="covid", view="PA")[0]["id"])
    lateral = corpus_image(cxr_dir, pick_images(cxr_dir, 1, view="LATERAL", split=None)[0]["id"])
    datasets = make_study([(frontal, "PA"), (lateral, "LATERAL")])
    write_datasets(datasets, tmp_path / "src")
    settings = Settings(data_dir=tmp_path / "data")
    [result] = list(screen_paths([tmp_path / "src"], settings))
    assert result.status == "screened"
    paths = write_study_outputs(result, tmp_path / "out", settings)
    screened = result.screened_images
    assert len(paths) == 1 + len(screened)
    for p in paths:
        assert_valid(p)
    sr = pydicom.dcmread(paths[0])
    assert sr.SOPClassUID == SR_CLASS
    dump = dsrdump(paths[0])
    score = result.study_covid_score
    assert score is not None
    values = [
        float(i.MeasuredValueSequence[0].NumericValue)
        for group in sr.ContentSequence
        if group.get("ContentSequence")
        for i in content_items([group])
        if i.ValueType == "NUM"
    ]
    assert np.isclose(values, round(score, 6), atol=1e-6).any()
    assert result.model.ref in dump
