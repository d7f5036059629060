"""Where does the score change under lossy compression come from? (validation split)

    nice -n 10 .venv/bin/python -m engines.training.input_variants [--limit N]

Issue 14 asks for calibrated COVID probabilities that move by at most 0.02 on average, and no
call that flips, when the same film is archived as JPEG 2000 10:1 or JPEG q90. The shipped
crop model misses it, and neither robust fine-tunes (``engines.training.robust``) nor other
crop-square rules (``engines.training.box_stability``) reached it. This asks, without
retraining, whether the change is made by how the classifier's input is built: 8-bit
rounding, the crop square's movement, or a single crop.

Every frontal validation film is written as 12-bit MONOCHROME2 DICOM (the reference) and as
the JPEG 2000 10:1 and JPEG q90 copies of ``engines.training.robustness.PERTURBATIONS``; each
goes through decode -> work image -> segmenter -> crop square -> classifier -> calibration
in every variant below, with the shipped networks, calibration and threshold, and the copy is
compared with the reference in the same variant:

- ``A``: the shipped path (8-bit display image, uint8 resize, uint8 histogram equalisation);
- ``B``: as ``A``, but the copy is cut with the reference's square (square movement removed);
- ``F``: a float path (float decode and resize, continuous histogram equalisation
  :func:`equalize_continuous`, for the segmenter's and the classifier's input), its own square;
- ``G``: the float path cut with the uint8 path's square;
- ``D``: the float path cut with the reference's float square;
- ``T`` / ``U``: test-time averaging of the probability vectors of 5 crops (the square and
  the square shifted by +-side/64 in y and in x, :func:`tta_shifts`) on the float (``T``)
  and on the shipped uint8 path (``U``).

The view head's decision is not applied (every film of the frontal split is scored). Per
variant the mean / 95th percentile / largest |change| and the flips at the shipped threshold
per copy, and the COVID-vs-rest and within-source AUCs of the reference, are written into
``engines/weights/metrics.json`` under ``input_variants`` (the model card renders them).
Validation only: the test split is not used for choices, and nothing here is shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset

from engines.calibration import Calibration
from engines.manifest import SHIPPED_WEIGHTS_DIR
from engines.networks import CLASS_NAMES
from engines.training.box_stability import crop_scheme_input
from engines.training.classifier import within_source_aucs
from engines.training.corpus import default_corpus_dir
from engines.training.robustness import PERTURBATIONS, as_received, change_stats, corpus_instance
from engines.training.scoring import frontal_split
from screener import evaluation as ev
from screener.imaging.decode import decode_display, decode_pixels
from screener.imaging.lung_box import Box
from screener.imaging.preprocess import (
    NET_SIZE,
    WORK_SIZE,
    crop,
    limit_size,
    lung_box,
    resize,
    resized_at_least,
    segmenter_input,
)
from screener.screening.prepare import work_image
from screener.testing.dicom_factory import corpus_image

log = logging.getLogger(__name__)
COVID = CLASS_NAMES.index("covid")
COMPRESSION = ("jpeg2000_10to1", "jpeg_baseline_q90")
EQUALIZATION_BINS = 4096
SHIFT_DIVISOR = 64  # TTA crops are shifted by side // SHIFT_DIVISOR (at least 1 px)
TARGET_MEAN_ABS_DELTA = 0.02  # issue 14: mean |change| <= 0.02 and no flip


@dataclass(frozen=True)
class Variant:
    """How one variant builds the classifier input from a film (and the reference's film)."""

    key: str
    description: str
    precision: Literal["uint8", "float"]
    square: Literal["own", "uint8", "reference"]  # uint8: the uint8 path's own square
    crops: int  # 1, or the TTA crops of :func:`tta_shifts`
    shipped: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "A", "shipped path: uint8 work image, resize and equalisation", "uint8", "own", 1, True
    ),
    Variant("B", "uint8 path, the copy cut with the reference's square", "uint8", "reference", 1),
    Variant("F", "float path: float decode, resize, continuous equalisation", "float", "own", 1),
    Variant("G", "float path cut with the uint8 path's square", "float", "uint8", 1),
    Variant("D", "float path, the copy cut with the reference's square", "float", "reference", 1),
    Variant("T", "float path, mean of 5 shifted crops (TTA)", "float", "own", 5),
    Variant("U", "uint8 path, mean of 5 shifted crops (TTA)", "uint8", "own", 5),
)


