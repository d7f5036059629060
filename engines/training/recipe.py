"""End-to-end training recipe: segmenter -> masks -> view head -> classifiers -> ONNX + card.

Every stage caches its output under ``work_dir`` (git-ignored, e.g. ``runs/``), so a rerun
only recomputes what changed. Seeded; runs on 2 CPU cores (frozen-backbone features).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.efficientnet_lite import load_imagenet_lite0
from engines.export import export_onnx
from engines.manifest import ModelManifest, write_manifest
from engines.networks import ClassifierCamNet, SegmenterViewNet, UNetDecoder
from engines.runtime.base import file_sha256
from engines.training.augmented import (
    AugmentConfig,
    finetune_augmented,
    predict,
    scheme_inputs,
)
from engines.training.cache import digest, load_keyed, rows_digest, save_keyed, weights_digest
from engines.training.classifier import (
    CorpusMasks,
    LinearHead,
    LungPrior,
    SchemeResult,
    frontal_rows,
    measure_scheme,
    nan_to_none,
    scheme_features,
    scheme_lung_prior,
    segment_corpus,
    train_scheme,
    train_view_head,
    within_source_mean,
)
from engines.training.corpus import load_image, load_mask, read_manifest, seed_everything
from engines.training.finetune import cached_trunk, finetune_tail, head_of, net_outputs
from engines.training.segmenter import train_segmenter
from screener import atomic_files
from screener.imaging.preprocess import NET_SIZE, SCHEMES, Scheme, paste_back, scheme_input

log = logging.getLogger(__name__)
MODEL_NAME = "cxr-covid-effnetlite0"
# An augmented fine-tune is kept when its validation within-source AUC mean is at most this
# far below the linear head's (noise level on ~200 validation images) and its heatmaps meet
# the lung-fraction requirement on validation.
AUGMENT_TOLERANCE = 0.01
INPUT_SHAPE = (1, NET_SIZE, NET_SIZE)


def cached_masks(
    corpus_dir: Path, rows: list[dict[str, str]], decoder: UNetDecoder, work_dir: Path
) -> CorpusMasks:
    """Lung masks and pooled segmenter features of ``rows``, cached in ``work_dir/cache``
    under the digest of ``decoder``'s weights and of ``rows``: a retrained segmenter (or
    another corpus) rebuilds them, and ``.key`` keys every cache built on these masks."""
    path = work_dir / "cache" / "segmented.npz"
    key = digest("segmented", weights_digest(decoder), rows_digest(rows))
    data = load_keyed(path, key)
    if data is not None:
        ids = [str(i) for i in data["ids"]]
        masks = {}
        for i, row in zip(ids, rows, strict=True):
            shape = load_image(corpus_dir, row).shape
            masks[i] = (
                np.unpackbits(data[f"m_{i}"])[: shape[0] * shape[1]].reshape(shape).astype(bool)
            )
        return CorpusMasks(ids, masks, data["raw_features"], key)
    result = replace(segment_corpus(corpus_dir, rows, load_imagenet_lite0(), decoder), key=key)
    arrays = {f"m_{i}": np.packbits(m.ravel()) for i, m in result.masks.items()}
    save_keyed(path, key, ids=np.array(result.ids), raw_features=result.raw_features, **arrays)
    return result


def _cached_features(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: CorpusMasks,
    scheme: Scheme,
    work_dir: Path,
    equalized: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of ``rows``' scheme inputs, cached under the masks' key."""
    suffix = "" if equalized else "-noeq"
    path = work_dir / "cache" / f"features_{scheme}{suffix}.npz"
    key = digest("features", masks.key, rows_digest(rows), scheme, str(equalized))
    data = load_keyed(path, key)
    if data is not None:
        return data["plain"], data["mirrored"]
    plain, mirrored = scheme_features(
        corpus_dir, rows, masks.masks, scheme, load_imagenet_lite0(), equalized
    )
    save_keyed(path, key, plain=plain, mirrored=mirrored)
    return plain, mirrored


