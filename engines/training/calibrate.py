"""Fit the COVID probability calibration on validation and ship it with the model.

    nice -n 10 .venv/bin/python -m engines.training.calibrate [--version 1.3.0]

Per shipped scheme: score the validation and test splits with the shipped ONNX files (the
run-time preprocessing), choose temperature / Platt / isotonic by cross-validated log loss on
validation, re-derive the validation threshold on the calibrated scale (a strictly increasing
map: the same validation images are called positive, checked here), measure the expected
calibration error on test before and after (bootstrap 95% intervals), draw reliability
diagrams, and write it all into ``metrics.json`` (card) and ``model.json`` (run time).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engines import calibration as cal
from engines.manifest import (
    SHIPPED_WEIGHTS_DIR,
    ModelManifest,
    OperatingPoint,
    Rate,
    load_manifest,
    write_manifest,
)
from engines.training.corpus import default_corpus_dir
from engines.training.scoring import split_scores
from screener import evaluation as ev

log = logging.getLogger(__name__)


def _rate(p: ev.Proportion) -> Rate:
    return Rate(p.k, p.n, p.low, p.high)


def _interval(values: tuple[float, float, float]) -> dict[str, float]:
    return {"value": values[0], "low": values[1], "high": values[2]}


def calibrate_scheme(
    manifest: ModelManifest,
    scheme: str,
    val: tuple[list[dict[str, str]], np.ndarray],
    test: tuple[list[dict[str, str]], np.ndarray],
    figure: Path | None,
) -> tuple[dict[str, Any], OperatingPoint, cal.Calibration]:
    """Metrics block, new operating point and calibration of one scheme (pure but plotting)."""
    target = manifest.target_sensitivity
    rows_v, probs_v = val
    rows_t, probs_t = test
    y_v = np.array([r["label"] == "covid" for r in rows_v])
    y_t = np.array([r["label"] == "covid" for r in rows_t])
    p_v, p_t = probs_v[:, 0].astype(np.float64), probs_t[:, 0].astype(np.float64)
    fitted_on = f"validation split ({len(p_v)} frontal images, {int(y_v.sum())} COVID)"
    calibration, losses = cal.choose(p_v, y_v, fitted_on)
    raw_threshold = ev.threshold_for_sensitivity(y_v, p_v, target)
    q_v = calibration.covid(p_v)
    threshold = ev.threshold_for_sensitivity(y_v, q_v, target)
    unchanged = bool(np.array_equal(p_v >= raw_threshold, q_v >= threshold))
    if not unchanged:
        raise RuntimeError(f"{scheme}: calibration changed validation calls")
    at = ev.confusion_at(y_v, q_v, threshold)
    q_t = calibration.covid(p_t)
    at_test = ev.confusion_at(y_t, q_t, threshold)
    pn_t = np.array([r["label"] == "pneumonia" for r in rows_t])
    cal_t = calibration.apply(probs_t)
    block: dict[str, Any] = {
        **calibration.to_json(),
        "description": calibration.description,
        "cv_log_loss_val": losses,
        "raw_threshold": raw_threshold,
        "threshold": threshold,
        "val_sensitivity": str(at.sensitivity),
        "val_specificity": str(at.specificity),
        "test_sensitivity": str(at_test.sensitivity),
        "test_specificity": str(at_test.specificity),
        "val_calls_unchanged": unchanged,
        "ece_bins": 10,
        "val": {
            "n": len(p_v),
            "ece_raw": cal.ece(y_v, p_v),
            "ece_calibrated": cal.ece(y_v, q_v),
        },
        "test": {
            "n": len(p_t),
            "n_covid": int(y_t.sum()),
            "ece_raw": _interval(cal.ece_interval(y_t, p_t)),
            "ece_calibrated": _interval(cal.ece_interval(y_t, q_t)),
            "ece_noise_floor_calibrated": cal.ece_noise_floor(q_t),
            "log_loss_raw": cal.log_loss(y_t, p_t),
            "log_loss_calibrated": cal.log_loss(y_t, q_t),
            "pneumonia_ece_raw": cal.ece(pn_t, probs_t[:, 1]),
            "pneumonia_ece_calibrated": cal.ece(pn_t, cal_t[:, 1]),
            "reliability_raw": cal.reliability(y_t, p_t),
            "reliability_calibrated": cal.reliability(y_t, q_t),
        },
    }
    if figure is not None:
        raw_ece = block["test"]["ece_raw"]["value"]
        cal_ece = block["test"]["ece_calibrated"]["value"]
        ev.plot_reliability(
            {
                f"raw (test ECE {raw_ece:.3f})": cal.reliability(y_t, p_t),
                f"calibrated (test ECE {cal_ece:.3f})": cal.reliability(y_t, q_t),
            },
            figure,
            title=f"{scheme} scheme, COVID-19, test split (n={len(p_t)})",
        )
        block["figure"] = figure.name
    point = OperatingPoint(
        threshold=threshold,
        target_sensitivity=target,
        sensitivity=_rate(at.sensitivity),
        specificity=_rate(at.specificity),
        raw_threshold=raw_threshold,
    )
    return block, point, calibration


def run(weights_dir: Path, corpus_dir: Path, cache_dir: Path, version: str | None) -> None:
    manifest = load_manifest(weights_dir)
    metrics_path = weights_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    schemes = dict(manifest.schemes)
    for name in manifest.schemes:
        val = split_scores(corpus_dir, manifest, name, "val", cache_dir)
        test = split_scores(corpus_dir, manifest, name, "test", cache_dir)
        block, point, calibration = calibrate_scheme(
            manifest,
            name,
            (val[0], val[1]["probabilities"]),
            (test[0], test[1]["probabilities"]),
            weights_dir / f"reliability-{name}.png",
        )
        metrics["schemes"][name]["calibration"] = block
        schemes[name] = replace(schemes[name], operating_point=point, calibration=calibration)
        log.info("%s: %s", name, json.dumps({k: block[k] for k in ("method", "threshold")}))
    if version:
        metrics["version"] = version
    new = replace(manifest, schemes=schemes, version=metrics["version"])
    write_manifest(new, weights_dir)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS_DIR)
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/model-eval"))
    parser.add_argument("--version", default=None, help="new model version (outputs change)")
    args = parser.parse_args()
    run(args.weights, args.corpus or default_corpus_dir(), args.cache, args.version)


if __name__ == "__main__":
    main()
