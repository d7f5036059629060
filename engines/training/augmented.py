"""Going further than a frozen backbone: fine-tune Lite0's last stages with augmentation.

The frozen-feature heads (``classifier.py``) see each training image twice (plain and
mirrored). Here the last stages of the encoder (blocks ``start_block``..15 and the 1280-channel
head conv) and the linear layer are trained end to end on randomly augmented copies of the
scheme input: a small affine (rotation, scale, shift), mirror, gamma and contrast jitter, as a
radiograph varies between departments. BatchNorm statistics stay frozen (small batches on a
CPU). An optional lung-attention term (``lung_weight``) prices class evidence taken from
outside the predicted lungs: the mean magnitude of the COVID CAM (logit units) on map cells
outside the lung mask, warped with the same affine as the image. The classifier weights are
kept centred over the classes (which changes no probability), so that price cannot be met by a
shift common to every class. The epoch is chosen on the validation split by the mean of the two
within-source AUCs, never on test. Runs on 2 CPU cores in minutes per epoch.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engines.networks import CLASS_NAMES, ClassifierCamNet
from engines.training.classifier import (
    input_and_lung_share,
    label_indices,
    training_weights,
    within_source_aucs,
    within_source_mean,
)
from screener.imaging.preprocess import Scheme, resize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Training settings of one fine-tuning run (every field is recorded in the model card)."""

    start_block: int = 8
    epochs: int = 12
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-2
    batch: int = 32
    weighting: str = "class"  # or "source_class"
    lung_weight: float = 0.0
    rotation_deg: float = 8.0
    scale: float = 0.1
    shift: float = 0.06
    gamma: float = 0.25
    contrast: float = 0.15
    min_lung_fraction: float = 0.0  # epochs below it on val COVID images are not eligible
    seed: int = 0


@dataclass
class SchemeInputs:
    """Scheme inputs of the given rows (un-augmented, float32 (N, 1, S, S)) and the share of
    every input pixel that lies inside the predicted lungs (float32 (N, 1, S, S))."""

    x: np.ndarray
    lung: np.ndarray


def scheme_inputs(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: dict[str, np.ndarray],
    scheme: Scheme,
    equalized: bool = True,
) -> SchemeInputs:
    xs, lungs = [], []
    for r in rows:
        x, share = input_and_lung_share(corpus_dir, r, masks[r["id"]], scheme, equalized)
        xs.append(x)
        lungs.append(resize(share, x.shape[1], x.shape[2])[None])
    return SchemeInputs(np.stack(xs).astype(np.float32), np.stack(lungs).astype(np.float32))


def augment(
    x: torch.Tensor, lung: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine per image (applied to image and lung share alike), random mirror,
    gamma and contrast jitter on the image. Zero fill, like the crop's padding."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180.0
    scale = uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = uniform(-cfg.shift, cfg.shift) * 2
    theta[:, 1, 2] = uniform(-cfg.shift, cfg.shift) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    la = F.grid_sample(lung, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(-cfg.gamma, cfg.gamma)).view(n, 1, 1, 1)
    contrast = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast).view(n, 1, 1, 1)
    xa = xa.clamp(0.0, 1.0).pow(gamma)
    xa = ((xa - 0.5) * contrast + 0.5).clamp(0.0, 1.0)
    return xa, la


def centre_classes(net: ClassifierCamNet) -> None:
    """Subtract the class mean from the linear layer: every probability stays the same, and
    each class's CAM then shows what sets that class apart from the others."""
    with torch.no_grad():
        net.fc.weight.sub_(net.fc.weight.mean(dim=0, keepdim=True))
        net.fc.bias.sub_(net.fc.bias.mean())


def trainable_parameters(net: ClassifierCamNet, start_block: int) -> list[torch.nn.Parameter]:
    for p in net.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    modules: list[torch.nn.Module] = [*net.encoder._blocks[start_block:], net.encoder._conv_head]
    for module in modules:
        for name, p in module.named_parameters():
            if "bn" in name:  # BatchNorm stays frozen: statistics and affine
                continue
            p.requires_grad_(True)
            params.append(p)
    return params


