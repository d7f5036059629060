"""Screening results built from synthetic DICOM studies, for the report and delivery tests.

Until a test runs the real pipeline, these stand in for its output: factory datasets on
disk (the SR copies patient/study from them) and plausible arrays (a display image from
the corpus, two elliptical lungs, a Gaussian CAM in the right lung).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from screener.db.models import ScreeningJob, Study
from screener.db.session import session_scope
from screener.results import ImageResult, ModelInfo, SourceImageRef, StudyResult, ThresholdInfo
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity, make_study, write_datasets

MODEL = ModelInfo(name="cxr-covid-effnetlite0", version="1.0.0", engine_hash="ab12cd34ef56")
THRESHOLD = ThresholdInfo(
    value=0.42,
    version=3,
    target_sensitivity=0.95,
    # what ``threshold tune --apply`` stores with the version it creates
    operating_point=(
        "target sensitivity 0.950: sensitivity 0.952 (Wilson 95% CI 0.892-0.979, n=104), "
        "specificity 0.552 (0.471-0.632, n=143) on the tuning set; "
        "model cxr-covid-effnetlite0@1.0.0, crop scheme (calibrated probability)"
    ),
)


def synthetic_pixels(rows: int = 320, cols: int = 288, seed: int = 0) -> np.ndarray:
    """A chest-like uint8 image without needing the corpus (smooth gradient + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    img = 60 + 120 * np.exp(-(((x - cols / 2) / (cols / 2.5)) ** 2)) + 30 * (y / rows)
    return np.clip(img + rng.normal(0, 6, size=img.shape), 0, 255).astype(np.uint8)


def lung_mask(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    mask = np.zeros(shape, dtype=bool)
    for cx in (0.3 * cols, 0.7 * cols):
        mask |= ((x - cx) / (0.16 * cols)) ** 2 + ((y - 0.5 * rows) / (0.3 * rows)) ** 2 <= 1.0
    return mask


def cam_blob(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    cam = np.exp(
        -(((x - 0.3 * cols) / (0.1 * cols)) ** 2 + ((y - 0.55 * rows) / (0.12 * rows)) ** 2)
    )
    return (cam / cam.max()).astype(np.float32)


def display_of(ds: Dataset, max_size: int = 512) -> np.ndarray:
    """The source pixels as uint8 MONOCHROME2, downscaled like the pipeline would."""
    arr = ds.pixel_array.astype(np.float32)
    arr = (arr - arr.min()) / max(1.0, float(arr.max() - arr.min())) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 255.0 - arr
    img = Image.fromarray(arr.astype(np.uint8))
    img.thumbnail((max_size, max_size))
    return np.asarray(img, dtype=np.uint8)


def make_result(
    tmp_path: Path,
    views: list[str | None] = ["PA"],  # noqa: B006 - read only
    *,
    scores: list[float] | None = None,
    undecodable: set[int] = frozenset(),  # type: ignore[assignment]
    study: StudyIdentity | None = None,
    threshold: ThresholdInfo = THRESHOLD,
    model: ModelInfo = MODEL,
    pixels: np.ndarray | None = None,
) -> tuple[StudyResult, list[Path]]:
    """A study on disk and the result the pipeline would give for it.

    Frontal views are screened with ``scores`` (COVID probabilities); LATERAL views are
    skipped; indices in ``undecodable`` are reported as failed to decode.
    """
    base = pixels if pixels is not None else synthetic_pixels()
    datasets = make_study([(base, v) for v in views], study=study)
    paths = write_datasets(datasets, tmp_path / "source")
    scores = scores or [0.8] * len(views)
    result = StudyResult(
        study_instance_uid=datasets[0].StudyInstanceUID,
        model=model,
        threshold=threshold,
    )
    for i, (ds, path, view) in enumerate(zip(datasets, paths, views, strict=True)):
        ref = SourceImageRef(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID,
            study_instance_uid=ds.StudyInstanceUID,
            file_path=str(path),
        )
        image = ImageResult(source=ref, view=view or "UNKNOWN", view_tag=view)  # type: ignore[arg-type]
        if i in undecodable:
            image.skip_reason = "decode failed: unsupported or corrupt pixel data"
        elif view == "LATERAL":
            image.skip_reason = "lateral view: not screened"
        else:
            covid = scores[i]
            rest = 1.0 - covid
            image.screened = True
            image.probabilities = {"covid": covid, "pneumonia": rest * 0.6, "normal": rest * 0.4}
            image.covid_positive = covid >= threshold.value
            image.display_image = display_of(ds)
            image.lung_mask = lung_mask(image.display_image.shape)
            image.cam = cam_blob(image.display_image.shape)
            image.heatmap_lung_fraction = 0.9
        result.images.append(image)
    result.finalise_status()
    return result, paths


def make_job(settings: Settings, study_uid: str) -> int:
    """A study row and a screening job for it; returns the job id (outputs hang off jobs)."""
    with session_scope(settings.database_url) as session:
        study = Study(study_instance_uid=study_uid)
        session.add(study)
        session.flush()
        job = ScreeningJob(study_id=study.id or 0)
        session.add(job)
        session.flush()
        return int(job.id or 0)


def content_items(items: list[Dataset]) -> list[Dataset]:
    """Every SR content item below ``items``, depth first (the items themselves included)."""
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        out.extend(content_items(list(item.get("ContentSequence", []))))
    return out


def concept_meaning(item: Dataset) -> str:
    """The Code Meaning of a content item's concept name."""
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def named_charset_files() -> list[Path]:
    """pydicom's character-set test files that have a Patient Name and a Specific Character
    Set: the sources the charset tests write outputs for."""
    files = []
    for name in sorted(get_charset_files("chr*.dcm")):
        ds = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        if "PatientName" in ds and "SpecificCharacterSet" in ds:
            files.append(Path(name))
    return files
