"""How much the run-time score moves when an archive stores the same film differently.

    nice -n 10 .venv/bin/python -m engines.training.robustness [--limit N]

Each test-split image is written as 12-bit MONOCHROME2 DICOM (the reference, as
``dicom_eval_set`` writes it) and again as: JPEG 2000 lossy at 10:1, JPEG baseline quality 90
(8-bit), MONOCHROME1, 8 / 14 / 16 bits stored, and rotated by -5 / +5 degrees. Every variant
goes through the whole run-time path (DICOM decode, prepare, both engines, calibration) and
is compared with the reference: mean and largest |change of the calibrated COVID
probability| and the number of COVID calls that flip at the shipped threshold.

Two further copies are smaller than anything a lossy codec does, so they measure the floor
under the lossy-compression target: uniform noise of at most one grey level of the 8-bit
source (16 of 4095 stored values) and the film moved by one pixel. With them the module
counts the reference scores that lie near the threshold: a call cannot be kept from flipping
by a copy that moves its score further than its distance to the threshold.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEGBaseline8Bit

from engines.manifest import SHIPPED_WEIGHTS_DIR
from engines.training.corpus import default_corpus_dir
from engines.training.scoring import frontal_split
from screener.testing.dicom_factory import StudyIdentity, corpus_image, make_instance

VIEW_TAGS = {"PA": "PA", "AP": "AP", "AP_SUPINE": "AP", "UNKNOWN": None}
J2K_RATIO = 10
JPEG_QUALITY = 90


def corpus_instance(pixels: np.ndarray, row: dict[str, str], **kwargs: Any) -> Dataset:
    modality = row["modality"] if row["modality"] in ("CR", "DX") else "CR"
    study = StudyIdentity.new(patient_sex=row["sex"] or "O")
    return make_instance(
        pixels,
        study=study,
        modality=modality,
        view_position=VIEW_TAGS.get(row["view"]),
        **kwargs,
    )


def as_received(ds: Dataset) -> Dataset:
    """Write and read back, as the listener would receive it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _j2k(pixels: np.ndarray, row: dict[str, str]) -> Dataset:
    ds = corpus_instance(pixels, row, bits_stored=12)
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[J2K_RATIO])
    return ds


def _jpeg(pixels: np.ndarray, row: dict[str, str]) -> Dataset:
    ds = corpus_instance(pixels, row, bits_stored=8)
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def _grey_level_noise(pixels: np.ndarray, row: dict[str, str]) -> Dataset:
    """Uniform integer noise of at most one grey level of the 8-bit source, per pixel
    (fixed seed: the same copy every run)."""
    ds = corpus_instance(pixels, row, bits_stored=12)
    stored = ds.pixel_array.astype(np.int32)
    level = round(((1 << int(ds.BitsStored)) - 1) / 255)
    noise = np.random.default_rng(1).integers(-level, level + 1, stored.shape)
    ds.PixelData = (
        np.clip(stored + noise, 0, (1 << int(ds.BitsStored)) - 1).astype(np.uint16).tobytes()
    )
    return ds


def _shifted_one_pixel(pixels: np.ndarray, row: dict[str, str]) -> Dataset:
    """The film moved right by one stored pixel (the first column repeated)."""
    ds = corpus_instance(pixels, row, bits_stored=12)
    stored = ds.pixel_array
    moved = np.concatenate([stored[:, :1], stored[:, :-1]], axis=1)
    ds.PixelData = np.ascontiguousarray(moved).tobytes()
    return ds


def _rotated(degrees: float) -> Callable[[np.ndarray, dict[str, str]], Dataset]:
    def make(pixels: np.ndarray, row: dict[str, str]) -> Dataset:
        image = Image.fromarray(pixels).rotate(degrees, resample=Image.Resampling.BILINEAR)
        return corpus_instance(np.asarray(image), row, bits_stored=12)

    return make


PERTURBATIONS: dict[str, Callable[[np.ndarray, dict[str, str]], Dataset]] = {
    "jpeg2000_10to1": _j2k,
    "jpeg_baseline_q90": _jpeg,
    "monochrome1": lambda px, row: corpus_instance(
        px, row, bits_stored=12, photometric="MONOCHROME1"
    ),
    "bits_8": lambda px, row: corpus_instance(px, row, bits_stored=8),
    "bits_14": lambda px, row: corpus_instance(px, row, bits_stored=14),
    "bits_16": lambda px, row: corpus_instance(px, row, bits_stored=16),
    "rotate_minus_5": _rotated(-5.0),
    "rotate_plus_5": _rotated(5.0),
    "noise_one_grey_level": _grey_level_noise,
    "shift_one_pixel": _shifted_one_pixel,
}

# distances to the threshold at which the reference scores are counted
NEAR_THRESHOLD = (0.005, 0.01, 0.02)


def change_stats(reference: np.ndarray, copy: np.ndarray, threshold: float) -> dict[str, Any]:
    """|change| of the calibrated COVID probability from reference to copy, and the calls
    that flip at ``threshold`` (positive: >= threshold, as the service calls): the figures
    every archive-copy measurement reports (here, ``robust``, ``box_stability``,
    ``input_variants``)."""
    r, c = np.asarray(reference, dtype=np.float64), np.asarray(copy, dtype=np.float64)
    delta = np.abs(c - r)
    return {
        "n": len(delta),
        "mean_abs_delta": float(delta.mean()),
        "p95_abs_delta": float(np.percentile(delta, 95)),
        "max_abs_delta": float(delta.max()),
        "flips": int(np.sum((c >= threshold) != (r >= threshold))),
    }