@torch.no_grad()
def predict(
    net: ClassifierCamNet, x: np.ndarray, lung: np.ndarray | None = None, batch: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, pooled features, share of positive COVID-CAM mass on lung cells at map
    resolution; NaN without ``lung``) for un-augmented inputs."""
    net.eval()
    covid = CLASS_NAMES.index("covid")
    probs, pooled, fractions = [], [], []
    for start in range(0, len(x), batch):
        p, cam, f = net(torch.from_numpy(x[start : start + batch]))
        probs.append(p.numpy())
        pooled.append(f.numpy())
        if lung is None:
            fractions.append(np.full(len(p), np.nan))
            continue
        share = F.adaptive_avg_pool2d(torch.from_numpy(lung[start : start + batch]), cam.shape[-2:])
        pos = cam[:, covid].clamp(min=0)
        total = pos.sum(dim=(1, 2))
        inside = (pos * share[:, 0]).sum(dim=(1, 2))
        fractions.append(torch.where(total > 0, inside / total.clamp(min=1e-12), 1.0).numpy())
    return np.concatenate(probs), np.concatenate(pooled), np.concatenate(fractions)


def finetune_augmented(
    net: ClassifierCamNet,
    rows: list[dict[str, str]],
    inputs: SchemeInputs,
    cfg: AugmentConfig,
) -> tuple[ClassifierCamNet, list[dict[str, float]], int]:
    """Fine-tune a copy of ``net`` on the train rows; return the best-on-val epoch (epoch 0 =
    the starting network) among those whose validation COVID heatmaps keep at least
    ``cfg.min_lung_fraction`` of their positive mass on the lungs (the starting network if
    none does), the per-epoch validation history and the chosen epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = copy.deepcopy(net)
    centre_classes(net)
    split = np.array([r["split"] for r in rows])
    label = label_indices(rows)
    train = np.flatnonzero((split == "train") & (label >= 0))
    val = np.flatnonzero(split == "val")
    val_rows = [rows[i] for i in val]
    y = torch.from_numpy(label[train].astype(np.int64))
    sw = torch.from_numpy(training_weights([rows[i] for i in train], label[train], cfg.weighting))
    x_train = torch.from_numpy(inputs.x[train])
    lung_train = torch.from_numpy(inputs.lung[train])
    params = trainable_parameters(net, cfg.start_block)
    head_params = list(net.fc.parameters())
    for p in head_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.lr, cfg.head_lr], total_steps=steps, pct_start=0.15
    )
    covid = CLASS_NAMES.index("covid")

    def evaluate(epoch: int, loss: float) -> dict[str, float]:
        probs, _, fraction = predict(net, inputs.x[val], inputs.lung[val])
        aucs = within_source_aucs(val_rows, probs)
        is_covid = np.array([r["label"] == "covid" for r in val_rows])
        entry = {
            "epoch": float(epoch),
            "train_loss": loss,
            "val_score": within_source_mean(aucs),
            "ieee8023_covid_vs_other_auc": aucs["ieee8023_covid_vs_other_auc"],
            "nih_pneumonia_vs_normal_auc": aucs["nih_pneumonia_vs_normal_auc"],
            "val_covid_map_lung_fraction": float(np.mean(fraction[is_covid])),
        }
        log.info("augmented finetune %s", {k: round(v, 4) for k, v in entry.items()})
        return entry

    def eligible(entry: dict[str, float]) -> bool:
        return entry["val_covid_map_lung_fraction"] >= cfg.min_lung_fraction

    history = [evaluate(0, float("nan"))]
    best_score = history[0]["val_score"] if eligible(history[0]) else -math.inf
    best_state, best_epoch = copy.deepcopy(net.state_dict()), 0
    for epoch in range(1, cfg.epochs + 1):
        net.eval()  # BatchNorm statistics stay frozen
        perm = torch.randperm(len(train), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(train), cfg.batch):
            idx = perm[start : start + cfg.batch]
            xa, la = augment(x_train[idx], lung_train[idx], cfg, gen)
            _, cam, pooled = net(xa)
            logits = net.fc(pooled)
            loss = (F.cross_entropy(logits, y[idx], reduction="none") * sw[idx]).sum() / sw[
                idx
            ].sum()
            if cfg.lung_weight > 0:
                # The weights are centred after every step, so this is the centred CAM.
                outside = 1.0 - F.adaptive_avg_pool2d(la, cam.shape[-2:])[:, 0]
                loss = loss + cfg.lung_weight * (cam[:, covid].abs() * outside).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            centre_classes(net)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        entry = evaluate(epoch, total / max(count, 1))
        history.append(entry)
        if eligible(entry) and entry["val_score"] > best_score:
            best_score, best_state = entry["val_score"], copy.deepcopy(net.state_dict())
            best_epoch = epoch
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), history, best_epoch
