"""The screening pipeline: DICOM file -> prepared tensors -> batched engines -> study result.

Three stages, so the distributed workers can run them on different queues:

1. :func:`prepare_instance` (CPU): decode, tag view, display image, first engine input.
   Never raises for bad input: the reason lands in ``PreparedImage.skip_reason``.
2. :meth:`ScreeningModels.infer` (engines, batched across studies): engine call 1 = lung
   segmenter + frontal/lateral head (:meth:`~ScreeningModels.segment`); CPU glue per image
   (:meth:`~ScreeningModels.plan`: view, lung mask, the scheme's classifier input); engine
   call 2 = classifier -> probabilities + CAM (:meth:`~ScreeningModels.classify`); CPU glue
   per image (:meth:`~ScreeningModels.image_result`: calibration, call, CAM lung fraction,
   the CAM and lung mask at the networks' grid). Two engine calls per batch, whatever the
   batch holds; the infer consumer runs the steps on separate threads, the offline path in
   a row, then :func:`expand_to_display` brings the maps to the display image for reports.
3. :func:`assemble_study`: per-study result, study score = max over screened images.

:func:`screen_paths` chains them in-process for ``screener screen``. Nothing here imports
torch: the run-time path is onnxruntime (or TensorRT) only.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from engines.calibration import IDENTITY, Calibration  # numpy only, no torch
from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR  # noqa: F401 (public names)
from engines.manifest import read_manifest_json as read_manifest
from screener.imaging.decode import NotScreenable, decode_display
from screener.imaging.preprocess import (
    NET_SIZE,
    WORK_SIZE,
    Box,
    Scheme,
    limit_size,
    paste_back,
    resize,
    scheme_input,
    segmenter_input,
    to_uint8,
)
from screener.imaging.views import view_from_tags
from screener.results import (
    CLASS_NAMES,
    ImageResult,
    ModelInfo,
    ResultGrid,
    SourceImageRef,
    StudyResult,
    ThresholdInfo,
)
from screener.screenability import read_header, screenability
from screener.settings import Settings

log = logging.getLogger(__name__)

FRONTAL_TAGS = ("PA", "AP")
OCCLUSION_PATCH = 56
OCCLUSION_STRIDE = 28


@dataclass
class PreparedImage:
    """Output of the CPU 'prepare' stage; the workers save it to the spool."""

    source: SourceImageRef
    view_tag: str | None = None  # view read from tags (PA/AP/LATERAL/None)
    skip_reason: str | None = None  # set => not screenable
    refused: bool = False  # refused by the screenability gate (not a study image at all)
    network_input: np.ndarray | None = None  # float32 (1, S, S): first engine's input
    display_image: np.ndarray | None = None  # uint8 MONOCHROME2, long side <= heatmap_max_size
    # uint8, long side <= WORK_SIZE: what the classifier's input is cut from (infer reads
    # this, never the display image, which only the report stage loads)
    work_image: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # modality, sex... (no name/ID)

    def save(self, path: Path) -> None:
        """np.savez round trip (no pickle): arrays + a JSON header."""
        header = {
            "source": self.source.__dict__,
            "view_tag": self.view_tag,
            "skip_reason": self.skip_reason,
            "refused": self.refused,
            "meta": self.meta,
        }
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header))}
        if self.network_input is not None:
            arrays["network_input"] = self.network_input
        if self.display_image is not None:
            arrays["display_image"] = self.display_image
        if self.work_image is not None:
            arrays["work_image"] = self.work_image
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, *, display: bool = True) -> PreparedImage:
        """Read a prepared file; ``display=False`` leaves the display image on disk (the
        archive members are read lazily, so it costs nothing then)."""
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            network_input = data["network_input"] if "network_input" in data else None
            work = data["work_image"] if "work_image" in data else None
            shown = data["display_image"] if "display_image" in data and display else None
            if work is None and "display_image" in data:  # prepared by an older version
                work = limit_size(data["display_image"], WORK_SIZE)
        return cls(
            source=SourceImageRef(**header["source"]),
            view_tag=header["view_tag"],
            skip_reason=header["skip_reason"],
            refused=bool(header.get("refused", False)),
            network_input=network_input,
            display_image=shown,
            work_image=work,
            meta=header["meta"],
        )


def _source_ref(ds: pydicom.Dataset, path: Path) -> SourceImageRef:
    return SourceImageRef(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or f"unknown:{path.name}",
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")) or f"unknown:{path.name}",
        file_path=str(path),
    )


def _meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """Subgroup attributes for results and evaluation; never names or patient IDs."""
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "sex": str(ds.get("PatientSex", "") or ""),
        "age": str(ds.get("PatientAge", "") or ""),
        "view_position": str(ds.get("ViewPosition", "") or ""),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "") or ""),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
    }


def refused_image(ds: pydicom.Dataset, path: Path, settings: Settings) -> PreparedImage | None:
    """A refused PreparedImage when the screenability gate refuses ``ds``, else None."""
    try:
        refusal = screenability(ds, settings.screening)
    except Exception as exc:  # malformed element values
        reason = f"decode failed: bad header ({type(exc).__name__})"
        return PreparedImage(source=_source_ref(ds, path), skip_reason=reason)
    if refusal is None:
        return None
    return PreparedImage(source=_source_ref(ds, path), skip_reason=refusal.reason, refused=True)


def prepare_dataset(ds: pydicom.Dataset, path: Path, settings: Settings) -> PreparedImage:
    """Prepare one already-read dataset (see :func:`prepare_instance`)."""
    source = _source_ref(ds, path)
    try:
        meta = _meta(ds)
    except Exception as exc:  # malformed element values
        return PreparedImage(source=source, skip_reason=f"decode failed: bad header ({exc})")
    refused = refused_image(ds, path, settings)
    if refused is not None:
        refused.meta = meta
        return refused
    prepared = PreparedImage(source=source, meta=meta)
    try:
        prepared.view_tag = view_from_tags(ds)
        # full resolution, also for JPEG 2000: the networks' input is resized from it, and a
        # reduced wavelet level moves COVID scores by up to 0.05-0.12 (tests/test_reduced_decode)
        full, _ = decode_display(ds)
    except NotScreenable as exc:
        prepared.skip_reason = str(exc)
        return prepared
    except Exception as exc:  # corrupt pixel data, unsupported syntax, ...
        prepared.skip_reason = f"decode failed: {type(exc).__name__}: {exc}"
        return prepared
    # 8 bits from here on: the VOI transform above already chose what is displayed.
    display = limit_size(full, settings.reports.heatmap_max_size)
    prepared.display_image = display
    prepared.work_image = limit_size(display, WORK_SIZE)
    prepared.network_input = segmenter_input(prepared.work_image)  # same as from display
    return prepared


def prepare_instance(path: Path, settings: Settings) -> PreparedImage:
    """Decode one DICOM file into the first engine's input; never raises for bad input.

    The header is read first and judged by the screenability gate; the pixels of a refused
    object (a CT series, a dose report) are never read.
    """
    path = Path(path)
    try:
        header, has_pixels = read_header(path)
        refusal = screenability(header, settings.screening, has_pixel_data=has_pixels)
        if refusal is not None:
            return PreparedImage(
                source=_source_ref(header, path), skip_reason=refusal.reason, refused=True
            )
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        source = SourceImageRef(
            sop_instance_uid=f"unknown:{path.name}",
            sop_class_uid="",
            series_instance_uid="",
            study_instance_uid=f"unknown:{path.name}",
            file_path=str(path),
        )
        return PreparedImage(source=source, skip_reason=f"decode failed: not DICOM ({exc})")
    except Exception as exc:
        source = SourceImageRef(f"unknown:{path.name}", "", "", f"unknown:{path.name}", str(path))
        return PreparedImage(source=source, skip_reason=f"decode failed: {exc}")
    return prepare_dataset(ds, path, settings)


# --------------------------------------------------------------------------------------
# Models


@dataclass
class ImagePlan:
    """One live image between the two engine calls (the CPU glue's output)."""

    decision: ViewDecision
    lung: np.ndarray  # uint8 lung probability at the segmenter's grid
    work_shape: tuple[int, int]  # the working image (long side <= WORK_SIZE)
    work_mask: np.ndarray | None = None  # bool at the working image (frontal images)
    classifier_input: np.ndarray | None = None  # float32 (1, S, S) (frontal images)
    box: Box | None = None  # the scheme's crop square on the working image


@dataclass(frozen=True)
class ViewDecision:
    view: str  # PA | AP | LATERAL | UNKNOWN
    source: str  # tag | image
    image_view: str  # FRONTAL | LATERAL
    image_confidence: float
    frontal: bool


def decide_view(view_tag: str | None, lateral_probability: float) -> ViewDecision:
    """Tags and the image classifier both vote; the image decides when they disagree."""
    image_lateral = lateral_probability >= 0.5
    image_view = "LATERAL" if image_lateral else "FRONTAL"
    confidence = lateral_probability if image_lateral else 1.0 - lateral_probability
    if view_tag in FRONTAL_TAGS and not image_lateral:
        return ViewDecision(view_tag, "tag", image_view, confidence, True)
    if view_tag == "LATERAL" and image_lateral:
        return ViewDecision("LATERAL", "tag", image_view, confidence, False)
    if image_lateral:
        return ViewDecision("LATERAL", "image", image_view, confidence, False)
    return ViewDecision("UNKNOWN", "image", image_view, confidence, True)


# uint8 level -> [0, 1]; float16 holds k / 255 closely enough that rint(x * 255) == k
_UNIT_FLOATS = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float16)