def _cached_lung_prior(
    corpus_dir: Path,
    frontal: list[dict[str, str]],
    masks: CorpusMasks,
    scheme: Scheme,
    work_dir: Path,
    equalized: bool,
    weights: tuple[float, ...],
) -> LungPrior:
    suffix = "" if equalized else "-noeq"
    path = work_dir / "cache" / f"maps_{scheme}{suffix}.npz"
    ids = [r["id"] for r in frontal]
    key = digest("maps", masks.key, rows_digest(frontal), scheme, str(equalized))
    data = load_keyed(path, key)
    if data is not None:
        return LungPrior(data["plain"], data["mirrored"], data["lung7"], weights)
    prior = scheme_lung_prior(
        corpus_dir, frontal, masks.masks, scheme, load_imagenet_lite0(), equalized, weights
    )
    save_keyed(
        path,
        key,
        ids=np.array(ids),
        plain=prior.maps,
        mirrored=prior.maps_mirrored,
        lung7=prior.lung,
    )
    return prior


def _linear_into(layer: torch.nn.Linear, head: LinearHead) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight))
        layer.bias.copy_(torch.from_numpy(head.bias))


def segmenter_network(decoder: UNetDecoder, view: LinearHead) -> SegmenterViewNet:
    net = SegmenterViewNet(load_imagenet_lite0())
    net.decoder.load_state_dict(decoder.state_dict())
    # Two-class softmax -> one sigmoid: P(lateral) = sigmoid(z1 - z0).
    diff = LinearHead(
        weight=(view.weight[1] - view.weight[0])[None],
        bias=np.array([view.bias[1] - view.bias[0]], dtype=np.float32),
    )
    _linear_into(net.view_head, diff)
    return net.eval()


def classifier_network(head: LinearHead) -> ClassifierCamNet:
    net = ClassifierCamNet(load_imagenet_lite0())
    _linear_into(net.fc, head)
    return net.eval()


@torch.no_grad()
def lung_fraction_on(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: CorpusMasks,
    net: ClassifierCamNet,
    scheme: Scheme,
    equalized: bool = True,
) -> dict[str, Any]:
    """Mean share of positive COVID-CAM mass inside the lung mask, on the given images;
    against the predicted mask (what the product reports) and the manual mask where one exists."""
    predicted, manual = [], []
    for row in rows:
        image = load_image(corpus_dir, row)
        mask = masks.masks[row["id"]]
        x, box = scheme_input(image, mask, scheme, equalized=equalized)
        _, cam, _ = net(torch.from_numpy(x[None]))
        heat = np.clip(paste_back(cam[0, 0].numpy(), box, image.shape), 0, None)
        total = heat.sum()
        if total <= 0:
            continue
        predicted.append(float(heat[mask].sum() / total))
        truth = load_mask(corpus_dir, row)
        if truth is not None:
            manual.append(float(heat[truth].sum() / total))
    return {
        "n": len(predicted),
        "mean_vs_predicted_mask": float(np.mean(predicted)) if predicted else None,
        "n_manual": len(manual),
        "mean_vs_manual_mask": float(np.mean(manual)) if manual else None,
    }


def _measure_tuned(
    scheme: Scheme,
    rows: list[dict[str, str]],
    tuned: ClassifierCamNet,
    probs: np.ndarray,
    pooled: np.ndarray,
    target_sensitivity: float,
    linear: SchemeResult,
    step: str,
) -> SchemeResult:
    """Measure a fine-tuned network like a linear head; its weighting names the ``step``."""
    return measure_scheme(
        scheme,
        rows,
        probs,
        pooled,
        target_sensitivity,
        head=head_of(tuned),
        weight_decay=linear.weight_decay,
        weighting=f"{linear.weighting}+{step}",
    )


def _finetuned(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: CorpusMasks,
    scheme: Scheme,
    net: ClassifierCamNet,
    result: SchemeResult,
    target_sensitivity: float,
    work_dir: Path,
    seed: int,
) -> tuple[ClassifierCamNet, SchemeResult]:
    """Fine-tune the last stage; keep it only if the validation within-source AUCs improve."""
    plain, mirrored = cached_trunk(
        corpus_dir,
        rows,
        masks.masks,
        scheme,
        load_imagenet_lite0(),
        work_dir / "cache" / f"trunk_{scheme}.npz",
        key=digest("trunk", masks.key, rows_digest(rows), scheme),
    )
    tuned, _ = finetune_tail(net, rows, plain, mirrored, weighting=result.weighting, seed=seed)
    probs, pooled = net_outputs(tuned, plain)
    candidate = _measure_tuned(
        scheme, rows, tuned, probs, pooled, target_sensitivity, result, "finetune"
    )
    log.info("%s finetuned val %s vs linear %s", scheme, candidate.val, result.val)
    if within_source_mean(candidate.val) > within_source_mean(result.val):
        return tuned, candidate
    return net, result


