"""The screening result: what the models said about a study, as one typed structure.

Produced by the screening pipeline (``screener screen``, the workers), consumed by the
reports (SR, heatmap SC), the database and the ``--format jsonl`` output. ``to_json()``
is the public JSONL contract of ``screener screen``; keep its field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

StudyStatus = Literal["screened", "no_frontal_image", "failed", "ignored"]
View = Literal["PA", "AP", "LATERAL", "UNKNOWN"]
ViewSource = Literal["tag", "image"]
CLASS_NAMES: tuple[str, ...] = ("covid", "pneumonia", "normal")


@dataclass(frozen=True)
class ModelInfo:
    """Which model and operating point produced a result (medical honesty: always shown)."""

    name: str  # e.g. "cxr-covid-effnetlite0"
    version: str  # e.g. "1.0.0"
    engine: str = "onnxruntime"
    engine_hash: str = ""  # ONNX sha256 or TensorRT plan key: the device serial in the SR
    scheme: str = "segment"
    calibration: str = ""  # what the reported probabilities are (e.g. Platt-calibrated)
    # the manifest's production scheme ("": not known, as in results stored before 0.2.0);
    # another scheme is another classifier of the same version (see ``screening_ref``)
    production_scheme: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def screening_ref(self) -> str:
        """``ref``, naming the scheme when it is not the production one: the identity the
        output UIDs derive from, so that a site that switches ``model.scheme`` never sends
        other results under the UIDs of the production scheme's (which stay as they were)."""
        if self.production_scheme and self.scheme != self.production_scheme:
            return f"{self.ref}/{self.scheme}"
        return self.ref


@dataclass(frozen=True)
class ThresholdInfo:
    value: float
    version: int = 0  # 0: the embedded default, never set by an admin
    target_sensitivity: float | None = None
    operating_point: str = ""  # human-readable, e.g. "sensitivity >= 0.95 on validation"


