"""The infer stage's models: the loaded engines plus the CPU glue between them.

Engine call 1 = lung segmenter + frontal/lateral head (:meth:`~ScreeningModels.segment`);
CPU glue per image (:meth:`~ScreeningModels.plan`: view, lung mask, the scheme's classifier
input); engine call 2 = classifier -> probabilities + heat map
(:meth:`~ScreeningModels.classify`); CPU glue per image
(:meth:`~ScreeningModels.image_result`: calibration, call, CAM lung fraction, the CAM and
lung mask at the networks' grid). Two engine calls per batch, whatever the batch holds; the
infer consumer runs the steps on separate threads, the offline path in a row
(:meth:`~ScreeningModels.infer`). What is loaded, and how each scheme is preprocessed and
calibrated, comes from the model manifest (:mod:`engines.manifest`) and nowhere else.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.calibration import IDENTITY, Calibration  # numpy only, no torch
from engines.manifest import MANIFEST_NAME, ModelManifest, load_manifest
from screener.imaging.preprocess import (
    NET_SIZE,
    WORK_SIZE,
    Box,
    Scheme,
    limit_size,
    resized_at_least,
    scheme_input,
    to_uint8,
)
from screener.results import CLASS_NAMES, ImageResult, ModelInfo, ResultGrid, ThresholdInfo
from screener.screening.cam import (
    attach_display,
    occlusion_copies,
    occlusion_heat,
    pasted_heat_lung_fraction,
)
from screener.screening.prepare import PreparedImage
from screener.screening.view_decision import ViewDecision, decide_view
from screener.settings import Settings


@dataclass
class ImagePlan:
    """One live image between the two engine calls (the CPU glue's output)."""

    decision: ViewDecision
    lung: np.ndarray  # uint8 lung probability at the segmenter's grid
    work_shape: tuple[int, int]  # the working image (long side <= WORK_SIZE)
    work_mask: np.ndarray | None = None  # bool at the working image (frontal images)
    classifier_input: np.ndarray | None = None  # float32 (1, S, S) (frontal images)
    box: Box | None = None  # the scheme's crop square on the working image


SUPPORTED_INPUT = (1, NET_SIZE, NET_SIZE)  # what prepare and the infer glue build


def require_file(manifest: ModelManifest, file_name: str) -> None:
    """FileNotFoundError naming a network file the manifest names and its folder lacks
    (before the engine's own error, which names it in a longer message)."""
    if not manifest.path(file_name).is_file():
        raise FileNotFoundError(
            f"{manifest.path(file_name)} is missing ({MANIFEST_NAME} of {manifest.ref} names "
            "it): export the weights and model.json together (`screener export`)"
        )


def check_engine(manifest: ModelManifest, file_name: str, engine: Any) -> None:
    """Refuse a network that is not the one the manifest describes: another file under the
    manifest's name (its SHA-256 differs: it would be reported under the manifest's name,
    calibration and threshold), or an input this version does not build (every study
    would fail at inference). ValueError naming the file."""
    expected = manifest.sha256.get(file_name)
    if expected and engine.model_hash and engine.model_hash != expected:
        raise ValueError(
            f"{manifest.path(file_name)} is not the network {manifest.ref} describes: its "
            f"SHA-256 is {engine.model_hash[:12]}..., the manifest's {expected[:12]}... "
            "(export the weights and model.json together)"
        )
    shape = tuple(int(v) for v in engine.input_spec.shape)
    if shape != SUPPORTED_INPUT or tuple(manifest.input_shape) != SUPPORTED_INPUT:
        raise ValueError(
            f"{manifest.path(file_name)} takes input {shape} (manifest: "
            f"{tuple(manifest.input_shape)}); this version builds {SUPPORTED_INPUT}"
        )


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
        self.equalized = True  # histogram equalisation of the classifier input (manifest)
        self.calibration: Calibration = IDENTITY  # applied to every probability vector
        # the manifest the networks were loaded from: its thresholds go with them, whatever
        # model.json says later (an export into the live folder)
        self.manifest: ModelManifest | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, scheme: Scheme | None = None) -> ScreeningModels:
        """Load the segmenter and ``scheme``'s classifier (default: the configured scheme)
        named by the manifest of ``settings.model.model_dir`` (default: the shipped weights).

        Raises FileNotFoundError (no manifest) or ValueError (the scheme does not ship, or a
        network is not the one the manifest describes: see :func:`check_engine`)."""
        from engines.runtime.base import load_engine

        manifest = load_manifest(settings.model.model_dir)
        scheme = scheme or settings.model.scheme
        shipped = manifest.scheme(scheme)
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
        for name in (manifest.segmenter, shipped.classifier):
            require_file(manifest, name)
        engine = settings.model.engine
        segmenter = load_engine(engine, manifest.path(manifest.segmenter), **kwargs)
        classifier = load_engine(engine, manifest.path(shipped.classifier), **kwargs)
        check_engine(manifest, manifest.segmenter, segmenter)
        check_engine(manifest, shipped.classifier, classifier)
        info = ModelInfo(
            name=manifest.name,
            version=manifest.version,
            engine=classifier.version,
            engine_hash=classifier.model_hash,
            scheme=scheme,
            calibration=shipped.calibration.description,
            production_scheme=manifest.production_scheme,
        )
        models = cls(
            segmenter,
            classifier,
            info,
            scheme=scheme,
            heatmap=settings.model.heatmap,
            max_batch=settings.model.max_batch,
        )
        models.equalized = shipped.equalized
        models.calibration = shipped.calibration
        models.manifest = manifest
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
            height, width = plan.work_shape
            plan.work_mask = resized_at_least(lung, height, width, 0.5)  # resize() >= 0.5
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
        # the pasted CAM's share inside the lungs, from the CAM at the grid (no pasted map)
        result.heatmap_lung_fraction = pasted_heat_lung_fraction(heat, plan.box, plan.work_mask)
        result.grid.cam = heat.astype(np.float16)
        if plan.box is not None:
            result.grid.box = (plan.box.top, plan.box.left, plan.box.size)
        return result

    def infer(self, prepared: list[PreparedImage], threshold: ThresholdInfo) -> list[ImageResult]:
        """Screen any mix of studies in as few engine calls as possible; order is kept.
        The results carry their display image and crop box (:func:`~.cam.attach_display`):
        the heatmap SC draws the CAM and lungs from the networks' grid, as in the service;
        :func:`~.cam.expand_to_display` makes the display-size arrays where they are wanted."""
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
            attach_display(result, image.display_image)
            results.append(result)
        return results

    def occlusion_map(self, image: np.ndarray, base_score: float) -> np.ndarray:
        """Occlusion sensitivity: all occluded copies of one input form one engine batch."""
        self.engine_calls += 1
        scores = self.classifier.infer(occlusion_copies(image))["probabilities"][:, 0]
        return occlusion_heat(base_score, scores, image.shape[-1])