def _augmented(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: CorpusMasks,
    scheme: Scheme,
    net: ClassifierCamNet,
    result: SchemeResult,
    target_sensitivity: float,
    equalized: bool,
    cfg: AugmentConfig,
) -> tuple[ClassifierCamNet, SchemeResult, dict[str, Any]]:
    """Fine-tune the last stages with augmentation (+ lung-attention term); keep the result
    only under the rule of :data:`AUGMENT_TOLERANCE`. Returns what was kept and a report."""
    inputs = scheme_inputs(corpus_dir, rows, masks.masks, scheme, equalized)
    tuned, history, epoch = finetune_augmented(net, rows, inputs, cfg)
    probs, pooled, _ = predict(tuned, inputs.x)
    candidate = _measure_tuned(
        scheme, rows, tuned, probs, pooled, target_sensitivity, result, "augmented_finetune"
    )
    kept = (
        epoch > 0
        and within_source_mean(candidate.val) >= within_source_mean(result.val) - AUGMENT_TOLERANCE
        and history[epoch]["val_covid_map_lung_fraction"] >= cfg.min_lung_fraction
    )
    report = {
        "config": asdict(cfg),
        "history": history,
        "chosen_epoch": epoch,
        "linear_head_val": result.val,
        "finetuned_val": candidate.val,
        "kept": kept,
    }
    log.info(
        "%s augmented finetune kept=%s val %s vs linear %s", scheme, kept, candidate.val, result.val
    )
    if kept:
        return tuned, candidate, report
    return net, result, report


