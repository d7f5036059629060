"""The operating point a result was judged at, stated the same way by SR, SC, demo and screen.

A threshold alone tells a reader nothing; what it achieved where it was chosen does. The
embedded default (threshold version 0) takes its numbers from the model manifest's
validation operating point of the scheme (``engines.manifest``), but only when the value in
force is that point's threshold (a site may configure another). A threshold an admin set
carries the text ``threshold tune --apply`` stored with it; its sensitivity and specificity
are read back from that text. A threshold set by hand, or given on the command line, has
no measured operating point, and the statement says so instead of borrowing one.

Texts are ASCII on purpose: they go into DICOM objects whose character set is the
source's, and an ASCII dash never forces a switch to UTF-8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engines.calibration import Calibration
from engines.manifest import ModelManifest, load_manifest, model_dir
from screener.results import ModelInfo, ThresholdInfo
from screener.settings import Settings

# a target sensitivity from here on is a screening (rule-out) choice: say so
SENSITIVITY_FIRST = 0.9

_SENSITIVITY = re.compile(r"(?<!target )sensitivity (\d(?:\.\d+)?)")
_SPECIFICITY = re.compile(r"specificity (\d(?:\.\d+)?)")
_MODEL_REF = re.compile(r"[A-Za-z0-9_.-]+@[0-9][A-Za-z0-9_.+-]*[A-Za-z0-9]")
_METHODS = {
    "temperature": "temperature scaling",
    "platt": "Platt scaling",
    "isotonic": "isotonic regression",
}


@dataclass(frozen=True)
class OperatingPointStatement:
    """The threshold, what it achieved where it was measured, and what the scores are."""

    threshold: float
    version: int
    sensitivity: float | None = None
    specificity: float | None = None
    measured_on: str = ""  # "validation", "tuning set"
    target_sensitivity: float | None = None
    detail: str = ""  # the full operating-point text (intervals, counts, model)
    model_default: bool = False  # version 0 and the manifest's own threshold
    calibration: str = ""  # what the probabilities are (one sentence), "" when unknown
    calibration_short: str = ""  # the same in a few words, for the heatmap margin

    @property
    def measured(self) -> bool:
        return self.sensitivity is not None and self.specificity is not None

    @property
    def sensitivity_first(self) -> bool:
        target = self.target_sensitivity
        if target is None and self.measured:
            target = self.sensitivity
        return target is not None and target >= SENSITIVITY_FIRST

    def headline(self) -> str:
        """E.g. ``COVID-19 threshold 0.1237 (validation: sensitivity 0.95, specificity 0.55)
        - sensitivity-first screening operating point``."""
        head = f"COVID-19 threshold {self.threshold:.4f}"
        if not self.measured:
            return f"{head} (operating point not measured)"
        assert self.sensitivity is not None and self.specificity is not None
        kind = (
            "sensitivity-first screening operating point"
            if self.sensitivity_first
            else "operating point"
        )
        return (
            f"{head} ({self.measured_on}: sensitivity {self.sensitivity:.2f}, "
            f"specificity {self.specificity:.2f}) - {kind}"
        )

    def origin(self) -> str:
        """Where the threshold comes from, with its version (the audit trail's key)."""
        if self.version == 0:
            if self.model_default:
                return "threshold version 0: the model's validation default"
            return "threshold version 0: not the model's validated default"
        return f"threshold version {self.version}, set by an administrator"

    def explanation(self) -> str:
        """The paragraph ``demo`` and ``screen`` print once (not per study)."""
        text = f"Operating point: {self.headline()} ({self.origin()})."
        if self.measured:
            assert self.sensitivity is not None and self.specificity is not None
            where = "validation split" if self.measured_on == "validation" else self.measured_on
            found = round(100 * self.sensitivity)
            false_calls = round(100 * (1.0 - self.specificity))
            text += (
                f" On the {where} it called {found} of 100 COVID-19 images POSITIVE"
                f" and also {false_calls} of 100 images without COVID-19"
            )
            text += (
                ": it is set to miss few cases, so many POSITIVE calls are false alarms."
                if self.sensitivity_first
                else "."
            )
        else:
            text += " Its sensitivity and specificity are unknown; tune it on labelled images."
        text += " A POSITIVE call asks for a radiologist's review; it is not a diagnosis."
        if self.calibration:
            text += f" Probabilities: {self.calibration}."
        return text


def parse_operating_point(text: str) -> tuple[float | None, float | None, str]:
    """Sensitivity, specificity and where they were measured, read from an operating-point
    text (``threshold tune``'s, or the manifest's description); the target sensitivity is
    not a measurement and is skipped."""
    se = _SENSITIVITY.search(text)
    sp = _SPECIFICITY.search(text)
    lowered = text.lower()
    where = (
        "validation"
        if "validation" in lowered
        else "tuning set"
        if "tuning set" in lowered
        else "measured"
    )
    return (
        None if se is None else float(se.group(1)),
        None if sp is None else float(sp.group(1)),
        where,
    )


@lru_cache(maxsize=8)
def _manifest(directory: str, mtime_ns: int) -> ModelManifest:
    return load_manifest(directory)


def manifest_for(model: ModelInfo, settings: Settings) -> ModelManifest | None:
    """The manifest of the configured weights when it describes ``model`` (same name and
    version, the scheme shipped), else None: numbers of another model must not be shown."""
    folder = model_dir(settings.model.model_dir or None)
    try:
        manifest = _manifest(str(folder), (Path(folder) / "model.json").stat().st_mtime_ns)
    except (OSError, ValueError, KeyError):
        return None
    if manifest.ref != model.ref or model.scheme not in manifest.schemes:
        return None
    return manifest


def calibration_texts(calibration: Calibration) -> tuple[str, str]:
    """(one sentence, a few words) on what the probabilities are."""
    if calibration.method == "identity":
        return calibration.description, "uncalibrated network probabilities"
    where = " on validation" if "validation" in calibration.fitted_on else ""
    return (
        calibration.description,
        f"calibrated probabilities ({_METHODS.get(calibration.method, calibration.method)}{where})",
    )


def statement_for(
    threshold: ThresholdInfo, model: ModelInfo | None = None, settings: Settings | None = None
) -> OperatingPointStatement:
    """The statement for a result's threshold (and model, and settings when known).

    An operating-point text that names a model (``name@version``) other than ``model``
    yields no measured numbers: they belong to the model they were measured on."""
    manifest = None if model is None or settings is None else manifest_for(model, settings)
    calibration = short = ""
    if manifest is not None and model is not None:
        calibration, short = calibration_texts(manifest.calibration(model.scheme))
    point = None if manifest is None or model is None else manifest.operating_point(model.scheme)
    if (
        threshold.version == 0
        and point is not None
        and point.sensitivity is not None
        and point.specificity is not None
        and point.is_threshold(threshold.value)
    ):
        return OperatingPointStatement(
            threshold=threshold.value,
            version=0,
            sensitivity=point.sensitivity.value,
            specificity=point.specificity.value,
            measured_on=point.split,
            target_sensitivity=point.target_sensitivity,
            detail=threshold.operating_point or point.describe(),
            model_default=True,
            calibration=calibration,
            calibration_short=short,
        )
    sensitivity, specificity, where = parse_operating_point(threshold.operating_point)
    named = set(_MODEL_REF.findall(threshold.operating_point))
    if model is not None and named and model.ref not in named:
        # measured on another model (e.g. tuned before an upgrade): not this one's numbers
        sensitivity = specificity = None
    return OperatingPointStatement(
        threshold=threshold.value,
        version=threshold.version,
        sensitivity=sensitivity,
        specificity=specificity,
        measured_on=where,
        target_sensitivity=threshold.target_sensitivity,
        detail=threshold.operating_point,
        # without the manifest at hand: a measured version 0 is the manifest's own point
        # (a threshold given on the command line says "given on the command line")
        model_default=(
            threshold.version == 0 and sensitivity is not None and specificity is not None
        ),
        calibration=calibration,
        calibration_short=short,
    )