def expand_to_display(result: ImageResult, display: np.ndarray | None) -> None:
    """Fill the display-size arrays the reports draw (display image, lung mask, CAM in
    [0, 1], crop box) from the result's maps at the networks' grid."""
    grid = result.grid
    if grid is None or display is None:
        return
    result.display_image = display
    result.lung_mask = resize(grid.lung, *display.shape) >= 128
    if grid.cam is None:
        return
    box = None if grid.box is None else Box(*grid.box)
    cam = paste_back(grid.cam.astype(np.float32), box, grid.work_shape)
    peak = float(cam.max())
    cam8 = to_uint8(cam / peak) if peak > 0 else np.zeros(grid.work_shape, np.uint8)
    result.cam = _UNIT_FLOATS[resize(cam8, *display.shape)]
    if box is not None:  # the crop square on the display grid, for the heatmap
        sy, sx = display.shape[0] / grid.work_shape[0], display.shape[1] / grid.work_shape[1]
        result.cam_box = (
            round(box.top * sy),
            round(box.left * sx),
            round((box.top + box.size) * sy),
            round((box.left + box.size) * sx),
        )


def heatmap_lung_fraction(cam: np.ndarray, lung_mask: np.ndarray) -> float | None:
    """Share of the positive CAM mass that lies inside the lung mask (None: no mass)."""
    positive = np.clip(cam, 0.0, None)
    total = float(positive.sum())
    if total <= 0.0:
        return None
    return float(positive[lung_mask].sum() / total)