def run_recipe(
    corpus_dir: Path,
    work_dir: Path,
    *,
    production_scheme: Scheme = "segment",
    target_sensitivity: float = 0.95,
    version: str = "1.0.0",
    segmenter_epochs: int = 40,
    finetune: tuple[str, ...] = (),
    equalized: bool = True,
    lung_prior: tuple[str, ...] = (),
    lung_prior_weights: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 1.0),
    augment: tuple[str, ...] = (),
    augment_config: AugmentConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train everything, export ONNX for each scheme into ``work_dir/export``, return metrics.
    Schemes in ``lung_prior`` also try heads trained with the CAM lung-prior penalty at the
    given strengths (chosen on validation with everything else); schemes in ``augment`` then
    fine-tune the last Lite0 stages with augmentation (``augment_config``)."""
    aug_cfg = replace(augment_config or AugmentConfig(), seed=seed)
    seed_everything(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = read_manifest(corpus_dir)
    decoder_path = work_dir / "segmenter" / "decoder.pt"
    metrics: dict[str, Any] = {"name": MODEL_NAME, "version": version, "seed": seed}
    decoder = UNetDecoder()
    if decoder_path.exists():
        decoder.load_state_dict(torch.load(decoder_path, weights_only=True))
        seg_metrics = json.loads((work_dir / "segmenter" / "metrics.json").read_text())
    else:
        decoder, report = train_segmenter(
            corpus_dir, decoder_path.parent, epochs=segmenter_epochs, seed=seed
        )
        seg_metrics = {
            "epochs": report.epochs,
            "dice_val_mean": float(np.mean(report.dice_val)),
            "n_val": len(report.dice_val),
            "dice_test_mean": float(np.mean(report.dice_test)),
            "n_test": len(report.dice_test),
            "dice_test_median": float(np.median(report.dice_test)),
        }
        (decoder_path.parent / "metrics.json").write_text(json.dumps(seg_metrics, indent=1))
    metrics["segmenter"] = seg_metrics
    decoder.eval()
    masks = cached_masks(corpus_dir, rows, decoder, work_dir)
    view_head, view_metrics = train_view_head(rows, masks.raw_features, seed=seed)
    metrics["view"] = view_metrics
    frontal = frontal_rows(rows)
    index = {r["id"]: i for i, r in enumerate(rows)}
    export_dir = work_dir / "export"
    export_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(
        segmenter_network(decoder, view_head),
        "segmenter",
        export_dir / "segmenter.onnx",
        INPUT_SHAPE,
    )
    metrics["schemes"] = {}
    for scheme in SCHEMES:
        plain, mirrored = _cached_features(corpus_dir, rows, masks, scheme, work_dir, equalized)
        sel = [index[r["id"]] for r in frontal]
        prior = None
        if scheme in lung_prior:
            prior = _cached_lung_prior(
                corpus_dir, frontal, masks, scheme, work_dir, equalized, lung_prior_weights
            )
        result = train_scheme(
            scheme, frontal, plain[sel], mirrored[sel], target_sensitivity, seed=seed, prior=prior
        )
        net = classifier_network(result.head)
        if scheme in finetune:
            net, result = _finetuned(
                corpus_dir, frontal, masks, scheme, net, result, target_sensitivity, work_dir, seed
            )
        augment_report = None
        if scheme in augment:
            net, result, augment_report = _augmented(
                corpus_dir,
                frontal,
                masks,
                scheme,
                net,
                result,
                target_sensitivity,
                equalized,
                aug_cfg,
            )
        covid_test = [r for r in frontal if r["split"] == "test" and r["label"] == "covid"]
        fraction = lung_fraction_on(corpus_dir, covid_test, masks, net, scheme, equalized)
        covid_val = [r for r in frontal if r["split"] == "val" and r["label"] == "covid"]
        fraction_val = lung_fraction_on(corpus_dir, covid_val, masks, net, scheme, equalized)
        export_onnx(net, "classifier", export_dir / f"classifier-{scheme}.onnx", INPUT_SHAPE)
        metrics["schemes"][scheme] = result.metrics(fraction, fraction_val)
        if augment_report is not None:
            metrics["schemes"][scheme]["augmented_finetune"] = augment_report
        log.info(
            "scheme %s: %s", scheme, json.dumps(nan_to_none(metrics["schemes"][scheme]["test"]))
        )
    metrics["production_scheme"] = production_scheme
    metrics["equalized"] = equalized
    metrics["lung_prior_weights"] = list(lung_prior_weights) if lung_prior else []
    metrics["target_sensitivity"] = target_sensitivity
    metrics = nan_to_none(metrics)
    (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def install_weights(
    work_dir: Path, weights_dir: Path, metrics: dict[str, Any], schemes: list[str]
) -> None:
    """Copy the segmenter and the chosen schemes' classifiers (+ torch sidecars) into the
    shipped weights folder and write its ``model.json`` manifest."""
    export_dir = work_dir / "export"
    weights_dir.mkdir(parents=True, exist_ok=True)
    names = ["segmenter"] + [f"classifier-{s}" for s in schemes]
    for name in names:
        for suffix in (".onnx", ".torch.pt"):
            atomic_files.copy_file(export_dir / f"{name}{suffix}", weights_dir / f"{name}{suffix}")
    production = metrics["production_scheme"]
    manifest = {
        "name": metrics["name"],
        "version": metrics["version"],
        "input_shape": list(INPUT_SHAPE),
        "class_names": ["covid", "pneumonia", "normal"],
        "segmenter": "segmenter.onnx",
        "classifiers": {s: f"classifier-{s}.onnx" for s in schemes},
        "production_scheme": production,
        "thresholds": {s: metrics["schemes"][s]["threshold"] for s in schemes},
        "target_sensitivity": metrics["target_sensitivity"],
        "equalized": {s: bool(metrics.get("equalized", True)) for s in schemes},
        "sha256": {f"{n}.onnx": file_sha256(weights_dir / f"{n}.onnx") for n in names},
    }
    # One typed manifest (engines.manifest); uncalibrated until `engines.training.calibrate`
    # fits the calibration on validation and moves the thresholds to the calibrated scale.
    write_manifest(ModelManifest.from_json(manifest, weights_dir), weights_dir)
    atomic_files.write_text(weights_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
