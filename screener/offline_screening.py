"""Offline screening: models loaded once, DICOM files screened in-process, outputs written.

What ``screener screen``, ``screener evaluate`` and ``screener threshold tune`` share: the
files named on the command line walked and grouped by study, the stages
(:mod:`screener.screening`) chained in-process without a broker, the settings a run
overrides, the operating point a run uses, the results per study with their SR/SC (or
heatmap PNG) outputs, and the screened images that carry a label. The commands only parse,
call this and print.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom

from screener.results import ImageResult, StudyResult, ThresholdInfo
from screener.screening.models import ScreeningModels
from screener.screening.prepare import PreparedImage, prepare_instance
from screener.screening.study_result import assemble_study, failed_study
from screener.settings import Settings
from screener.thresholds import embedded_info

log = logging.getLogger(__name__)

Label = TypeVar("Label")
# the study key of a file without a Study Instance UID: ``unknown:<file name>``
UNKNOWN_STUDY = "unknown:"


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file under named folders (sorted, hidden skipped)."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif path.exists():
            yield path
        else:
            log.warning("no such file or folder: %s", path)


def group_by_study(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Study Instance UID -> files, from headers only; non-DICOM files are logged and skipped."""
    studies: dict[str, list[Path]] = defaultdict(list)
    for path in iter_files(paths):
        try:
            ds = pydicom.dcmread(
                str(path), stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
        except Exception as exc:
            log.warning("skipping %s: not a DICOM file (%s)", path, type(exc).__name__)
            continue
        uid = str(ds.get("StudyInstanceUID", "")) or f"{UNKNOWN_STUDY}{path.name}"
        studies[uid].append(path)
    return dict(studies)


def screen_paths(
    paths: list[Path],
    settings: Settings,
    threshold: ThresholdInfo | None = None,
    *,
    models: ScreeningModels | None = None,
) -> Iterator[StudyResult]:
    """Screen files and folders in-process, one result per study, in UID order (default
    threshold: the embedded one of the scheme ``models`` run)."""
    models = models or ScreeningModels.from_settings(settings)
    threshold = threshold or embedded_info(settings, models.scheme)
    for uid, files in sorted(group_by_study(paths).items()):
        prepared: list[PreparedImage] = []
        step = "preparing the images"
        try:  # any failure fails the study, not the run
            prepared = [prepare_instance(f, settings) for f in files]
            step = "inference"
            results = models.infer(prepared, threshold)
            step = "assembling the result"
            study = assemble_study(uid, results, models.model_info, threshold, settings.disclaimer)
        except Exception as exc:
            log.exception("screening study %s failed (%s)", uid, step)
            reason = f"{step} failed: {exc}"
            yield failed_study(
                uid, prepared, models.model_info, threshold, reason, settings.disclaimer
            )
            continue
        yield study


class ModelsUnavailableError(RuntimeError):
    """The models cannot be loaded: no weights, an unknown scheme, an engine not installed."""


def screening_settings(
    scheme: str | None = None,
    engine: str | None = None,
    heatmap: str | None = None,
    settings: Settings | None = None,
) -> Settings:
    """``settings`` (default: from the environment) with the model options a run overrides."""
    settings = settings or Settings()
    overrides = {
        key: value
        for key, value in (("scheme", scheme), ("engine", engine), ("heatmap", heatmap))
        if value is not None
    }
    if not overrides:
        return settings
    return settings.model_copy(update={"model": settings.model.model_copy(update=overrides)})


class OfflineScreener:
    """Loaded models and the operating point of one offline run."""

    def __init__(
        self, settings: Settings, models: ScreeningModels, threshold: ThresholdInfo
    ) -> None:
        self.settings = settings
        self.models = models
        self.threshold = threshold

    @classmethod
    def load(cls, settings: Settings, threshold: float | None = None) -> OfflineScreener:
        """Load the models; ``threshold`` overrides the embedded default operating point.

        Raises :class:`ModelsUnavailableError` naming why the models cannot be loaded.
        """
        try:
            models = ScreeningModels.from_settings(settings)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise ModelsUnavailableError(str(exc)) from exc
        info = embedded_info(settings, models.scheme)
        if threshold is not None:
            info = ThresholdInfo(
                value=threshold, version=0, operating_point="given on the command line"
            )
        return cls(settings, models, info)

    @property
    def model_ref(self) -> str:
        return self.models.model_info.ref

    @property
    def scheme(self) -> str:
        return self.models.model_info.scheme

    def operating_point(self) -> str:
        """The operating point explained once per run (threshold, validation sensitivity and
        specificity, what a POSITIVE call means), as the SR and the heatmaps state it."""
        from screener.reports.operating_point import statement_for

        return statement_for(self.threshold, self.models.model_info, self.settings).explanation()

    def screen(self, paths: list[Path], out: Path | None = None) -> Iterator[StudyResult]:
        """One result per study, in UID order; with ``out`` its outputs are written there
        and listed in ``result.outputs``."""
        for result in screen_paths(list(paths), self.settings, self.threshold, models=self.models):
            if out is not None:
                _write_or_fail(result, out, self.settings)
            yield result

    def labelled_scores(
        self, paths: list[Path], truth: Mapping[str, Label]
    ) -> Iterator[tuple[Label, float, ImageResult]]:
        """(label, COVID score, image) for each screened image with a score and a label in
        ``truth`` (keyed by SOP Instance UID)."""
        for study in self.screen(paths):
            for image in study.screened_images:
                label = truth.get(image.source.sop_instance_uid)
                if label is not None and image.covid_score is not None:
                    yield label, float(image.covid_score), image


def _write_or_fail(result: StudyResult, out: Path, settings: Settings) -> None:
    """Write a study's outputs into ``result.outputs``; a failure fails that study, not the run.

    E.g. a file without a Study Instance UID (grouped as ``unknown:<name>``) has no source an
    SR can reference; the studies screened before and after it still get their outputs.
    """
    try:
        result.outputs = [str(p) for p in write_outputs(result, out, settings)]
    except Exception as exc:
        log.exception("writing the outputs of study %s failed", result.study_instance_uid)
        result.outputs = []
        result.status = "failed"
        reason = f"outputs not written: {exc}"
        if result.study_instance_uid.startswith(UNKNOWN_STUDY):
            reason = f"no Study Instance UID in the file; {reason}"
        result.reason = reason


def write_outputs(result: StudyResult, out_dir: Path, settings: Settings) -> list[Path]:
    """SR + SC DICOM via the reports package when present, heatmap PNGs otherwise."""
    try:
        from screener.reports.writer import write_study_outputs
    except ImportError:
        return write_heatmap_pngs(result, out_dir)
    written: list[Path] = write_study_outputs(result, out_dir, settings)
    return written


def write_heatmap_pngs(result: StudyResult, out_dir: Path) -> list[Path]:
    """Fallback outputs when the reports package is not installed: CAM over the image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    from screener.screening.cam import expand_to_display

    paths = []
    study_dir = out_dir / result.study_instance_uid
    for image in result.screened_images:
        if image.cam is None:
            expand_to_display(image, image.display_image)
        if image.display_image is None or image.cam is None:
            continue
        gray = image.display_image.astype(np.float32) / 255.0
        heat = colormaps["jet"](image.cam)[..., :3]
        alpha = 0.4 * image.cam[..., None]
        blended = (1 - alpha) * gray[..., None] + alpha * heat
        study_dir.mkdir(parents=True, exist_ok=True)
        path = study_dir / f"{image.source.sop_instance_uid}_heatmap.png"
        Image.fromarray((blended * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
