"""Leave-one-source-out: the production head retrained without a source, tested on it.

    nice -n 10 .venv/bin/python -m engines.training.loso

Features are the shipped production network's pooled features (the ``features`` output of
its classifier ONNX, through the run-time preprocessing); the linear head is refitted with
the recipe's ``fit_linear`` at the production head's weight decay and weighting, without
mirror copies. For every source with enough frontal images: a head trained on the training
split of all sources (``within``) and one trained without the source (``held out``), both
evaluated on that source's test-split images (and the held-out head on all of its images,
which it never saw). The backbone was fine-tuned with every source's training images, so the
held-out figures are an upper bound on what a truly unseen site would give.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest
from engines.training.classifier import fit_linear, label_indices, training_weights
from engines.training.corpus import default_corpus_dir, source_group
from engines.training.scoring import split_scores
from screener import evaluation as ev

MIN_IMAGES = 20


def _metrics(rows: list[dict[str, str]], probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Within one source: COVID vs rest AUC (when both occur), pneumonia vs normal AUC
    (1 - p(normal), when both occur), COVID sensitivity / specificity at ``threshold``."""
    covid = np.array([r["label"] == "covid" for r in rows])
    labels = [r["label"] for r in rows]
    pn = np.array([lab in ("pneumonia", "normal") for lab in labels])
    pneumonia = np.array([lab == "pneumonia" for lab in labels])
    out: dict[str, Any] = {"n": len(rows), "n_covid": int(covid.sum())}
    out["covid_auc"] = ev.roc_auc(covid, probs[:, 0]) if 0 < covid.sum() < len(rows) else None
    both = pn.any() and 0 < pneumonia[pn].sum() < pn.sum()
    out["pneumonia_vs_normal_auc"] = (
        ev.roc_auc(pneumonia[pn], 1.0 - probs[pn, 2]) if both and pn.sum() >= 10 else None
    )
    at = ev.confusion_at(covid, probs[:, 0], threshold)
    out["sensitivity"] = str(at.sensitivity)
    out["specificity"] = str(at.specificity)
    return out


def _head(rows: list[dict[str, str]], x: np.ndarray, weight_decay: float, weighting: str) -> Any:
    y = label_indices(rows)
    keep = y >= 0
    kept = [r for r, k in zip(rows, keep, strict=True) if k]
    return fit_linear(
        x[keep],
        y[keep],
        3,
        weight_decay=weight_decay,
        sample_weight=training_weights(kept, y[keep], weighting),
    )


def run(corpus_dir: Path, weights_dir: Path, cache_dir: Path) -> dict[str, Any]:
    manifest = load_manifest(weights_dir)
    metrics = json.loads((weights_dir / "metrics.json").read_text())
    scheme = manifest.production_scheme
    block = metrics["schemes"][scheme]
    weight_decay = float(block["weight_decay"])
    weighting = "source_class" if block["weighting"].startswith("source_class") else "class"
    data = {
        split: split_scores(corpus_dir, manifest, scheme, split, cache_dir)
        for split in ("train", "val", "test")
    }
    rows = {s: d[0] for s, d in data.items()}
    feats = {s: d[1]["features"].astype(np.float64) for s, d in data.items()}
    target = manifest.target_sensitivity
    sources = sorted({source_group(r) for s in rows for r in rows[s]})
    table = []
    for source in sources:
        every = [r for s in rows for r in rows[s] if source_group(r) == source]
        if len(every) < MIN_IMAGES:
            continue
        entry: dict[str, Any] = {"source": source, "n_images": len(every)}
        for name, exclude in (("within", None), ("held_out", source)):

            def sel(split: str, exclude: str | None = exclude) -> np.ndarray:
                return np.array([source_group(r) != exclude for r in rows[split]])

            train = sel("train")
            head = _head(
                [r for r, k in zip(rows["train"], train, strict=True) if k],
                feats["train"][train],
                weight_decay,
                weighting,
            )
            val = sel("val")
            val_covid = np.array([r["label"] == "covid" for r in rows["val"]])[val]
            threshold = ev.threshold_for_sensitivity(
                val_covid, head.probabilities(feats["val"][val])[:, 0], target
            )
            test_rows = [r for r in rows["test"] if source_group(r) == source]
            test_x = feats["test"][[source_group(r) == source for r in rows["test"]]]
            entry[name] = _metrics(test_rows, head.probabilities(test_x), threshold)
            if name == "held_out":
                all_x = np.concatenate(
                    [feats[s][[source_group(r) == source for r in rows[s]]] for s in rows]
                )
                entry["held_out_all_splits"] = _metrics(every, head.probabilities(all_x), threshold)
        table.append(entry)
    result = {
        "scheme": scheme,
        "features": f"pooled features of the shipped {scheme} network (frozen)",
        "weight_decay": weight_decay,
        "weighting": weighting,
        "min_images": MIN_IMAGES,
        "sources": table,
    }
    return json.loads(json.dumps(result, default=lambda v: None if math.isnan(v) else v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS_DIR)
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/model-eval"))
    args = parser.parse_args()
    result = run(args.corpus or default_corpus_dir(), args.weights, args.cache)
    path = args.weights / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["leave_one_source_out"] = result
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
