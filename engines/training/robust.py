"""Archive-robust fine-tune: teach the shipped crop network that a lossy copy is the same film.

    nice -n 10 .venv/bin/python -m engines.training.robust cache --split train|val|test
    nice -n 10 .venv/bin/python -m engines.training.robust train --name NAME [options]

Why: the same film stored as JPEG 2000 10:1 or JPEG quality 90, or tilted by a few degrees,
moved the calibrated COVID probability by 0.035-0.06 on average (model 1.3.0). Part of that
is the network reacting to compression artefacts, part is the lung crop moving with the
segmenter's mask. Both happen before the classifier, so the training copies are made the way
the service meets them: every image is written as DICOM (12-bit reference; JPEG 2000 at a
random ratio 5:1-20:1, JPEG baseline at a random quality 70-95, rotated by up to 5 degrees),
decoded and cropped by the run-time path with the shipped segmenter (``screener.screening``),
and cached under ``runs/robust`` (git-ignored). Validation copies are the measured ones
(JPEG 2000 10:1, JPEG q90, rotation -5 / +5 degrees, as ``robustness`` writes them).

Training continues from the shipped crop network (blocks ``start_block``..15, head conv and
linear layer; BatchNorm frozen) on pairs (reference, random copy) under one shared random
augmentation (``augmented.augment``): class-weighted cross-entropy on both, the lung-attention
price of the augmented fine-tune on the reference, and a consistency price on the
|difference of the COVID-vs-rest logit| between the two. Every epoch is measured on the
validation split only: within-source AUCs, COVID heatmap lung share, and the mean |change| of
the calibrated COVID probability (calibration refitted on validation, as shipping would) per
measured copy. Rule fixed before any run: eligible epochs keep the lung share >= 0.7 and the
within-source AUC mean within 0.01 of the starting network's; among them the lowest mean
compression change (JPEG 2000 and JPEG) is chosen; the network ships only if that change
falls by >= 30 % for JPEG 2000 and for JPEG alike.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEGBaseline8Bit
from torch.nn import functional as F

from engines import calibration as cal
from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest, write_manifest
from engines.networks import CLASS_NAMES, ClassifierCamNet
from engines.runtime.torch_engine import load_sidecar, sidecar_path
from engines.training.augmented import AugmentConfig, augment, centre_classes, trainable_parameters
from engines.training.classifier import (
    CorpusMasks,
    label_indices,
    nan_to_none,
    training_weights,
    within_source_aucs,
    within_source_mean,
)
from engines.training.corpus import default_corpus_dir, load_image
from engines.training.robustness import PERTURBATIONS, as_received, change_stats, corpus_instance
from engines.training.scoring import frontal_split
from screener import evaluation as ev
from screener.imaging.preprocess import NET_SIZE, crop, resize
from screener.testing.dicom_factory import corpus_image

log = logging.getLogger(__name__)
COVID = CLASS_NAMES.index("covid")
VAL_VARIANTS = ("jpeg2000_10to1", "jpeg_baseline_q90", "rotate_minus_5", "rotate_plus_5")
COMPRESSION = ("jpeg2000_10to1", "jpeg_baseline_q90")
TRAIN_KINDS = ("jpeg2000", "jpeg", "rotate")
MIN_LUNG_FRACTION = 0.7
AUC_TOLERANCE = 0.01
REQUIRED_GAIN = 0.30


# ------------------------------------------------------------------------------------------
# Copies of a film as an archive may hold it


def _j2k(pixels: np.ndarray, row: dict[str, str], ratio: float) -> Dataset:
    ds = corpus_instance(pixels, row, bits_stored=12)
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[float(ratio)])
    return ds


def _jpeg(pixels: np.ndarray, row: dict[str, str], quality: int) -> Dataset:
    ds = corpus_instance(pixels, row, bits_stored=8)
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(quality), subsampling=0
    )
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def _rotate(pixels: np.ndarray, row: dict[str, str], degrees: float) -> Dataset:
    image = Image.fromarray(pixels).rotate(degrees, resample=Image.Resampling.BILINEAR)
    return corpus_instance(np.asarray(image), row, bits_stored=12)


def random_copy(
    pixels: np.ndarray, row: dict[str, str], kind: str, rng: np.random.Generator
) -> tuple[Dataset, str]:
    """One random archive copy of ``kind`` and a short description of it."""
    if kind == "jpeg2000":
        ratio = float(np.exp(rng.uniform(np.log(5.0), np.log(20.0))))
        return _j2k(pixels, row, ratio), f"j2k {ratio:.1f}:1"
    if kind == "jpeg":
        quality = int(rng.integers(70, 96))
        return _jpeg(pixels, row, quality), f"jpeg q{quality}"
    degrees = float(rng.uniform(1.0, 5.0) * rng.choice([-1.0, 1.0]))
    return _rotate(pixels, row, degrees), f"rotate {degrees:+.1f}"


@dataclass
class CachedSplit:
    """Classifier inputs of a split through the run-time path: ``x`` (N, 1 + V, S, S) float16,
    copy 0 = the 12-bit reference; ``lung`` (N, S, S) uint8, the reference's predicted lung
    share cropped like its input (0-255); ``rows`` in order; copy names."""

    rows: list[dict[str, str]]
    x: np.ndarray
    lung: np.ndarray
    copies: list[str]


def _prepared_inputs(
    datasets: list[Dataset], models: Any, settings: Any
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Run-time classifier input and cropped lung share per dataset (None: not screened as a
    frontal image)."""
    from screener.screening.prepare import prepare_dataset

    prepared = [
        prepare_dataset(as_received(ds), Path(f"{i}.dcm"), settings)
        for i, ds in enumerate(datasets)
    ]
    live = [i for i, p in enumerate(prepared) if p.network_input is not None]
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prepared)
    if not live:
        return out
    seg, _ = models.segment([prepared[i] for i in live])
    for row, i in enumerate(live):
        plan = models.plan(
            prepared[i], float(seg["lateral_probability"][row]), seg["lung_probability"][row]
        )
        if plan.classifier_input is None:
            continue
        mask = plan.work_mask.astype(np.float32)
        share = mask if plan.box is None else crop(mask, plan.box)
        out[i] = (plan.classifier_input[0], resize(share, NET_SIZE, NET_SIZE))
    return out


