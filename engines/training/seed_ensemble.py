"""A small seed ensemble of the crop network: does averaging replicas help? (validation split)

    git show 5a63bb7:engines/weights/classifier-crop.torch.pt > runs/seed_ensemble/start.torch.pt
    nice -n 10 .venv/bin/python -m engines.training.robust cache --split train
    nice -n 10 .venv/bin/python -m engines.training.robust cache --split val
    nice -n 10 .venv/bin/python -m engines.training.seed_ensemble train --seed 0   # 1, 2, ...
    nice -n 10 .venv/bin/python -m engines.training.seed_ensemble record --seeds 0 1 2

Issue 14 asks to ship a small ensemble (of schemes or of seeds) if it improves the
within-source AUCs and the robustness on validation. The two shipped schemes were averaged
for 1.3.0 and lost AUC (model card, History). Here the members are replicas of the crop
network's last training step, the augmented fine-tune
(:func:`engines.training.augmented.finetune_augmented`, with the configuration that made
the shipped network, epoch chosen on validation as it was), each started from the 1.1.0
crop network (the shipped network's starting point, commit 5a63bb7) with its own seed. So
the members differ only by the seed of their augmentation and batch order. Their inputs are
the run-time path's (``robust`` caches: classifier input and lung share of every frontal
train and validation film through decode, prepare and the shipped segmenter).

An ensemble averages its members' logits (:class:`EnsembleCamNet`); its CAM is the average of
theirs, so it is still exactly what the score is made of. Every member, every ensemble of
the first K seeds, and the shipped network are measured on validation as a robust fine-tune
epoch is (:func:`engines.training.robust.evaluate`: within-source AUCs, COVID heatmap lung
share, calibration refitted, threshold at 95 % sensitivity, change under JPEG 2000 10:1,
JPEG q90 and rotations of the validation films).

Rule fixed before the first run: an ensemble ships only if, against its seed-0 member alone,
its within-source AUC mean is not lower, its heatmap lung share is >= 0.7, and its mean
change under JPEG 2000 10:1 and under JPEG q90 each falls by >= 30 % (the robust fine-tune's
gain); it costs one classifier pass per member per film.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.manifest import SHIPPED_WEIGHTS_DIR
from engines.networks import ClassifierCamNet
from engines.runtime.torch_engine import load_sidecar
from engines.training.augmented import AugmentConfig, SchemeInputs, finetune_augmented
from engines.training.classifier import label_indices
from engines.training.corpus import default_corpus_dir
from engines.training.robust import (
    COMPRESSION,
    MIN_LUNG_FRACTION,
    REQUIRED_GAIN,
    CachedSplit,
    _cache_path,
    evaluate,
    load_cache,
    load_shipped_crop,
)

log = logging.getLogger(__name__)

# The configuration of the shipped network's augmented fine-tune (metrics.json, crop scheme,
# augmented_finetune.config); only the seed changes between members.
SHIPPED_AUGMENT = AugmentConfig(epochs=8, lung_weight=1.0, min_lung_fraction=0.7)


class EnsembleCamNet(torch.nn.Module):
    """Members of the same GAP + linear design, averaged in logit space.

    Returns what :class:`ClassifierCamNet` returns: probabilities of the mean logits, the
    mean CAM (the logit of the mean is the spatial mean of that CAM plus the mean bias),
    and the members' pooled features side by side."""

    def __init__(self, members: list[ClassifierCamNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)
        self.nets = list(members)  # typed view of the same modules

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, cams, pooled = [], [], []
        for member in self.nets:
            _, cam, features = member(x)
            logits.append(member.fc(features))
            cams.append(cam)
            pooled.append(features)
        mean_logits = torch.stack(logits).mean(dim=0)
        return (
            torch.softmax(mean_logits, dim=1),
            torch.stack(cams).mean(dim=0),
            torch.cat(pooled, 1),
        )


def training_inputs(
    train: CachedSplit, val: CachedSplit
) -> tuple[list[dict[str, str]], SchemeInputs]:
    """The reference inputs of both cached splits as :func:`finetune_augmented` takes them."""
    x = np.concatenate([train.x[:, 0], val.x[:, 0]]).astype(np.float32)[:, None]
    lung = np.concatenate([train.lung, val.lung]).astype(np.float32)[:, None] / 255.0
    return [*train.rows, *val.rows], SchemeInputs(x=x, lung=lung)


def train_member(
    start: ClassifierCamNet, train: CachedSplit, val: CachedSplit, seed: int
) -> tuple[ClassifierCamNet, list[dict[str, float]], int]:
    rows, inputs = training_inputs(train, val)
    return finetune_augmented(start, rows, inputs, replace(SHIPPED_AUGMENT, seed=seed))


def verdict(ensemble: dict[str, Any], single: dict[str, Any]) -> bool:
    """The rule of the module docstring (validation figures only)."""
    return bool(
        ensemble["val_score"] >= single["val_score"]
        and ensemble["val_covid_map_lung_fraction"] >= MIN_LUNG_FRACTION
        and all(
            ensemble["copies"][c]["mean_abs_delta"]
            <= (1.0 - REQUIRED_GAIN) * single["copies"][c]["mean_abs_delta"]
            for c in COMPRESSION
        )
    )


def _member_path(work: Path, seed: int) -> Path:
    return work / f"member-{seed}.pt"


def _measure(net: torch.nn.Module, val: CachedSplit) -> dict[str, Any]:
    """:func:`robust.evaluate`'s validation figures, without its training-epoch fields."""
    entry = evaluate(net, val, 0, float("nan"))
    del entry["epoch"], entry["train_loss"]
    return entry


def record(work: Path, robust_work: Path, seeds: list[int], weights_dir: Path) -> dict[str, Any]:
    """Measure the shipped network, every member and the ensembles of the first 2..K seeds
    on validation; write the block into metrics.json (``seed_ensemble``)."""
    corpus = default_corpus_dir()
    val = load_cache(corpus, "val", _cache_path(robust_work, "val"))
    members, reports = [], []
    for seed in seeds:
        start, _ = load_sidecar(work / "start.torch.pt")
        assert isinstance(start, ClassifierCamNet)
        start.load_state_dict(torch.load(_member_path(work, seed), weights_only=True))
        members.append(start.eval())
        reports.append(json.loads((work / f"member-{seed}.json").read_text()))
    rows = [
        {"seeds": seeds[:k], **_measure(EnsembleCamNet(members[:k]), val)}
        for k in range(1, len(members) + 1)
    ]
    single = rows[0]
    for row in rows[1:]:
        row["ships"] = verdict(row, single)
    members_alone = [
        {"seed": seed, "chosen_epoch": report["chosen_epoch"], **_measure(member, val)}
        for seed, member, report in zip(seeds, members, reports, strict=True)
    ]
    block = {
        "split": "val",
        "start": "1.1.0 crop network (commit 5a63bb7)",
        "config": asdict(SHIPPED_AUGMENT),
        "n_train": reports[0]["n_train"],
        "n_val": len(val.rows),
        "required_gain": REQUIRED_GAIN,
        "shipped": _measure(load_shipped_crop(weights_dir), val),
        "members": members_alone,
        "ensembles": rows,
        "chosen": next((r["seeds"] for r in rows[1:] if r["ships"]), None),
    }
    metrics_path = weights_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["seed_ensemble"] = block
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    return block


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one member: the augmented fine-tune with this seed")
    t.add_argument("--seed", type=int, required=True)
    r = sub.add_parser("record", help="measure members and ensembles; write metrics.json")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    for p in (t, r):
        p.add_argument("--work", type=Path, default=Path("runs/seed_ensemble"))
        p.add_argument("--robust-work", type=Path, default=Path("runs/robust"))
        p.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS_DIR)
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "record":
        print(json.dumps(record(args.work, args.robust_work, args.seeds, args.weights), indent=1))
        return
    corpus = default_corpus_dir()
    train = load_cache(corpus, "train", _cache_path(args.robust_work, "train"))
    val = load_cache(corpus, "val", _cache_path(args.robust_work, "val"))
    start, _ = load_sidecar(args.work / "start.torch.pt")
    assert isinstance(start, ClassifierCamNet)
    net, history, epoch = train_member(start, train, val, args.seed)
    torch.save(net.state_dict(), _member_path(args.work, args.seed))
    report = {
        "seed": args.seed,
        "chosen_epoch": epoch,
        "history": history,
        "n_train": int(np.sum(label_indices(train.rows) >= 0)),  # what the fine-tune trains on
    }
    (args.work / f"member-{args.seed}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"seed": args.seed, "chosen_epoch": epoch}))


if __name__ == "__main__":
    main()
