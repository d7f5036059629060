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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pydicom

from engines.manifest import model_dir
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
# where an offline run's threshold comes from (OfflineScreener.threshold_source)
EMBEDDED, COMMAND_LINE = "embedded", "command_line"


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


def sop_instance_uids(files: Iterable[Path]) -> set[str]:
    """The SOP Instance UIDs of ``files``, from headers only (unreadable files: none)."""
    uids = set()
    for path in files:
        try:
            ds = pydicom.dcmread(
                str(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
            )
        except Exception:
            continue
        if ds.get("SOPInstanceUID"):
            uids.add(str(ds.SOPInstanceUID))
    return uids


def screen_paths(
    paths: list[Path],
    settings: Settings,
    threshold: ThresholdInfo | None = None,
    *,
    models: ScreeningModels | None = None,
) -> Iterator[StudyResult]:
    """Screen files and folders in-process, one result per study, in UID order (default
    threshold: the embedded one of the scheme ``models`` run)."""
    yield from screen_studies(group_by_study(paths), settings, threshold, models=models)


def screen_studies(
    studies: Mapping[str, list[Path]],
    settings: Settings,
    threshold: ThresholdInfo | None = None,
    *,
    models: ScreeningModels | None = None,
) -> Iterator[StudyResult]:
    """:func:`screen_paths` of files already grouped by study (``group_by_study``)."""
    models = models or ScreeningModels.from_settings(settings)
    threshold = threshold or embedded_info(settings, models.scheme, models.manifest)
    for uid, files in sorted(studies.items()):
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
    """The models cannot be loaded: no weights, an unknown scheme, an engine not installed,
    a missing or broken network file, a manifest from another version."""


def screening_settings(
    scheme: str | None = None,
    engine: str | None = None,
    heatmap: str | None = None,
    settings: Settings | None = None,
) -> Settings:
    """``settings`` (default: from the environment) with the model options a run overrides.

    The overrides are validated like the settings themselves (a pydantic ValidationError,
    exit 2 at the CLI boundary): ``model_copy`` alone would let ``engine="foo"`` through to
    fail as "models unavailable", or ``heatmap="occlusionn"`` quietly fall back to CAM."""
    from screener.settings import ModelSettings

    settings = settings or Settings()
    overrides = {
        key: value
        for key, value in (("scheme", scheme), ("engine", engine), ("heatmap", heatmap))
        if value is not None
    }
    if not overrides:
        return settings
    model = ModelSettings.model_validate(settings.model.model_dump() | overrides)
    return settings.model_copy(update={"model": model})


# why a labelled image has no score (LabelledRun.not_scored)
STUDY_FAILED, NOT_SCREENED, NOT_FOUND = "study_failed", "not_screened", "not_found"


@dataclass
class LabelledRun(Generic[Label]):
    """What screening a labelled set gave: the scored images, and why the others have none."""

    scored: list[tuple[Label, float, ImageResult]] = field(default_factory=list)
    failed_studies: dict[str, str] = field(default_factory=dict)  # study UID -> reason
    # SOP Instance UID of a labelled image without a score -> STUDY_FAILED or NOT_SCREENED
    unscored: dict[str, str] = field(default_factory=dict)
    not_found: list[str] = field(default_factory=list)  # labelled, in none of the files

    def not_scored(self) -> dict[str, int]:
        """Labelled images left out of the metrics, by reason (every reason, zeros too)."""
        reasons = list(self.unscored.values())
        return {
            STUDY_FAILED: reasons.count(STUDY_FAILED),
            NOT_SCREENED: reasons.count(NOT_SCREENED),
            NOT_FOUND: len(self.not_found),
        }


class OfflineScreener:
    """Loaded models and the operating point of one offline run."""

    def __init__(
        self,
        settings: Settings,
        models: ScreeningModels,
        threshold: ThresholdInfo,
        *,
        threshold_source: str = EMBEDDED,
    ) -> None:
        self.settings = settings
        self.models = models
        self.threshold = threshold
        # where ``threshold`` comes from: the manifest's embedded default (never the one an
        # admin set with `threshold set`: offline runs read no database) or the command line
        self.threshold_source = threshold_source

    @classmethod
    def load(cls, settings: Settings, threshold: float | None = None) -> OfflineScreener:
        """Load the models; ``threshold`` overrides the embedded default operating point.

        Raises :class:`ModelsUnavailableError` naming why the models cannot be loaded.
        """
        models = load_models(settings)
        if threshold is None:
            return cls(settings, models, embedded_info(settings, models.scheme, models.manifest))
        info = ThresholdInfo(
            value=threshold, version=0, operating_point="given on the command line"
        )
        return cls(settings, models, info, threshold_source=COMMAND_LINE)

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

    def score_labelled(self, paths: list[Path], truth: Mapping[str, Label]) -> LabelledRun[Label]:
        """Screen ``paths`` and account for every label in ``truth``: scored, in a study that
        failed, not screened (a lateral view, ...), or in none of the files. Metrics that
        silently leave out the images of a failed study look better than they are."""
        studies = group_by_study(paths)
        run: LabelledRun[Label] = LabelledRun()
        for study in screen_studies(studies, self.settings, self.threshold, models=self.models):
            uid = study.study_instance_uid
            if study.status == "failed":
                run.failed_studies[uid] = study.reason or "failed"
                for sop in sop_instance_uids(studies.get(uid, [])) & truth.keys():
                    run.unscored[sop] = STUDY_FAILED
                continue
            for image in study.images + study.ignored_objects:
                sop = image.source.sop_instance_uid
                label = truth.get(sop)
                if label is None:
                    continue
                if image.screened and image.covid_score is not None:
                    run.scored.append((label, float(image.covid_score), image))
                else:
                    run.unscored[sop] = NOT_SCREENED
        seen = {image.source.sop_instance_uid for _, _, image in run.scored} | run.unscored.keys()
        run.not_found = sorted(set(truth) - seen)
        return run


def load_models(settings: Settings) -> ScreeningModels:
    """The models of ``settings``, or :class:`ModelsUnavailableError` for any reason they
    cannot be loaded (onnxruntime's own exceptions, e.g. ``NoSuchFile`` or
    ``InvalidProtobuf``, derive from ``Exception`` only). A missing package is left to the
    CLI boundary (exit 6, "install ...")."""
    folder = model_dir(settings.model.model_dir or None)
    try:
        return ScreeningModels.from_settings(settings)
    except ImportError:
        raise
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise ModelsUnavailableError(_first_line(exc)) from exc
    except Exception as exc:
        detail = f"{type(exc).__name__}: {_first_line(exc)}"
        raise ModelsUnavailableError(f"the models in {folder} cannot be loaded ({detail})") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