def build_cache(corpus_dir: Path, split: str, path: Path, copies: int, seed: int) -> CachedSplit:
    """Reference + archive copies of every frontal image of ``split`` (train: ``copies``
    random copies cycling over JPEG 2000 / JPEG / rotation; otherwise the measured copies)."""
    from screener.screening.models import ScreeningModels
    from screener.settings import Settings

    settings = Settings()
    models = ScreeningModels.from_settings(settings)
    rng = np.random.default_rng(seed)
    rows = frontal_split(corpus_dir, split)
    names = (
        [f"random_{TRAIN_KINDS[k % len(TRAIN_KINDS)]}" for k in range(copies)]
        if split == "train"
        else list(VAL_VARIANTS)
    )
    xs, lungs, kept = [], [], []
    started = time.monotonic()
    for n, row in enumerate(rows):
        pixels = corpus_image(corpus_dir, row["id"])
        datasets = [corpus_instance(pixels, row, bits_stored=12)]
        for k, name in enumerate(names):
            if split == "train":
                datasets.append(random_copy(pixels, row, TRAIN_KINDS[k % len(TRAIN_KINDS)], rng)[0])
            else:
                datasets.append(PERTURBATIONS[name](pixels, row))
        inputs = _prepared_inputs(datasets, models, settings)
        if any(i is None for i in inputs):
            log.info("image %d not screened as frontal in every copy: left out", n)
            continue
        xs.append(np.stack([i[0] for i in inputs if i is not None]).astype(np.float16))
        first = inputs[0]
        assert first is not None
        lungs.append(np.clip(first[1] * 255.0 + 0.5, 0, 255).astype(np.uint8))
        kept.append(row)
        if n % 50 == 0:
            log.info("%s: %d/%d images, %.0f s", split, n, len(rows), time.monotonic() - started)
    cached = CachedSplit(kept, np.stack(xs), np.stack(lungs), ["reference", *names])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        ids=np.array([r["id"] for r in kept]),
        x=cached.x,
        lung=cached.lung,
        copies=np.array(cached.copies),
    )
    return cached