@dataclass
class SourceImageRef:
    """Enough of the source instance to reference it from SR/SC and copy patient/study."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    file_path: str | None = None


@dataclass
class ResultGrid:
    """What the report stage needs to draw an image's heatmap, at the networks' grid: the
    infer stage persists this (a few kB), never display-size arrays; the heatmap SC draws
    from it at the display size (``screener.reports.heatmap``), and
    ``screener.screening.cam.expand_to_display`` makes display-size arrays for the rest."""

    lung: np.ndarray  # uint8: lung probability x 255 at the segmenter's grid
    work_shape: tuple[int, int]  # the working image (long side <= 512) the box refers to
    cam: np.ndarray | None = None  # float16 >= 0: COVID heat at the classifier's grid
    box: tuple[int, int, int] | None = None  # crop square (top, left, size); None: whole


@dataclass
class ImageResult:
    source: SourceImageRef
    view: View = "UNKNOWN"
    view_source: ViewSource = "tag"
    view_tag: str | None = None  # what the tags said, recorded even when the image model won
    view_image: str | None = None  # what the image classifier said (None if not run)
    view_image_confidence: float | None = None
    screened: bool = False
    skip_reason: str | None = None
    # refused by the screenability gate (screener/screenability.py): not a candidate at all,
    # so it is listed among the study's ignored objects, never among its images
    refused: bool = False
    probabilities: dict[str, float] | None = None  # keys: CLASS_NAMES
    covid_positive: bool | None = None
    heatmap_lung_fraction: float | None = None
    # Arrays for the reports, not serialised: CAM and lung mask at the network input
    # geometry mapped back onto the source image (float32 in [0, 1] / bool, HxW of source)
    cam: np.ndarray | None = field(default=None, repr=False)
    lung_mask: np.ndarray | None = field(default=None, repr=False)
    display_image: np.ndarray | None = field(default=None, repr=False)  # uint8 MONOCHROME2
    # the same maps at the networks' grid (what the infer stage persists for report)
    grid: ResultGrid | None = field(default=None, repr=False)
    # the classifier's crop box on display_image (top, left, bottom, right; None: the whole
    # image): the heatmap draws no CAM outside it (a list after a JSON round trip)
    cam_box: tuple[int, int, int, int] | None = field(default=None, repr=False)

    @property
    def covid_score(self) -> float | None:
        return None if self.probabilities is None else self.probabilities["covid"]

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.source.sop_instance_uid,
            "view": self.view,
            "view_source": self.view_source,
            "screened": self.screened,
            "skip_reason": self.skip_reason,
            "probabilities": (
                None
                if self.probabilities is None
                else {k: round(float(self.probabilities[k]), 6) for k in CLASS_NAMES}
            ),
            "covid_positive": self.covid_positive,
            "heatmap_lung_fraction": (
                None
                if self.heatmap_lung_fraction is None
                else round(float(self.heatmap_lung_fraction), 4)
            ),
        }


@dataclass
class StudyResult:
    study_instance_uid: str
    model: ModelInfo
    threshold: ThresholdInfo
    images: list[ImageResult] = field(default_factory=list)
    # objects the screenability gate refused (dose SRs, KOS, CT, secondary captures, ...)
    ignored_objects: list[ImageResult] = field(default_factory=list)
    status: StudyStatus = "screened"
    reason: str | None = None
    outputs: list[str] = field(default_factory=list)
    disclaimer: str = "NOT FOR DIAGNOSTIC USE."

    @property
    def screened_images(self) -> list[ImageResult]:
        return [im for im in self.images if im.screened]

    @property
    def study_covid_score(self) -> float | None:
        """The study score is the maximum COVID probability over its screened images."""
        scores = [im.covid_score for im in self.screened_images if im.covid_score is not None]
        return max(scores) if scores else None

    @property
    def study_covid_positive(self) -> bool | None:
        score = self.study_covid_score
        return None if score is None else score >= self.threshold.value

    def set_images(self, results: list[ImageResult]) -> None:
        """Split results into the study's images and the objects the gate refused."""
        self.images = [r for r in results if not r.refused]
        self.ignored_objects = [r for r in results if r.refused]

    def finalise_status(self) -> None:
        """Derive status/reason from the images when the pipeline has not set a failure."""
        if self.status == "failed":
            return
        if not self.images:
            self.status = "ignored"
            self.reason = ignored_reason(self.ignored_objects)
            return
        if self.screened_images:
            self.status = "screened"
            self.reason = None
        elif any(im.skip_reason and "decode" in im.skip_reason for im in self.images):
            self.status = "failed"
            self.reason = "; ".join(sorted({im.skip_reason or "" for im in self.images}))
        else:
            self.status = "no_frontal_image"
            self.reason = self.reason or "no frontal (AP/PA) chest image in the study"

    def to_json(self) -> dict[str, Any]:
        score = self.study_covid_score
        return {
            "study_instance_uid": self.study_instance_uid,
            "status": self.status,
            "reason": self.reason,
            "model": self.model.ref,
            "threshold": self.threshold.value,
            "threshold_version": self.threshold.version,
            "operating_point": self.threshold.operating_point,
            "probability_calibration": self.model.calibration,
            "disclaimer": self.disclaimer,
            "study_covid_score": None if score is None else round(float(score), 6),
            "study_covid_positive": self.study_covid_positive,
            "images": [im.to_json() for im in self.images],
            "ignored_objects": [
                {
                    "sop_instance_uid": im.source.sop_instance_uid,
                    "sop_class_uid": im.source.sop_class_uid,
                    "skip_reason": im.skip_reason,
                }
                for im in self.ignored_objects
            ],
            "outputs": list(self.outputs),
        }


def ignored_reason(objects: list[ImageResult]) -> str:
    """'nothing screenable: 2 x not an image (...); 1 x ...' (counts per distinct reason)."""
    if not objects:
        return "nothing screenable: the study holds no object"
    counts: dict[str, int] = {}
    for im in objects:
        key = im.skip_reason or "no reason given"
        counts[key] = counts.get(key, 0) + 1
    return "nothing screenable: " + "; ".join(f"{n} x {why}" for why, n in sorted(counts.items()))
