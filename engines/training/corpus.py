"""The curated chest X-ray corpus (../shared/data/cxr): manifest rows, images and masks."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

FRONTAL_VIEWS = frozenset({"PA", "AP", "AP_SUPINE"})


def default_corpus_dir() -> Path:
    env = os.environ.get("SCREENER_CXR_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr"


def read_manifest(corpus_dir: Path) -> list[dict[str, str]]:
    with (corpus_dir / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def load_image(corpus_dir: Path, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(corpus_dir / row["image"]).convert("L"))


def load_mask(corpus_dir: Path, row: dict[str, str]) -> np.ndarray | None:
    if not row.get("mask"):
        return None
    return np.asarray(Image.open(corpus_dir / row["mask"]).convert("L")) >= 128


def source_group(row: dict[str, str]) -> str:
    """Short source name from the patient id prefix (ieee8023, nih, hannover, ...)."""
    return row["patient_id"].split(":", 1)[0]


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
