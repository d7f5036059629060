"""The recipe's caches belong to the segmenter that made them (review #4): a retrained
decoder (or other corpus rows) rebuilds ``cache/segmented.npz`` and the scheme features
built on its masks, instead of training classifiers on the old decoder's crops."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.networks import UNetDecoder  # noqa: E402
from engines.training.cache import load_keyed, save_keyed, weights_digest  # noqa: E402
from engines.training.recipe import _cached_features, cached_masks  # noqa: E402

FIELDS = ["id", "image", "mask", "split", "label", "view", "patient_id"]


def _corpus(tmp_path: Path, n: int = 2) -> tuple[Path, list[dict[str, str]]]:
    """``n`` tiny noise images with a manifest.csv (what the recipe reads)."""
    from PIL import Image

    folder = tmp_path / "corpus"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"images/{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(folder / name)
        values = [f"x{i}", name, "", "train", "covid", "PA", "t:1"]
        rows.append(dict(zip(FIELDS, values, strict=True)))
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return folder, rows


def _decoder(lung_everywhere: bool) -> UNetDecoder:
    """A decoder whose masks are known: all lung, or none (its output is its bias); the
    other weights are the same for both."""
    torch.manual_seed(0)
    decoder = UNetDecoder()
    with torch.no_grad():
        decoder.out.weight.zero_()
        decoder.out.bias.fill_(20.0 if lung_everywhere else -20.0)
    return decoder.eval()


def test_a_retrained_decoder_rebuilds_the_masks_and_the_features_on_them(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    corpus, rows = _corpus(tmp_path)
    work = tmp_path / "work"
    old = cached_masks(corpus, rows, _decoder(False), work)
    assert not any(m.any() for m in old.masks.values())
    again = cached_masks(corpus, rows, _decoder(False), work)  # same decoder: from the cache
    assert again.key == old.key and np.array_equal(again.raw_features, old.raw_features)
    new = cached_masks(corpus, rows, _decoder(True), work)  # `train segmenter` again
    assert all(m.all() for m in new.masks.values())
    assert new.key != old.key
    fewer = cached_masks(corpus, rows[:1], _decoder(True), work)  # other rows: rebuilt
    assert fewer.ids == ["x0"] and fewer.key != new.key

    old_crop = _cached_features(corpus, rows, old, "crop", work)
    new_crop = _cached_features(corpus, rows, new, "crop", work)
    assert not np.array_equal(old_crop[0], new_crop[0])  # not the old masks' crops
    assert np.array_equal(_cached_features(corpus, rows, new, "crop", work)[0], new_crop[0])


def test_keyed_cache_files(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    assert load_keyed(path, "k") is None
    save_keyed(path, "k", a=np.arange(3))
    loaded = load_keyed(path, "k")
    assert loaded is not None and list(loaded) == ["a"] and loaded["a"].tolist() == [0, 1, 2]
    assert load_keyed(path, "other") is None
    np.savez(path, a=np.arange(3))  # written before caches were keyed: stale
    assert load_keyed(path, "k") is None
    path.write_bytes(b"PK\x03\x04 cut short")
    assert load_keyed(path, "k") is None
    decoder = _decoder(True)
    saved = tmp_path / "decoder.pt"
    torch.save(decoder.state_dict(), saved)
    loaded_decoder = UNetDecoder()
    loaded_decoder.load_state_dict(torch.load(saved, weights_only=True))
    assert weights_digest(loaded_decoder) == weights_digest(decoder)
    assert weights_digest(_decoder(False)) != weights_digest(decoder)


def test_a_cache_write_that_stops_half_way_leaves_the_old_cache_and_no_litter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_keyed kept its own temp file + os.replace: a failed np.savez left
    ``.c.npz.partial`` behind, and neither the file nor the rename was fsynced (a power cut
    could leave a torn cache). It writes through screener.atomic_files now."""
    from engines.training import cache
    from screener import atomic_files

    path = tmp_path / "cache" / "c.npz"
    save_keyed(path, "k", a=np.arange(3))
    real_savez = np.savez

    def savez_then_stop(fh: Any, **arrays: Any) -> None:
        real_savez(fh, **arrays)
        raise KeyboardInterrupt  # the run is stopped after the data, before the rename

    monkeypatch.setattr(cache.np, "savez", savez_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_keyed(path, "new", a=np.arange(5))
    assert os.listdir(path.parent) == ["c.npz"]  # no temporary file left
    old = load_keyed(path, "k")
    assert old is not None and old["a"].tolist() == [0, 1, 2]
    monkeypatch.setattr(cache.np, "savez", real_savez)

    writes: list[Path] = []
    real_write_with = atomic_files.write_with

    def recording(target: Path, write: Any, **kwargs: Any) -> None:
        writes.append(target)
        real_write_with(target, write, **kwargs)

    monkeypatch.setattr(atomic_files, "write_with", recording)
    save_keyed(path, "new", a=np.arange(5))
    assert writes == [path]  # the fsynced write, the folder's too (sync_dir by default)
    new = load_keyed(path, "new")
    assert new is not None and new["a"].tolist() == [0, 1, 2, 3, 4]