class ScreeningModels:
    """The loaded engines plus the CPU glue between them; thread-compatible, not thread-safe."""

    def __init__(
        self,
        segmenter: Any,
        classifier: Any,
        model_info: ModelInfo,
        *,
        scheme: Scheme,
        heatmap: str = "cam",
        max_batch: int = 8,
    ) -> None:
        self.segmenter = segmenter
        self.classifier = classifier
        self.model_info = model_info
        self.scheme: Scheme = scheme
        self.heatmap = heatmap
        self.max_batch = max_batch
        self.engine_calls = 0
        # From the model manifest: the scheme the shipped default threshold belongs to, and
        # this scheme's own validation threshold (see :func:`default_threshold`).
        self.production_scheme: str = scheme
        self.equalized = True  # histogram equalisation of the classifier input (manifest)
        self.validation_threshold: float | None = None
        self.target_sensitivity: float = 0.95
        self.calibration: Calibration = IDENTITY  # applied to every probability vector

    @classmethod
    def from_settings(cls, settings: Settings, *, scheme: Scheme | None = None) -> ScreeningModels:
        from engines.runtime.base import load_engine

        model_dir = (
            Path(settings.model.model_dir) if settings.model.model_dir else SHIPPED_WEIGHTS_DIR
        )
        manifest = read_manifest(model_dir)
        scheme = scheme or settings.model.scheme
        classifiers: dict[str, str] = manifest["classifiers"]
        if scheme not in classifiers:
            raise ValueError(
                f"scheme {scheme!r} has no classifier in {model_dir} (has: {sorted(classifiers)})"
            )
        plan_dir = (
            Path(settings.model.plan_cache_dir)
            if settings.model.plan_cache_dir
            else settings.data_dir / "plans"
        )
        kwargs: dict[str, Any] = {
            "intra_op_threads": settings.model.intra_op_threads,
            "max_batch": settings.model.max_batch,
            "plan_cache_dir": plan_dir,
        }
        segmenter = load_engine(settings.model.engine, model_dir / manifest["segmenter"], **kwargs)
        classifier = load_engine(settings.model.engine, model_dir / classifiers[scheme], **kwargs)
        info = ModelInfo(
            name=manifest["name"],
            version=manifest["version"],
            engine=classifier.version,
            engine_hash=classifier.model_hash,
            scheme=scheme,
            calibration=Calibration.from_json(
                manifest.get("calibration", {}).get(scheme)
            ).description,
        )
        models = cls(
            segmenter,
            classifier,
            info,
            scheme=scheme,
            heatmap=settings.model.heatmap,
            max_batch=settings.model.max_batch,
        )
        models.production_scheme = str(manifest.get("production_scheme", scheme))
        models.equalized = bool(manifest.get("equalized", {}).get(scheme, True))
        thresholds = manifest.get("thresholds", {})
        models.validation_threshold = thresholds.get(scheme)
        models.target_sensitivity = float(manifest.get("target_sensitivity", 0.95))
        models.calibration = Calibration.from_json(manifest.get("calibration", {}).get(scheme))
        return models

    def _run(self, engine: Any, batch: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """One engine call per chunk of at most ``max_batch`` images; (outputs, calls)."""
        parts: dict[str, list[np.ndarray]] = defaultdict(list)
        calls = 0
        for start in range(0, len(batch), self.max_batch):
            calls += 1
            for name, value in engine.infer(batch[start : start + self.max_batch]).items():
                parts[name].append(value)
        self.engine_calls += calls
        outputs = {
            name: values[0] if len(values) == 1 else np.concatenate(values)
            for name, values in parts.items()
        }
        return outputs, calls

    def segment(self, images: list[PreparedImage]) -> tuple[dict[str, np.ndarray], int]:
        """Engine call 1 (lung segmenter + view head) over live images; (outputs, calls)."""
        return self._run(self.segmenter, np.stack([p.network_input for p in images]))  # type: ignore[misc]

    def plan(self, image: PreparedImage, lateral: float, lung: np.ndarray) -> ImagePlan:
        """CPU glue after engine call 1, per image: view, lung mask, classifier input."""
        decision = decide_view(image.view_tag, lateral)
        work = image.work_image
        if work is None:
            assert image.display_image is not None
            work = limit_size(image.display_image, WORK_SIZE)
        plan = ImagePlan(decision, to_uint8(lung), (int(work.shape[0]), int(work.shape[1])))
        if decision.frontal:
            plan.work_mask = resize(lung, *work.shape) >= 0.5
            plan.classifier_input, plan.box = scheme_input(
                work, plan.work_mask, self.scheme, equalized=self.equalized
            )
        return plan

    def classify(self, inputs: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Engine call 2: probabilities and the COVID heat map (CAM, or occlusion) per row."""
        out, calls = self._run(self.classifier, inputs)
        covid = CLASS_NAMES.index("covid")
        if self.heatmap == "occlusion":
            out["heat"] = np.stack(
                [
                    self.occlusion_map(inputs[row], float(out["probabilities"][row, covid]))
                    for row in range(len(inputs))
                ]
            )
            calls += len(inputs)
        else:
            out["heat"] = np.clip(out["cam"][:, covid], 0.0, None)
        return out, calls

    def image_result(
        self,
        image: PreparedImage,
        plan: ImagePlan | None,
        threshold: ThresholdInfo,
        raw: np.ndarray | None = None,
        heat: np.ndarray | None = None,
    ) -> ImageResult:
        """CPU glue after engine call 2, per image: the result with its maps at the grid.

        ``plan`` None: the image never reached the engines (skipped); ``raw``/``heat``
        None: it reached the segmenter only (not frontal)."""
        result = ImageResult(
            source=image.source,
            view_tag=image.view_tag,
            skip_reason=image.skip_reason,
            refused=image.refused,
        )
        if plan is None:
            return result
        decision = plan.decision
        result.view = decision.view  # type: ignore[assignment]
        result.view_source = decision.source  # type: ignore[assignment]
        result.view_image = decision.image_view
        result.view_image_confidence = decision.image_confidence
        result.grid = ResultGrid(lung=plan.lung, work_shape=plan.work_shape)
        if not decision.frontal:
            result.skip_reason = (
                f"lateral view (tag: {image.view_tag or 'none'}, "
                f"image: {decision.image_confidence:.2f})"
            )
            return result
        assert raw is not None and heat is not None and plan.work_mask is not None
        probs = self.calibration.apply(raw)  # the threshold is on this calibrated scale
        result.probabilities = {name: float(probs[k]) for k, name in enumerate(CLASS_NAMES)}
        result.covid_positive = bool(probs[CLASS_NAMES.index("covid")] >= threshold.value)
        result.screened = True
        cam = paste_back(heat, plan.box, plan.work_shape)
        result.heatmap_lung_fraction = heatmap_lung_fraction(cam, plan.work_mask)
        result.grid.cam = heat.astype(np.float16)
        if plan.box is not None:
            result.grid.box = (plan.box.top, plan.box.left, plan.box.size)
        return result

    def infer(self, prepared: list[PreparedImage], threshold: ThresholdInfo) -> list[ImageResult]:
        """Screen any mix of studies in as few engine calls as possible; order is kept.
        The results carry display-size arrays (:func:`expand_to_display`)."""
        live = [i for i, p in enumerate(prepared) if p.skip_reason is None]
        plans: dict[int, ImagePlan] = {}
        rows: dict[int, int] = {}
        out: dict[str, np.ndarray] = {}
        if live:
            seg, _ = self.segment([prepared[i] for i in live])
            for row, i in enumerate(live):
                lateral = float(seg["lateral_probability"][row])
                plans[i] = self.plan(prepared[i], lateral, seg["lung_probability"][row])
            frontal = [i for i in live if plans[i].classifier_input is not None]
            if frontal:
                out, _ = self.classify(np.stack([plans[i].classifier_input for i in frontal]))  # type: ignore[misc]
                rows = {i: row for row, i in enumerate(frontal)}
        results = []
        for i, image in enumerate(prepared):
            at = rows.get(i)
            result = self.image_result(
                image,
                plans.get(i),
                threshold,
                None if at is None else out["probabilities"][at],
                None if at is None else out["heat"][at],
            )
            expand_to_display(result, image.display_image)
            results.append(result)
        return results

    def occlusion_map(self, image: np.ndarray, base_score: float) -> np.ndarray:
        """Occlusion sensitivity (Zeiler & Fergus): a grey patch slides over the input; the
        drop of the COVID score per position. All occluded copies form one engine batch."""
        size = image.shape[-1]
        starts = list(range(0, size - OCCLUSION_PATCH + 1, OCCLUSION_STRIDE))
        copies = []
        for top in starts:
            for left in starts:
                copy = image.copy()
                copy[:, top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] = 0.5
                copies.append(copy)
        self.engine_calls += 1
        scores = self.classifier.infer(np.stack(copies))["probabilities"][:, 0]
        drop = np.clip(base_score - scores, 0.0, None).reshape(len(starts), len(starts))
        heat = np.zeros((size, size), dtype=np.float32)
        count = np.zeros((size, size), dtype=np.float32)
        for a, top in enumerate(starts):
            for b, left in enumerate(starts):
                heat[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += drop[a, b]
                count[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += 1
        return heat / np.maximum(count, 1)


def assemble_study(
    study_instance_uid: str,
    results: list[ImageResult],
    model_info: ModelInfo,
    threshold: ThresholdInfo,
    disclaimer: str,
) -> StudyResult:
    """One study's result; status from its images (screened / no_frontal_image / failed /
    ignored: nothing the screenability gate lets through)."""
    study = StudyResult(
        study_instance_uid=study_instance_uid,
        model=model_info,
        threshold=threshold,
        disclaimer=disclaimer,
    )
    study.set_images(list(results))
    study.finalise_status()
    return study


# --------------------------------------------------------------------------------------
# Offline screening (``screener screen``)


def default_threshold(settings: Settings, models: ScreeningModels | None = None) -> ThresholdInfo:
    """The embedded default operating point (version 0) of the scheme ``models`` run (else
    the configured one), as resolved by :func:`screener.thresholds.embedded_info`."""
    from screener.thresholds import embedded_info

    return embedded_info(settings, None if models is None else models.scheme)


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
        uid = str(ds.get("StudyInstanceUID", "")) or f"unknown:{path.name}"
        studies[uid].append(path)
    return dict(studies)


def screen_paths(
    paths: list[Path],
    settings: Settings,
    threshold: ThresholdInfo | None = None,
    *,
    models: ScreeningModels | None = None,
) -> Iterator[StudyResult]:
    """Screen files and folders in-process, one result per study, in UID order."""
    models = models or ScreeningModels.from_settings(settings)
    threshold = threshold or default_threshold(settings, models)
    for uid, files in sorted(group_by_study(paths).items()):
        prepared = [prepare_instance(f, settings) for f in files]
        try:
            results = models.infer(prepared, threshold)
        except Exception as exc:  # an engine failure fails the study, not the run
            log.exception("screening study failed")
            study = StudyResult(
                study_instance_uid=uid, model=models.model_info, threshold=threshold
            )
            study.status, study.reason = "failed", f"inference failed: {exc}"
            study.set_images(
                [
                    ImageResult(source=p.source, skip_reason=p.skip_reason, refused=p.refused)
                    for p in prepared
                ]
            )
            study.disclaimer = settings.disclaimer
            yield study
            continue
        yield assemble_study(uid, results, models.model_info, threshold, settings.disclaimer)


__all__ = [
    "NET_SIZE",
    "PreparedImage",
    "ScreeningModels",
    "assemble_study",
    "decide_view",
    "default_threshold",
    "heatmap_lung_fraction",
    "prepare_instance",
    "screen_paths",
]