@dataclass
class Stability:
    """One perturbation against the reference, over the images screened in both."""

    name: str
    n: int
    mean_abs_delta: float
    max_abs_delta: float
    flips: int
    deltas: list[float]
    rms_grey_levels: float | None = None  # mean RMS pixel difference, 8-bit grey levels

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "rms_grey_levels": self.rms_grey_levels,
            "mean_abs_delta": self.mean_abs_delta,
            "p95_abs_delta": float(np.percentile(np.abs(self.deltas), 95)) if self.deltas else None,
            "max_abs_delta": self.max_abs_delta,
            "flips": self.flips,
        }


def near_threshold(reference: np.ndarray, threshold: float) -> dict[str, int]:
    """How many screened reference scores lie within each distance of ``NEAR_THRESHOLD``
    of the threshold (keys as printed: "0.01")."""
    scores = np.asarray(reference, dtype=np.float64)
    distance = np.abs(scores[~np.isnan(scores)] - threshold)
    return {f"{d:g}": int(np.sum(distance < d)) for d in NEAR_THRESHOLD}


@dataclass
class Measurement:
    """Every perturbation against the reference, and the reference scores' margins."""

    perturbations: dict[str, Stability]
    threshold: float
    near_threshold: dict[str, int]


def grey_levels(ds: Dataset) -> np.ndarray:
    """The stored pixels as 8-bit grey levels (0 black .. 255 white, MONOCHROME2 sense)."""
    scale = 255.0 / ((1 << int(ds.BitsStored)) - 1)
    grey = ds.pixel_array.astype(np.float32) * np.float32(scale)
    return 255.0 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def pixel_rms(reference: Dataset, copy: Dataset) -> float:
    """RMS difference of two films of the same size, in grey levels of the 8-bit source:
    how much a copy changed the pixels, whatever it did to the score."""
    diff = grey_levels(copy) - grey_levels(reference)
    return float(np.sqrt(np.mean(np.square(diff, dtype=np.float64))))


def _scores(datasets: list[Dataset], models: Any, settings: Any, threshold: Any) -> list[float]:
    from screener.screening.prepare import prepare_dataset

    prepared = [
        prepare_dataset(as_received(ds), Path(f"{i}.dcm"), settings)
        for i, ds in enumerate(datasets)
    ]
    results = models.infer(prepared, threshold)
    return [np.nan if r.covid_score is None else float(r.covid_score) for r in results]


def measure(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    names: list[str] | None = None,
    settings: Any = None,
) -> Measurement:
    """Reference vs each perturbation (``names``, default all) through the run-time path."""
    from screener.screening.models import ScreeningModels
    from screener.settings import Settings
    from screener.thresholds import embedded_info

    settings = settings or Settings()
    models = ScreeningModels.from_settings(settings)
    threshold = embedded_info(settings, models.scheme)
    images = [corpus_image(corpus_dir, r["id"]) for r in rows]
    reference = np.array(
        _scores(
            [corpus_instance(px, r, bits_stored=12) for px, r in zip(images, rows, strict=True)],
            models,
            settings,
            threshold,
        )
    )
    out = {}
    for name in names or list(PERTURBATIONS):
        make = PERTURBATIONS[name]
        copies = [make(px, r) for px, r in zip(images, rows, strict=True)]
        rms = [
            pixel_rms(as_received(corpus_instance(px, r, bits_stored=12)), as_received(c))
            for px, r, c in zip(images, rows, copies, strict=True)
        ]
        scores = np.array(_scores(copies, models, settings, threshold))
        both = ~np.isnan(reference) & ~np.isnan(scores)
        stats = change_stats(reference[both], scores[both], threshold.value)
        out[name] = Stability(
            name=name,
            n=stats["n"],
            mean_abs_delta=stats["mean_abs_delta"],
            max_abs_delta=stats["max_abs_delta"],
            flips=stats["flips"],
            deltas=[float(d) for d in scores[both] - reference[both]],
            rms_grey_levels=float(np.mean(rms)),
        )
    return Measurement(out, threshold.value, near_threshold(reference, threshold.value))


def plot(results: dict[str, Stability], path: Path) -> Path:
    """Box plot of the signed score change per perturbation."""
    from screener.evaluation import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    names = list(results)
    ax.boxplot([results[n].deltas for n in names], orientation="vertical", showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    ax.axhline(0.0, color="k", linewidth=0.6)
    for limit in (-0.02, 0.02):
        ax.axhline(limit, color="r", linestyle=":", linewidth=0.8)
    ax.set(ylabel="change of calibrated COVID probability", title="Stability (test split)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS_DIR)
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0, help="first N test images (0: all)")
    args = parser.parse_args()
    corpus = args.corpus or default_corpus_dir()
    rows = frontal_split(corpus, "test")
    if args.limit:
        rows = rows[: args.limit]
    measured = measure(corpus, rows)
    results = measured.perturbations
    metrics_path = args.weights / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["robustness"] = {
        "split": "test",
        "n_images": len(rows),
        "figure": plot(results, args.weights / "robustness.png").name,
        "perturbations": {k: v.to_json() for k, v in results.items()},
        "threshold": measured.threshold,
        "near_threshold": measured.near_threshold,
    }
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics["robustness"], indent=1))


if __name__ == "__main__":
    main()
