"""U-Net lung segmenter: frozen ImageNet Lite0 encoder, decoder trained on cached features.

Recipe: the encoder's skip features of every training image (and its horizontal mirror)
are computed once and cached; only the decoder is trained (Adam, BCE + soft Dice). The
corpus masks are v7labs manual annotations of ieee8023 images (train/val/test by patient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engines.efficientnet_lite import EfficientNetLite0, load_imagenet_lite0
from engines.networks import GrayToImageNet, UNetDecoder
from engines.training.corpus import load_image, load_mask, read_manifest, seed_everything
from screener.imaging.preprocess import NET_SIZE, resize, segmenter_input

log = logging.getLogger(__name__)


@dataclass
class SegmenterReport:
    dice_val: list[float]
    dice_test: list[float]
    epochs: int


@torch.no_grad()
def encode_skips(encoder: EfficientNetLite0, batch: torch.Tensor) -> list[torch.Tensor]:
    return [s.half() for s in encoder.forward_skips(GrayToImageNet()(batch))]


def _inputs_and_targets(
    corpus_dir: Path, rows: list[dict[str, str]], flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for row in rows:
        image = load_image(corpus_dir, row)
        mask = load_mask(corpus_dir, row)
        assert mask is not None
        x = segmenter_input(image)
        y = resize(mask.astype(np.float32), NET_SIZE, NET_SIZE)[None]
        if flip:
            x, y = x[..., ::-1].copy(), y[..., ::-1].copy()
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


@torch.no_grad()
def predict_masks(
    encoder: EfficientNetLite0, decoder: UNetDecoder, images: list[np.ndarray]
) -> list[np.ndarray]:
    """Boolean lung masks at each image's own geometry."""
    decoder.eval()
    out = []
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        x = torch.from_numpy(np.stack([segmenter_input(im) for im in chunk]))
        skips = encoder.forward_skips(GrayToImageNet()(x))
        prob = torch.sigmoid(decoder(skips, (NET_SIZE, NET_SIZE)))[:, 0].numpy()
        for p, im in zip(prob, chunk, strict=True):
            out.append(resize(p, *im.shape) >= 0.5)
    return out


def train_segmenter(
    corpus_dir: Path, out_dir: Path, *, epochs: int = 30, seed: int = 0
) -> tuple[UNetDecoder, SegmenterReport]:
    seed_everything(seed)
    rows = [r for r in read_manifest(corpus_dir) if r["mask"]]
    train = [r for r in rows if r["split"] == "train"]
    encoder = load_imagenet_lite0()
    skips: list[list[torch.Tensor]] = []
    targets: list[torch.Tensor] = []
    for flip in (False, True):
        x, y = _inputs_and_targets(corpus_dir, train, flip)
        for start in range(0, len(x), 32):
            skips.append(encode_skips(encoder, x[start : start + 32]))
            targets.append(y[start : start + 32])
    log.info("cached encoder features of %d training images (x2 mirrored)", len(train))
    feats = [torch.cat([s[i] for s in skips]) for i in range(5)]
    target = torch.cat(targets)
    decoder = UNetDecoder()
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(target)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        decoder.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, 16):
            idx = perm[start : start + 16]
            logit = decoder([f[idx].float() for f in feats], (NET_SIZE, NET_SIZE))
            y = target[idx]
            prob = torch.sigmoid(logit)
            soft_dice = 1 - (2 * (prob * y).sum((1, 2, 3)) + 1) / (
                prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1
            )
            loss = F.binary_cross_entropy_with_logits(logit, y) + soft_dice.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        log.info("segmenter epoch %d loss %.4f", epoch + 1, total / n)
    report = SegmenterReport(
        dice_val=_dice_on(corpus_dir, [r for r in rows if r["split"] == "val"], encoder, decoder),
        dice_test=_dice_on(corpus_dir, [r for r in rows if r["split"] == "test"], encoder, decoder),
        epochs=epochs,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(decoder.state_dict(), out_dir / "decoder.pt")
    return decoder, report


def _dice_on(
    corpus_dir: Path, rows: list[dict[str, str]], encoder: EfficientNetLite0, decoder: UNetDecoder
) -> list[float]:
    images = [load_image(corpus_dir, r) for r in rows]
    preds = predict_masks(encoder, decoder, images)
    truths = [load_mask(corpus_dir, r) for r in rows]
    return [dice(p, t) for p, t in zip(preds, truths, strict=True) if t is not None]
