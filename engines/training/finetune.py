"""Going further than a frozen backbone: fine-tune the last Lite0 stage on cached features.

The first ``TAIL_START`` blocks stay frozen (ImageNet), their output for every image (and
its mirror image) is cached once; only blocks ``TAIL_START..15``, the 1280-channel head and
the linear classifier are trained. BatchNorm statistics stay frozen (small batches). The
epoch is chosen on the validation split by the mean within-source AUC, never on test.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engines.efficientnet_lite import EfficientNetLite0
from engines.networks import ClassifierCamNet, GrayToImageNet
from engines.training.cache import load_keyed, save_keyed
from engines.training.classifier import (
    LinearHead,
    label_indices,
    training_weights,
    within_source_aucs,
    within_source_mean,
)
from engines.training.corpus import load_image
from screener.imaging.preprocess import Scheme, scheme_input

log = logging.getLogger(__name__)
TAIL_START = 14


@torch.no_grad()
def trunk_features(
    encoder: EfficientNetLite0, inputs: list[np.ndarray], batch: int = 32
) -> np.ndarray:
    """Output of blocks [0, TAIL_START) as float16 (N, 192, 7, 7)."""
    norm = GrayToImageNet()
    out = []
    for start in range(0, len(inputs), batch):
        x = encoder.act(
            encoder._bn0(
                encoder._conv_stem(norm(torch.from_numpy(np.stack(inputs[start : start + batch]))))
            )
        )
        for block in encoder._blocks[:TAIL_START]:
            x = block(x)
        out.append(x.half().numpy())
    return np.concatenate(out)


def cached_trunk(
    corpus_dir: Path,
    rows: list[dict[str, str]],
    masks: dict[str, np.ndarray],
    scheme: Scheme,
    encoder: EfficientNetLite0,
    cache: Path,
    key: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Trunk features of ``rows``' scheme inputs, cached in ``cache`` under ``key`` (the
    masks' and rows' digest: another segmenter's masks make other inputs)."""
    data = load_keyed(cache, key)
    if data is not None:
        return data["plain"], data["mirrored"]
    inputs = [scheme_input(load_image(corpus_dir, r), masks[r["id"]], scheme)[0] for r in rows]
    plain = trunk_features(encoder, inputs)
    mirrored = trunk_features(encoder, [x[..., ::-1].copy() for x in inputs])
    save_keyed(cache, key, plain=plain, mirrored=mirrored)
    return plain, mirrored


class Tail(nn.Module):
    def __init__(self, encoder: EfficientNetLite0, fc: nn.Linear) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(encoder._blocks[TAIL_START:]))
        self.encoder = encoder
        self.fc = fc

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.encoder.head(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def finetune_tail(
    net: ClassifierCamNet,
    rows: list[dict[str, str]],
    plain: np.ndarray,
    mirrored: np.ndarray,
    *,
    weighting: str = "class",
    epochs: int = 8,
    lr: float = 2e-4,
    seed: int = 0,
) -> tuple[ClassifierCamNet, dict[str, float]]:
    """Fine-tune ``net``'s last stage + head in place of a copy; returns the best-on-val copy."""
    torch.manual_seed(seed)
    net = copy.deepcopy(net)
    split = np.array([r["split"] for r in rows])
    label = label_indices(rows)
    train = np.flatnonzero((split == "train") & (label >= 0))
    val = np.flatnonzero(split == "val")
    x = torch.from_numpy(np.concatenate([plain[train], mirrored[train]]))
    y = torch.from_numpy(np.concatenate([label[train], label[train]]).astype(np.int64))
    train_rows = [rows[i] for i in train] * 2
    sw = torch.from_numpy(training_weights(train_rows, y.numpy(), weighting))
    tail = Tail(net.encoder, net.fc)
    params = [p for n, p in tail.named_parameters() if "bn" not in n.split(".")[-2]]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    xv = torch.from_numpy(plain[val])
    val_rows = [rows[i] for i in val]

    def val_score() -> tuple[float, dict[str, float]]:
        tail.eval()
        with torch.no_grad():
            probs = torch.softmax(tail(xv.float()), 1).numpy()
        aucs = within_source_aucs(val_rows, probs)
        return within_source_mean(aucs), aucs

    best_score, best_aucs = val_score()
    best_state = copy.deepcopy(net.state_dict())
    log.info("finetune epoch 0 val %s", best_aucs)
    for epoch in range(epochs):
        tail.eval()  # BN statistics stay frozen
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            idx = perm[start : start + 32]
            logits = tail(x[idx].float())
            loss = (F.cross_entropy(logits, y[idx], reduction="none") * sw[idx]).sum() / sw[
                idx
            ].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        score, aucs = val_score()
        log.info("finetune epoch %d val %s", epoch + 1, aucs)
        if score > best_score:
            best_score, best_aucs = score, aucs
            best_state = copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), best_aucs


@torch.no_grad()
def net_outputs(net: ClassifierCamNet, plain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, pooled features) of the network's tail on cached trunk features."""
    tail = Tail(net.encoder, net.fc).eval()
    probs, pooled = [], []
    for start in range(0, len(plain), 64):
        feats = tail.pooled(torch.from_numpy(plain[start : start + 64]).float())
        pooled.append(feats.numpy())
        probs.append(torch.softmax(net.fc(feats), 1).numpy())
    return np.concatenate(probs), np.concatenate(pooled)


def head_of(net: ClassifierCamNet) -> LinearHead:
    return LinearHead(
        weight=net.fc.weight.detach().numpy().copy(), bias=net.fc.bias.detach().numpy().copy()
    )
