"""Offline screening: models loaded once, DICOM files screened in-process, outputs written.

What ``screener screen``, ``screener evaluate`` and ``screener threshold tune`` share: the
settings a run overrides, the operating point a run uses, the results per study with their
SR/SC (or heatmap PNG) outputs, and the screened images that carry a label. The commands
only parse, call this and print.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from screener.pipeline import ScreeningModels, default_threshold, screen_paths
from screener.results import ImageResult, StudyResult, ThresholdInfo
from screener.settings import Settings

Label = TypeVar("Label")


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
        info = default_threshold(settings, models)
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
                result.outputs = [str(p) for p in write_outputs(result, out, self.settings)]
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

    paths = []
    study_dir = out_dir / result.study_instance_uid
    for image in result.screened_images:
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
