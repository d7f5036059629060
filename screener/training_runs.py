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


class MissingInputError(FileNotFoundError):
    """A file a step needs is missing; the message says which step makes it (exit 2)."""


class ExportChoiceError(ValueError):
    """``export``'s schemes do not make a model: the production scheme is not shipped."""


def require(path: Path, what_to_do: str) -> Path:
    """``path``, or :class:`MissingInputError` saying what to do to make it."""
    if not path.is_file():
        raise MissingInputError(f"{path} not found: {what_to_do}")
    return path


def use_threads(threads: int) -> None:
    """torch's intra-op threads (the recipes are measured on 2 CPU cores)."""
    torch.set_num_threads(threads)


def corpus_dir(corpus: Path | None) -> Path:
    """The given corpus folder, else the default (``SCREENER_CXR_DIR`` or ../shared/data/cxr);
    :class:`MissingInputError` when it holds no ``manifest.csv``."""
    folder = corpus or default_corpus_dir()
    if not (folder / "manifest.csv").is_file():
        raise MissingInputError(
            f"no corpus at {folder} (no manifest.csv): pass --corpus DIR or set SCREENER_CXR_DIR"
        )
    return folder


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

    trained = require(
        work_dir / "segmenter" / "decoder.pt",
        f"run `screener train segmenter --work-dir {work_dir}` first",
    )
    corpus = corpus_dir(corpus)
    decoder = UNetDecoder()
    decoder.load_state_dict(torch.load(trained, weights_only=True))
    rows = read_manifest(corpus)
    masks = cached_masks(corpus, rows, decoder.eval(), work_dir)
    _, metrics = train_view_head(rows, masks.raw_features, seed=seed)
    return dict(metrics)


def export_models(
    work_dir: Path,
    weights_dir: Path | None,
    schemes: list[str] | None,
    production: str | None = None,
) -> tuple[list[str], Path]:
    """Install the trained ONNX models of ``schemes`` (default: the production scheme) and
    their model card into ``weights_dir`` (default: the shipped weights); the schemes
    installed and the folder. ``production`` (default: the one of ``work_dir/metrics.json``)
    must be among ``schemes``: :class:`ExportChoiceError` otherwise, never a manifest whose
    production scheme has no classifier."""
    from engines.model_card import write_model_card
    from engines.training.recipe import install_weights

    train = f"run `screener train classifier --work-dir {work_dir}` first"
    metrics = json.loads(require(work_dir / "metrics.json", train).read_text())
    production = production or str(metrics["production_scheme"])
    chosen = list(dict.fromkeys(schemes or [production]))
    check_production(production, chosen, str(metrics["production_scheme"]))
    for scheme in ["segmenter", *(f"classifier-{s}" for s in chosen)]:
        require(work_dir / "export" / f"{scheme}.onnx", train)
    metrics = metrics | {"production_scheme": production}
    target = weights_dir or SHIPPED_WEIGHTS_DIR
    install_weights(work_dir, target, metrics, chosen)
    write_model_card(metrics, target / "MODEL_CARD.md", shipped=chosen)
    return chosen, target


def check_production(production: str, chosen: list[str], trained: str) -> None:
    """:class:`ExportChoiceError` unless the production scheme is among those shipped."""
    if production in chosen:
        return
    whence = "metrics.json's" if production == trained else "the --production-scheme"
    raise ExportChoiceError(
        f"{whence} production scheme {production!r} is not among the schemes to ship "
        f"{chosen}: add --scheme {production}, or make a shipped one the production scheme "
        f"with --production-scheme {chosen[0]}"
    )