def load_cache(corpus_dir: Path, split: str, path: Path) -> CachedSplit:
    data = np.load(path)
    by_id = {r["id"]: r for r in frontal_split(corpus_dir, split)}
    rows = [by_id[str(i)] for i in data["ids"]]
    return CachedSplit(rows, data["x"], data["lung"], [str(c) for c in data["copies"]])


# ------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RobustConfig:
    """Settings of one robust fine-tune (every field is recorded in metrics.json)."""

    epochs: int = 4
    start_block: int = 8
    lr: float = 5e-5
    head_lr: float = 5e-4
    weight_decay: float = 1e-2
    batch: int = 24
    weighting: str = "class"
    lung_weight: float = 1.0
    consistency_weight: float = 1.0
    perturbed_ce: bool = True
    # extra small affine on the copy only (a lung crop that moved with the segmenter's mask):
    # rotation +-2 deg, scale +-1.5 x, shift +-1 x this fraction of the side; 0 = none
    copy_jitter: float = 0.0
    # self-distillation: KL(starting network on the augmented reference || this network), on
    # the reference and on the copy alike; keeps what the network already ranks while it
    # learns that the copy is the same film; 0 = off
    teacher_weight: float = 0.0
    seed: int = 0


def covid_logit(logits: torch.Tensor) -> torch.Tensor:
    """log p(covid) - log p(not covid): the quantity the calibration and the threshold act on."""
    others = torch.cat([logits[:, :COVID], logits[:, COVID + 1 :]], dim=1)
    return logits[:, COVID] - torch.logsumexp(others, dim=1)


@torch.no_grad()
def _predict(net: torch.nn.Module, x: np.ndarray, lung: np.ndarray, batch: int = 48) -> Any:
    """COVID-class probabilities (N, 3) and the positive COVID-CAM share on lung cells."""
    net.eval()
    probs, fractions = [], []
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(x[start : start + batch].astype(np.float32))[:, None]
        p, cam, _ = net(xb)
        probs.append(p.numpy())
        lb = torch.from_numpy(lung[start : start + batch].astype(np.float32) / 255.0)[:, None]
        share = F.adaptive_avg_pool2d(lb, cam.shape[-2:])[:, 0]
        pos = cam[:, COVID].clamp(min=0)
        total = pos.sum(dim=(1, 2))
        inside = (pos * share).sum(dim=(1, 2))
        fractions.append(torch.where(total > 0, inside / total.clamp(min=1e-12), 1.0).numpy())
    return np.concatenate(probs), np.concatenate(fractions)


def evaluate(net: torch.nn.Module, val: CachedSplit, epoch: int, loss: float) -> dict[str, Any]:
    """Validation-only figures of one epoch (see the module docstring); ``net`` returns what
    :class:`ClassifierCamNet` returns (an ensemble of them does too)."""
    probs, fraction = _predict(net, val.x[:, 0], val.lung)
    y = np.array([r["label"] == "covid" for r in val.rows])
    aucs = within_source_aucs(val.rows, probs)
    try:
        calibration, _ = cal.choose(probs[:, COVID].astype(np.float64), y, "validation split")
    except ValueError:  # scores anti-correlated with the labels: nothing to calibrate
        calibration = cal.IDENTITY
    q = calibration.covid(probs[:, COVID])
    threshold = ev.threshold_for_sensitivity(y, q, 0.95)
    at = ev.confusion_at(y, q, threshold)
    entry: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss,
        "ieee8023_covid_vs_other_auc": aucs["ieee8023_covid_vs_other_auc"],
        "nih_pneumonia_vs_normal_auc": aucs["nih_pneumonia_vs_normal_auc"],
        "val_score": within_source_mean(aucs),
        "val_covid_map_lung_fraction": float(np.mean(fraction[y])),
        "calibration": calibration.method,
        "threshold": float(threshold),
        "val_sensitivity": str(at.sensitivity),
        "val_specificity": str(at.specificity),
        "copies": {},
    }
    for k, name in enumerate(val.copies[1:], start=1):
        pk, _ = _predict(net, val.x[:, k], val.lung)
        qk = calibration.covid(pk[:, COVID])
        entry["copies"][name] = change_stats(q, qk, threshold)
    entry["compression_mean_abs_delta"] = float(
        np.mean([entry["copies"][c]["mean_abs_delta"] for c in COMPRESSION])
    )
    log.info(
        "epoch %d: aucs %.3f/%.3f lung %.3f spec %s %s",
        epoch,
        entry["ieee8023_covid_vs_other_auc"],
        entry["nih_pneumonia_vs_normal_auc"],
        entry["val_covid_map_lung_fraction"],
        entry["val_specificity"],
        {k: round(v["mean_abs_delta"], 4) for k, v in entry["copies"].items()},
    )
    return entry


