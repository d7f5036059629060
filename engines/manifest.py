"""The model manifest (``model.json``): one typed description of the shipped models.

Written by training (``install_weights``, ``engines.training.calibrate``) and read by the
service, offline screening, reprocess and the console: file names and hashes (of each ONNX
network and of the torch sidecar beside it, see :func:`write_manifest`), the schemes,
per scheme the validation operating point (threshold with its validation sensitivity and
specificity) and the probability calibration the threshold is expressed in. The embedded
default threshold of a scheme is resolved here and nowhere else.

The JSON keeps the keys older readers use (``classifiers``, ``thresholds``, ``equalized``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engines.calibration import IDENTITY, Calibration
from screener import atomic_files

MANIFEST_NAME = "model.json"
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SIDECAR_SUFFIX = ".torch.pt"  # the torch engine's weights beside each ONNX network


def sidecar_name(network: str) -> str:
    """The file name of the torch sidecar of the ONNX file ``network`` (``x.onnx`` ->
    ``x.torch.pt``): the key of its SHA-256 in the manifest's ``sha256``."""
    return Path(network).with_suffix(SIDECAR_SUFFIX).name


def model_dir(configured: str | Path | None = None) -> Path:
    """The weights folder: the configured one (``settings.model.model_dir``) or the shipped."""
    return Path(configured) if configured else SHIPPED_WEIGHTS_DIR


@dataclass(frozen=True)
class Rate:
    """k of n with its Wilson 95% interval (computed when the manifest was written)."""

    k: int
    n: int
    low: float | None = None
    high: float | None = None

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    def __str__(self) -> str:
        if not self.n:
            return "n/a"
        interval = "" if self.low is None else f" [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.k / self.n:.3f}{interval} ({self.k}/{self.n})"

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Rate | None:
        if not data:
            return None
        return cls(int(data["k"]), int(data["n"]), data.get("low"), data.get("high"))


@dataclass(frozen=True)
class OperatingPoint:
    """A scheme's shipped threshold and what it achieved where it was chosen."""

    threshold: float  # on the scale of the scheme's calibrated probability
    target_sensitivity: float
    sensitivity: Rate | None = None  # COVID sensitivity on the validation split
    specificity: Rate | None = None  # COVID specificity on the validation split
    raw_threshold: float | None = None  # the same cut on the uncalibrated network output
    split: str = "validation"

    def is_threshold(self, value: float) -> bool:
        """True when ``value`` is this point's threshold as shipped (the configured default is
        the exact threshold rounded down to 4 decimals); any other value is a site's own and
        this point's validation figures do not describe it."""
        return self.threshold - 1e-4 < value <= self.threshold + 1e-9

    def describe(self) -> str:
        """Human-readable operating point, e.g. for the SR, the SC and ``threshold show``."""
        text = f"sensitivity >= {self.target_sensitivity:.2f} on the {self.split} split"
        if self.sensitivity is not None and self.specificity is not None:
            text += f" (sensitivity {self.sensitivity}, specificity {self.specificity})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "target_sensitivity": self.target_sensitivity,
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_json(),
            "specificity": None if self.specificity is None else self.specificity.to_json(),
            "raw_threshold": self.raw_threshold,
            "split": self.split,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OperatingPoint:
        return cls(
            threshold=float(data["threshold"]),
            target_sensitivity=float(data["target_sensitivity"]),
            sensitivity=Rate.from_json(data.get("sensitivity")),
            specificity=Rate.from_json(data.get("specificity")),
            raw_threshold=data.get("raw_threshold"),
            split=str(data.get("split", "validation")),
        )


