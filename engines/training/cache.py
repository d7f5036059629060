"""The training recipe's ``.npz`` caches, each keyed by what it was computed from.

A cache is reused only when the key stored in it matches the caller's: e.g. the lung masks
of ``cache/segmented.npz`` belong to one decoder's weights and one list of corpus rows, and
the scheme features, CAM maps and trunk features built on those masks carry the masks' key.
Retraining the segmenter (or changing the corpus) then rebuilds them instead of training a
classifier on crops the shipped segmenter does not make.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from screener import atomic_files

KEY = "cache_key"  # the array holding the key in each cache file


def digest(*parts: str) -> str:
    """SHA-256 of ``parts`` (a cache key made of other keys and names)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a network's weights: the same as the digest of the state saved to
    ``decoder.pt``, whether the decoder was just trained or loaded from that file."""
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def rows_digest(rows: Iterable[dict[str, str]]) -> str:
    """SHA-256 of the corpus rows a cache covers (ids and image files, in order)."""
    return digest(*(f"{r['id']}\t{r.get('image', '')}" for r in rows))


def load_keyed(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``path`` when it was saved under ``key``; None when it is missing,
    stale (another key, or none: written before caches were keyed) or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if KEY not in data.files or str(data[KEY]) != key:
                return None
            return {name: data[name] for name in data.files if name != KEY}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_keyed(path: Path, key: str, **arrays: np.ndarray) -> None:
    """Write ``arrays`` with ``key`` to ``path`` through the project's atomic, fsynced write
    (:func:`screener.atomic_files.write_with`): a stopped run or a power cut leaves the old
    cache or the new one, never a torn one that a later run would take for valid."""

    def write(fh: BinaryIO) -> None:
        np.savez(fh, **{KEY: np.array(key)}, **arrays)  # type: ignore[arg-type]

    atomic_files.write_with(path, write)