def eligible(entry: dict[str, Any], start: dict[str, Any]) -> bool:
    return bool(
        entry["val_covid_map_lung_fraction"] >= MIN_LUNG_FRACTION
        and entry["val_score"] >= start["val_score"] - AUC_TOLERANCE
    )


def ships(entry: dict[str, Any], start: dict[str, Any]) -> bool:
    """The decision rule, fixed before the first run (validation figures only)."""
    if entry["epoch"] == 0 or not eligible(entry, start):
        return False
    return all(
        entry["copies"][c]["mean_abs_delta"]
        <= (1.0 - REQUIRED_GAIN) * start["copies"][c]["mean_abs_delta"]
        for c in COMPRESSION
    )


def load_shipped_crop(weights_dir: Path) -> ClassifierCamNet:
    manifest = load_manifest(weights_dir)
    net, _ = load_sidecar(sidecar_path(manifest.path(manifest.scheme("crop").classifier)))
    assert isinstance(net, ClassifierCamNet)
    return net.eval()


def _jitter(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A small random affine per image (rotation +-2 deg, scale +-1.5 x ``fraction``, shift
    +-``fraction`` of the side), no mirror, no photometric change; zero fill."""
    n = x.shape[0]

    def uniform(half: float) -> torch.Tensor:
        return (2.0 * torch.rand(n, generator=gen) - 1.0) * half

    angle = uniform(2.0) * math.pi / 180.0
    scale = 1.0 + uniform(1.5 * fraction)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2] = uniform(fraction) * 2
    theta[:, 1, 2] = uniform(fraction) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def finetune_robust(
    net: ClassifierCamNet, train: CachedSplit, val: CachedSplit, cfg: RobustConfig
) -> tuple[ClassifierCamNet, list[dict[str, Any]], int]:
    """Fine-tune a copy of ``net``; return the chosen epoch's network (the starting network
    if no epoch is eligible), the per-epoch validation history and the chosen epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = copy.deepcopy(net)
    centre_classes(net)
    aug = AugmentConfig()  # the augmented fine-tune's geometry and intensity jitter
    label = label_indices(train.rows)
    keep = np.flatnonzero(label >= 0)
    rows = [train.rows[i] for i in keep]
    y = torch.from_numpy(label[keep].astype(np.int64))
    sw = torch.from_numpy(training_weights(rows, label[keep], cfg.weighting))
    x_all, lung_all = train.x[keep], train.lung[keep]
    n_copies = x_all.shape[1] - 1
    params = trainable_parameters(net, cfg.start_block)
    head = list(net.fc.parameters())
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": params, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )
    steps = cfg.epochs * math.ceil(len(keep) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.lr, cfg.head_lr], total_steps=steps, pct_start=0.15
    )
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    history = [evaluate(net, val, 0, float("nan"))]
    start = history[0]
    best = (start["compression_mean_abs_delta"], 0, copy.deepcopy(net.state_dict()))
    for epoch in range(1, cfg.epochs + 1):
        net.eval()  # BatchNorm statistics stay frozen
        perm = torch.randperm(len(keep), generator=gen)
        total, count, began = 0.0, 0, time.monotonic()
        for s in range(0, len(keep), cfg.batch):
            idx = perm[s : s + cfg.batch].numpy()
            which = torch.randint(1, n_copies + 1, (len(idx),), generator=gen).numpy()
            clean = x_all[idx, 0].astype(np.float32)
            pert = x_all[idx, which].astype(np.float32)
            pair = torch.from_numpy(np.stack([clean, pert], axis=1))  # one affine for both
            lung = torch.from_numpy(lung_all[idx].astype(np.float32)[:, None] / 255.0)
            xa, la = augment(pair, lung, aug, gen)
            if cfg.copy_jitter > 0:
                xa[:, 1:] = _jitter(xa[:, 1:], cfg.copy_jitter, gen)
            xa = torch.cat([xa[:, :1], xa[:, 1:]], dim=0)
            _, cam, pooled = net(xa)
            logits = net.fc(pooled)
            b = len(idx)
            wb = sw[idx]
            ce_c = (F.cross_entropy(logits[:b], y[idx], reduction="none") * wb).sum() / wb.sum()
            ce_p = (F.cross_entropy(logits[b:], y[idx], reduction="none") * wb).sum() / wb.sum()
            loss = 0.5 * (ce_c + ce_p) if cfg.perturbed_ce else ce_c
            if cfg.lung_weight > 0:
                outside = 1.0 - F.adaptive_avg_pool2d(la, cam.shape[-2:])[:, 0]
                loss = loss + cfg.lung_weight * (cam[:b, COVID].abs() * outside).mean()
            if cfg.teacher_weight > 0:
                with torch.no_grad():
                    target = torch.softmax(teacher.fc(teacher(xa[:b])[2]), dim=1).repeat(2, 1)
                kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
                loss = loss + cfg.teacher_weight * kl
            if cfg.consistency_weight > 0:
                gap = (covid_logit(logits[:b]) - covid_logit(logits[b:])).abs().mean()
                loss = loss + cfg.consistency_weight * gap
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            centre_classes(net)
            total += float(loss.detach()) * b
            count += b
        log.info("epoch %d trained in %.0f s", epoch, time.monotonic() - began)
        entry = evaluate(net, val, epoch, total / max(count, 1))
        history.append(entry)
        if eligible(entry, start) and entry["compression_mean_abs_delta"] < best[0]:
            best = (entry["compression_mean_abs_delta"], epoch, copy.deepcopy(net.state_dict()))
    net.load_state_dict(best[2])
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), history, best[1]


