"""Score corpus images with the shipped ONNX files through the run-time preprocessing.

The calibration, robustness and leave-one-source-out steps all start from the same numbers
the service would produce (segmenter -> scheme input -> classifier), cached per scheme and
split under a work folder so each step costs one pass over the corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.manifest import ModelManifest
from engines.runtime.base import load_engine
from engines.training.corpus import FRONTAL_VIEWS, load_image, read_manifest

BATCH = 16


def frontal_split(corpus_dir: Path, split: str) -> list[dict[str, str]]:
    """Frontal (and UNKNOWN-view) rows of a split, in manifest order (what the card uses)."""
    return [
        r
        for r in read_manifest(corpus_dir)
        if r["split"] == split and (r["view"] in FRONTAL_VIEWS or r["view"] == "UNKNOWN")
    ]


def score_images(
    images: list[np.ndarray], manifest: ModelManifest, scheme: str, threads: int = 1
) -> dict[str, np.ndarray]:
    """Raw (uncalibrated) ``probabilities`` (N,3) and pooled ``features`` (N,1280)."""
    from screener.imaging.preprocess import resize, scheme_input, segmenter_input

    entry = manifest.scheme(scheme)
    segmenter = load_engine(
        "onnxruntime", manifest.path(manifest.segmenter), intra_op_threads=threads
    )
    classifier = load_engine(
        "onnxruntime", manifest.path(entry.classifier), intra_op_threads=threads
    )
    probs, feats = [], []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        seg = segmenter.infer(np.stack([segmenter_input(im) for im in chunk]))
        inputs = [
            scheme_input(im, resize(p, *im.shape) >= 0.5, scheme, equalized=entry.equalized)[0]  # type: ignore[arg-type]
            for im, p in zip(chunk, seg["lung_probability"], strict=True)
        ]
        out = classifier.infer(np.stack(inputs))
        probs.append(out["probabilities"])
        feats.append(out["features"])
    return {"probabilities": np.concatenate(probs), "features": np.concatenate(feats)}


def split_scores(
    corpus_dir: Path, manifest: ModelManifest, scheme: str, split: str, cache_dir: Path
) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    """Rows and raw outputs of a split, cached in ``cache_dir`` (keyed by the ONNX hash)."""
    rows = frontal_split(corpus_dir, split)
    digest = manifest.sha256.get(manifest.scheme(scheme).classifier, "nohash")[:12]
    path = cache_dir / f"scores-{scheme}-{split}-{digest}.npz"
    if path.exists():
        data = np.load(path)
        return rows, {k: data[k] for k in data.files}
    out = score_images([load_image(corpus_dir, r) for r in rows], manifest, scheme)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, probabilities=out["probabilities"], features=out["features"])
    return rows, out