def equalize_continuous(values: np.ndarray, bins: int = EQUALIZATION_BINS) -> np.ndarray:
    """Histogram equalisation of [0, 1] floats without 8-bit levels: the CDF of a ``bins``-bin
    histogram, interpolated linearly inside each bin, so a value maps to (close to) its rank
    fraction and a small change of a pixel is a small change of its output. As in
    :func:`screener.imaging.preprocess.equalize`, the lowest occupied bin maps to 0; the
    largest value maps to 1 less at most its bin's share (1 only at the bin's upper edge).
    float32 in [0, 1], same shape; an empty or constant image gives 0."""
    x = np.asarray(values, dtype=np.float64)
    hist, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
    occupied = np.flatnonzero(hist)
    if occupied.size == 0:
        return np.zeros(x.shape, dtype=np.float32)
    cdf = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    cdf_min = cdf[occupied[0] + 1]
    out = (np.interp(x, edges, cdf) - cdf_min) / max(cdf[-1] - cdf_min, 1.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def tta_shifts(side: int, divisor: int = SHIFT_DIVISOR) -> list[tuple[int, int]]:
    """(dy, dx) of the 5 TTA crops of a square of ``side`` px: none, then +-side/divisor
    (at least 1 px) in y and in x."""
    s = max(1, side // divisor)
    return [(0, 0), (-s, 0), (s, 0), (0, -s), (0, s)]


def crop_squares(box: Box, crops: int) -> list[Box]:
    """The squares a variant cuts: ``box`` alone, or ``box`` moved by :func:`tta_shifts`."""
    if crops == 1:
        return [box]
    shifts = tta_shifts(box.size)
    if crops != len(shifts):
        raise ValueError(f"{crops} crops: only 1 or {len(shifts)}")
    return [Box(top=box.top + dy, left=box.left + dx, size=box.size) for dy, dx in shifts]


def average_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """TTA: the mean of the crops' raw class vectors (N, 3) -> (3,), calibrated afterwards
    like a single crop's vector (a mean of probability vectors still sums to 1)."""
    return np.asarray(probabilities, dtype=np.float64).mean(axis=0)


def float_segmenter_input(work: np.ndarray, size: int = NET_SIZE) -> np.ndarray:
    """``segmenter_input`` on the float path (continuous equalisation)."""
    return equalize_continuous(resize(limit_size(work, WORK_SIZE), size, size))[None]


def float_crop_input(work: np.ndarray, box: Box, size: int = NET_SIZE) -> np.ndarray:
    """The crop scheme's input on the float path for a given square."""
    return equalize_continuous(resize(crop(work, box), size, size))[None]


@dataclass
class Film:
    """One stored copy of a film on both paths: work images and crop squares."""

    work_uint8: np.ndarray
    work_float: np.ndarray
    box_uint8: Box
    box_float: Box


def prepare_film(ds: Dataset, segmenter: Any) -> Film | None:
    """Decode ``ds`` on both paths and place both squares (one segmenter call); None: the
    segmenter found no lung on a path (the run time would fall back to the raw scheme)."""
    full, _ = decode_display(ds)
    work_u8 = work_image(full)
    work_f = work_image(decode_pixels(ds).pixels.astype(np.float32))
    batch = np.stack([segmenter_input(work_u8), float_segmenter_input(work_f)])
    lung = segmenter.infer(batch)["lung_probability"]
    (h_u8, w_u8), (h_f, w_f) = work_u8.shape, work_f.shape
    box_u8 = lung_box(resized_at_least(lung[0], h_u8, w_u8, 0.5))
    box_f = lung_box(resized_at_least(lung[1], h_f, w_f, 0.5))
    if box_u8 is None or box_f is None:
        return None
    return Film(work_u8, work_f, box_u8, box_f)


def variant_inputs(variant: Variant, film: Film, reference: Film) -> list[np.ndarray]:
    """The classifier inputs (1, S, S) of ``variant`` for ``film``."""
    own = film.box_uint8 if variant.precision == "uint8" else film.box_float
    ref = reference.box_uint8 if variant.precision == "uint8" else reference.box_float
    box = {"own": own, "uint8": film.box_uint8, "reference": ref}[variant.square]
    if variant.precision == "uint8":
        return [crop_scheme_input(film.work_uint8, b) for b in crop_squares(box, variant.crops)]
    return [float_crop_input(film.work_float, b) for b in crop_squares(box, variant.crops)]


def score_film(
    film: Film, reference: Film, classifier: Any, calibration: Calibration, max_batch: int
) -> dict[str, np.ndarray]:
    """Calibrated class vector (3,) of every variant for ``film``."""
    inputs = [variant_inputs(v, film, reference) for v in VARIANTS]
    flat = np.stack([x for xs in inputs for x in xs])
    raw = np.concatenate(
        [
            classifier.infer(flat[s : s + max_batch])["probabilities"]
            for s in range(0, len(flat), max_batch)
        ]
    )
    out, start = {}, 0
    for variant, xs in zip(VARIANTS, inputs, strict=True):
        out[variant.key] = calibration.apply(average_probabilities(raw[start : start + len(xs)]))
        start += len(xs)
    return out


def measure(corpus_dir: Path, rows: list[dict[str, str]], settings: Any) -> dict[str, Any]:
    """Every variant on ``rows`` (see the module docstring): the ``input_variants`` block."""
    from screener.screening.models import ScreeningModels
    from screener.thresholds import embedded_info

    models = ScreeningModels.from_settings(settings, scheme="crop")
    threshold = embedded_info(settings, "crop")
    reference: dict[str, list[np.ndarray]] = {v.key: [] for v in VARIANTS}
    kept: list[int] = []
    pairs: dict[str, dict[str, tuple[list[float], list[float]]]] = {
        name: {v.key: ([], []) for v in VARIANTS} for name in COMPRESSION
    }
    started = time.process_time()
    for i, row in enumerate(rows):
        pixels = corpus_image(corpus_dir, row["id"])
        ref_film = prepare_film(
            as_received(corpus_instance(pixels, row, bits_stored=12)), models.segmenter
        )
        if ref_film is None:
            log.warning("%s: no lung square on the reference, left out", row["id"])
            continue
        kept.append(i)
        ref_scores = score_film(
            ref_film, ref_film, models.classifier, models.calibration, models.max_batch
        )
        for key, vector in ref_scores.items():
            reference[key].append(vector)
        for name in COMPRESSION:
            copy_film = prepare_film(
                as_received(PERTURBATIONS[name](pixels, row)), models.segmenter
            )
            if copy_film is None:
                log.warning("%s %s: no lung square, left out of this copy", row["id"], name)
                continue
            scores = score_film(
                copy_film, ref_film, models.classifier, models.calibration, models.max_batch
            )
            for key, vector in scores.items():
                pairs[name][key][0].append(float(ref_scores[key][COVID]))
                pairs[name][key][1].append(float(vector[COVID]))
        if i % 25 == 0:
            log.info("%d / %d films, %.0f s CPU", i + 1, len(rows), time.process_time() - started)
    kept_rows = [rows[i] for i in kept]
    labels = np.array([r["label"] == "covid" for r in kept_rows])
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        probs = np.stack(reference[v.key])
        aucs = within_source_aucs(kept_rows, probs)
        variants[v.key] = {
            **{k: val for k, val in asdict(v).items() if k != "key"},
            "n": len(kept_rows),
            "covid_vs_rest_auc": ev.roc_auc(labels, probs[:, COVID]),
            "ieee8023_covid_vs_other_auc": aucs["ieee8023_covid_vs_other_auc"],
            "nih_pneumonia_vs_normal_auc": aucs["nih_pneumonia_vs_normal_auc"],
            "copies": {
                name: change_stats(
                    np.array(pairs[name][v.key][0]),
                    np.array(pairs[name][v.key][1]),
                    threshold.value,
                )
                for name in COMPRESSION
            },
        }
    return {
        "split": "val",
        "scheme": "crop",
        "n": len(kept_rows),
        "threshold": threshold.value,
        "target_mean_abs_delta": TARGET_MEAN_ABS_DELTA,
        "equalization_bins": EQUALIZATION_BINS,
        "shift_divisor": SHIFT_DIVISOR,
        "variants": variants,
    }


def record(block: dict[str, Any], weights: Path) -> Path:
    """Write ``block`` into ``weights/metrics.json`` under ``input_variants``."""
    path = weights / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["input_variants"] = block
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    return path


def main() -> None:
    from screener.settings import Settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)  # not the JPEG 2000 decoder's per-tile messages
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0, help="first N films, printed only")
    args = parser.parse_args()
    corpus = args.corpus or default_corpus_dir()
    rows = frontal_split(corpus, "val")
    if args.limit:
        rows = rows[: args.limit]
    settings = Settings(model={"model_dir": str(SHIPPED_WEIGHTS_DIR)})
    block = measure(corpus, rows, settings)
    for key, v in block["variants"].items():
        cells = "  ".join(
            f"{name} {c['mean_abs_delta']:.4f} p95 {c['p95_abs_delta']:.4f} "
            f"max {c['max_abs_delta']:.4f} ({c['flips']})"
            for name, c in v["copies"].items()
        )
        print(f"{key}  AUC {v['covid_vs_rest_auc']:.3f}  {cells}")
    if not args.limit:
        print(record(block, SHIPPED_WEIGHTS_DIR))


if __name__ == "__main__":
    main()