# ------------------------------------------------------------------------------------------
# Shipping a run (only when ``ships`` said so)


def _corpus_masks(corpus_dir: Path, rows: list[dict[str, str]], manifest: Any) -> CorpusMasks:
    """The shipped segmenter's lung masks (run-time preprocessing) at each image's geometry."""
    from engines.runtime.base import load_engine
    from screener.imaging.preprocess import segmenter_input

    segmenter = load_engine("onnxruntime", manifest.path(manifest.segmenter))
    masks = {}
    for r in rows:
        image = load_image(corpus_dir, r)
        p = segmenter.infer(segmenter_input(image)[None])["lung_probability"][0]
        masks[r["id"]] = resize(p, *image.shape) >= 0.5
    return CorpusMasks([r["id"] for r in rows], masks, np.zeros((0, 1280), np.float32))


def install(corpus_dir: Path, work_dir: Path, name: str, weights_dir: Path) -> dict[str, Any]:
    """Export the run's network as the crop classifier of ``weights_dir`` (ONNX + sidecar,
    manifest hash) and re-measure the crop scheme's recipe figures with it (``metrics.json``).
    Calibration, thresholds and version follow with ``engines.training.calibrate``."""
    from engines.export import export_onnx
    from engines.runtime.base import file_sha256
    from engines.training.classifier import frontal_rows, measure_scheme
    from engines.training.corpus import read_manifest
    from engines.training.finetune import head_of
    from engines.training.recipe import INPUT_SHAPE, lung_fraction_on
    from engines.training.scoring import score_images

    report = json.loads((work_dir / name / "report.json").read_text())
    if not report["ships"]:
        raise SystemExit(f"run {name} does not meet the shipping rule on validation")
    net = load_shipped_crop(weights_dir)
    net.load_state_dict(torch.load(work_dir / name / "classifier.pt", weights_only=True))
    net.eval()
    manifest = load_manifest(weights_dir)
    file_name = manifest.scheme("crop").classifier
    export_onnx(net, "classifier", weights_dir / file_name, INPUT_SHAPE)
    sha = dict(manifest.sha256)
    sha[file_name] = file_sha256(weights_dir / file_name)
    manifest = replace(manifest, sha256=sha)
    write_manifest(manifest, weights_dir)
    metrics_path = weights_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    old = metrics["schemes"]["crop"]
    rows = frontal_rows(read_manifest(corpus_dir))
    out = score_images([load_image(corpus_dir, r) for r in rows], manifest, "crop")
    result = measure_scheme(
        "crop",
        rows,
        out["probabilities"],
        out["features"],
        float(metrics["target_sensitivity"]),
        head=head_of(net),
        weight_decay=old["weight_decay"],
        weighting=f"{old['weighting']}+robust_finetune",
    )
    masks = _corpus_masks(corpus_dir, rows, manifest)
    covid = {
        s: [r for r in rows if r["split"] == s and r["label"] == "covid"] for s in ("val", "test")
    }
    old.update(
        result.metrics(
            lung_fraction_on(corpus_dir, covid["test"], masks, net, "crop"),
            lung_fraction_on(corpus_dir, covid["val"], masks, net, "crop"),
        )
        | {"robust_finetune": {**report, "name": name}}
    )
    metrics_path.write_text(json.dumps(nan_to_none(metrics), indent=1) + "\n")
    return metrics


