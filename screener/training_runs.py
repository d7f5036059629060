"""The training steps ``screener train ...`` and ``screener export`` run (train extra).

Each function is one step of :mod:`engines.training.recipe` with its inputs resolved
(corpus folder, cached segmenter, metrics file) and its result returned as plain data for
the command to print. torch is imported here, so without the train extra the command fails
with ``ModuleNotFoundError`` (exit 6 at the CLI boundary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.manifest import SHIPPED_WEIGHTS_DIR
from engines.training.corpus import default_corpus_dir, read_manifest
from screener.atomic_files import write_text


def use_threads(threads: int) -> None:
    """torch's intra-op threads (the recipes are measured on 2 CPU cores)."""
    torch.set_num_threads(threads)


def corpus_dir(corpus: Path | None) -> Path:
    """The given corpus folder, else the default (``SCREENER_CXR_DIR`` or ../shared/data/cxr)."""
    return corpus or default_corpus_dir()


def train_segmenter_step(
    corpus: Path | None, work_dir: Path, *, epochs: int, seed: int
) -> dict[str, Any]:
    """Train the U-Net lung segmenter into ``work_dir/segmenter``; its Dice summary, also
    written to ``work_dir/segmenter/metrics.json``."""
    from engines.training.segmenter import train_segmenter

    _, report = train_segmenter(
        corpus_dir(corpus), work_dir / "segmenter", epochs=epochs, seed=seed
    )
    metrics = {
        "epochs": report.epochs,
        "dice_val_mean": float(np.mean(report.dice_val)),
        "n_val": len(report.dice_val),
        "dice_test_mean": float(np.mean(report.dice_test)),
        "n_test": len(report.dice_test),
        "dice_test_median": float(np.median(report.dice_test)),
    }
    write_text(work_dir / "segmenter" / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def train_view_step(corpus: Path | None, work_dir: Path, *, seed: int) -> dict[str, Any]:
    """Train the frontal/lateral head on the trained segmenter's pooled features (masks
    cached in ``work_dir/cache``); its validation metrics."""
    from engines.networks import UNetDecoder
    from engines.training.classifier import train_view_head
    from engines.training.recipe import cached_masks

    decoder = UNetDecoder()
    decoder.load_state_dict(torch.load(work_dir / "segmenter" / "decoder.pt", weights_only=True))
    corpus = corpus_dir(corpus)
    rows = read_manifest(corpus)
    masks = cached_masks(corpus, rows, decoder.eval(), work_dir)
    _, metrics = train_view_head(rows, masks.raw_features, seed=seed)
    return dict(metrics)


def export_models(
    work_dir: Path, weights_dir: Path | None, schemes: list[str] | None
) -> tuple[list[str], Path]:
    """Install the trained ONNX models of ``schemes`` (default: the production scheme of
    ``work_dir/metrics.json``) and their model card into ``weights_dir`` (default: the
    shipped weights); the schemes installed and the folder."""
    from engines.model_card import write_model_card
    from engines.training.recipe import install_weights

    metrics = json.loads((work_dir / "metrics.json").read_text())
    target = weights_dir or SHIPPED_WEIGHTS_DIR
    chosen = schemes or [metrics["production_scheme"]]
    install_weights(work_dir, target, metrics, chosen)
    write_model_card(metrics, target / "MODEL_CARD.md", shipped=chosen)
    return chosen, target