@dataclass(frozen=True)
class SchemeModel:
    """One shipped classifier scheme: its file, preprocessing flag, threshold, calibration."""

    name: str
    classifier: str
    equalized: bool
    operating_point: OperatingPoint
    calibration: Calibration = IDENTITY


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    segmenter: str
    production_scheme: str
    target_sensitivity: float
    schemes: dict[str, SchemeModel]
    sha256: dict[str, str] = field(default_factory=dict)
    directory: Path = SHIPPED_WEIGHTS_DIR

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def scheme(self, name: str) -> SchemeModel:
        """The named scheme, or a ValueError saying which ones ship."""
        if name not in self.schemes:
            ships = sorted(self.schemes)
            where = self.directory
            raise ValueError(f"scheme {name!r} has no classifier in {where} (has: {ships})")
        return self.schemes[name]

    def operating_point(self, scheme: str) -> OperatingPoint:
        return self.scheme(scheme).operating_point

    def calibration(self, scheme: str) -> Calibration:
        return self.scheme(scheme).calibration

    def path(self, file_name: str) -> Path:
        return self.directory / file_name

    @property
    def networks(self) -> tuple[str, ...]:
        """The ONNX files the manifest names: the segmenter, then each scheme's classifier."""
        return (self.segmenter, *(s.classifier for s in self.schemes.values()))

    def sidecar_sha256(self, network: str) -> str | None:
        """The SHA-256 recorded for the torch sidecar of ``network`` (an ONNX file name);
        None in a manifest written before sidecars were recorded."""
        return self.sha256.get(sidecar_name(network))

    def to_json(self) -> dict[str, Any]:
        s = self.schemes
        return {
            "name": self.name,
            "version": self.version,
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "segmenter": self.segmenter,
            "classifiers": {k: v.classifier for k, v in s.items()},
            "production_scheme": self.production_scheme,
            "thresholds": {k: v.operating_point.threshold for k, v in s.items()},
            "target_sensitivity": self.target_sensitivity,
            "equalized": {k: v.equalized for k, v in s.items()},
            "operating_points": {k: v.operating_point.to_json() for k, v in s.items()},
            "calibration": {k: v.calibration.to_json() for k, v in s.items()},
            "sha256": dict(self.sha256),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> ModelManifest:
        """The typed manifest; a ValueError naming the file and the missing key when ``data``
        is not a manifest this version reads (e.g. an old one, from another version)."""
        check_manifest_json(data, directory)
        target = float(data.get("target_sensitivity", 0.95))
        points = data.get("operating_points") or {}
        calibrations = data.get("calibration") or {}
        schemes = {}
        for name, classifier in data["classifiers"].items():
            point = points.get(name) or {
                "threshold": data["thresholds"][name],
                "target_sensitivity": target,
            }
            schemes[name] = SchemeModel(
                name=name,
                classifier=str(classifier),
                equalized=bool(data.get("equalized", {}).get(name, True)),
                operating_point=OperatingPoint.from_json(point),
                calibration=Calibration.from_json(calibrations.get(name)),
            )
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            input_shape=tuple(int(v) for v in data.get("input_shape", (1, 224, 224))),
            class_names=tuple(data.get("class_names", ("covid", "pneumonia", "normal"))),
            segmenter=str(data["segmenter"]),
            production_scheme=str(data.get("production_scheme", next(iter(schemes)))),
            target_sensitivity=target,
            schemes=schemes,
            sha256=dict(data.get("sha256", {})),
            directory=directory,
        )


REQUIRED_KEYS = ("classifiers", "segmenter", "name", "version")
REEXPORT = "export the weights again with `screener export`"


def check_manifest_json(data: Any, directory: Path) -> None:
    """Refuse, with a ValueError naming the file and the key, a ``model.json`` this version
    cannot read: otherwise an old or foreign manifest fails later as a bare ``KeyError``."""
    path = directory / MANIFEST_NAME
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a model manifest (not a JSON object); {REEXPORT}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"{path} is missing {key!r} — from another version? {REEXPORT}")
    classifiers = data["classifiers"]
    if not isinstance(classifiers, dict) or not classifiers:
        raise ValueError(f"{path}: 'classifiers' names no classifier; {REEXPORT}")
    points = data.get("operating_points") or {}
    thresholds = data.get("thresholds") or {}
    for name in classifiers:
        if name not in points and name not in thresholds:
            raise ValueError(
                f"{path} has no threshold for scheme {name!r} (neither 'operating_points' nor "
                f"'thresholds') — from another version? {REEXPORT}"
            )


def read_manifest_json(directory: Path) -> dict[str, Any]:
    """The raw JSON (for tools that only need a key); prefer :func:`load_manifest`."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: no trained models there")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:  # a truncated or hand-edited file: say which
        raise ValueError(f"{path} is not valid JSON ({exc}): export the weights again") from exc
    return data


def load_manifest(directory: str | Path | None = None) -> ModelManifest:
    """The typed manifest of ``directory`` (default: the shipped weights)."""
    folder = model_dir(directory)
    return ModelManifest.from_json(read_manifest_json(folder), folder)


def with_sidecar_digests(manifest: ModelManifest, directory: Path) -> ModelManifest:
    """``manifest`` with the SHA-256 of the torch sidecar beside each of its ONNX networks
    in ``directory`` (``sha256["x.torch.pt"]``), as the files are now: the torch engine
    refuses a sidecar that differs (a stale or swapped copy would run other weights under
    the manifest's name, hash, calibration and threshold). A recorded digest whose sidecar
    is gone is dropped; a network without a sidecar gets none."""
    from engines.runtime.base import file_sha256  # numpy and hashlib only: no torch

    digests = dict(manifest.sha256)
    for network in manifest.networks:
        sidecar = directory / sidecar_name(network)
        if sidecar.is_file():
            digests[sidecar.name] = file_sha256(sidecar)
        else:
            digests.pop(sidecar.name, None)
    return replace(manifest, sha256=digests)


def write_manifest(manifest: ModelManifest, directory: Path | None = None) -> Path:
    """Write ``model.json`` into ``directory`` (default: the manifest's), atomically and
    durably. The training tools write it right after exporting the networks, so the sidecar
    digests it records (:func:`with_sidecar_digests`) are those of the export: the ONNX
    digests come from the caller, the sidecars' are taken here for every writer alike."""
    folder = directory or manifest.directory
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    recorded = with_sidecar_digests(manifest, folder)
    atomic_files.write_text(path, json.dumps(recorded.to_json(), indent=1) + "\n")
    return path