def record(work_dir: Path, names: list[str], weights_dir: Path) -> None:
    """Put the runs' validation reports into ``metrics.json`` (``experiments``, rendered in the
    model card), shipped or not, replacing earlier records of the same names."""
    metrics_path = weights_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    runs = [r for r in metrics.get("experiments", []) if r["name"] not in names]
    for name in names:
        report = json.loads((work_dir / name / "report.json").read_text())
        sizes = {
            f"n_{split}": int(len(np.load(_cache_path(work_dir, split))["ids"]))
            for split in ("train", "val")
        }
        runs.append({"name": name, **sizes, **report})
    metrics["experiments"] = runs
    metrics_path.write_text(json.dumps(nan_to_none(metrics), indent=1) + "\n")


def _cache_path(work_dir: Path, split: str) -> Path:
    return work_dir / f"inputs-{split}.npz"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="write the run-time inputs of a split and its copies")
    c.add_argument("--split", required=True, choices=["train", "val", "test"])
    c.add_argument("--copies", type=int, default=3)
    t = sub.add_parser("train", help="fine-tune from the shipped crop network")
    t.add_argument("--name", required=True)
    i = sub.add_parser("install", help="ship a run that met the rule (crop classifier, metrics)")
    i.add_argument("--name", required=True)
    r = sub.add_parser("record", help="record runs (validation reports) in metrics.json")
    r.add_argument("--name", action="append", required=True)
    for field, default in asdict(RobustConfig()).items():
        kind = (lambda v: v.lower() == "true") if isinstance(default, bool) else type(default)
        t.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default)
    for p in (c, t, i, r):
        p.add_argument("--work", type=Path, default=Path("runs/robust"))
        p.add_argument("--corpus", type=Path, default=None)
        p.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS_DIR)
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = args.corpus or default_corpus_dir()
    if args.command == "cache":
        build_cache(corpus, args.split, _cache_path(args.work, args.split), args.copies, seed=0)
        return
    if args.command == "record":
        record(args.work, args.name, args.weights)
        return
    if args.command == "install":
        install(corpus, args.work, args.name, args.weights)
        return
    cfg = RobustConfig(**{f: getattr(args, f) for f in asdict(RobustConfig())})
    train = load_cache(corpus, "train", _cache_path(args.work, "train"))
    val = load_cache(corpus, "val", _cache_path(args.work, "val"))
    net = load_shipped_crop(args.weights)
    tuned, history, epoch = finetune_robust(net, train, val, cfg)
    out = args.work / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tuned.state_dict(), out / "classifier.pt")
    report = {
        "config": asdict(cfg),
        "history": history,
        "chosen_epoch": epoch,
        "ships": ships(history[epoch], history[0]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("chosen_epoch", "ships")}))


if __name__ == "__main__":
    main()
