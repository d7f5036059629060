"""``screener evaluate`` as plain data: labelled images scored, metrics with intervals, plots.

The labels CSV is read here (``threshold tune`` reads it the same way); the metrics are
:mod:`screener.evaluation`'s pure functions; the command prints the report this returns.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from screener import evaluation as ev
from screener.offline_screening import OfflineScreener

SUBGROUP_COLUMNS = ("view", "modality", "sex", "source")


class LabelsError(ValueError):
    """The labels CSV cannot be used (message names the file and what is missing)."""


class NoLabelledImagesError(RuntimeError):
    """No screened image matched the labels CSV: nothing to evaluate."""


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    """Labels CSV keyed by ``sop_instance_uid`` (column ``label``; optional view, modality,
    sex, source columns for the subgroup tables). Column names and label values match
    case-insensitively (labels are returned lower-case). UTF-8, with or without the byte
    order mark a spreadsheet's "CSV UTF-8" export writes (it hid the first column)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames:
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        if not reader.fieldnames or not {"sop_instance_uid", "label"} <= set(reader.fieldnames):
            raise LabelsError(f"{path.name}: the labels CSV needs columns sop_instance_uid,label")
        rows = {(row["sop_instance_uid"] or "").strip(): row for row in reader}
    for row in rows.values():
        row["label"] = (row["label"] or "").strip().lower()
    return rows


def evaluate_labelled(
    screener: OfflineScreener,
    paths: list[Path],
    truth: dict[str, dict[str, str]],
    positive: str = "covid",
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Screen ``paths``, match images to ``truth`` and report (plots into ``plots_dir``).

    Raises :class:`NoLabelledImagesError` when no screened image has a label.
    """
    positive = positive.strip().lower()
    rows = [
        row | {"score": score, "view_screened": image.view}
        for row, score, image in screener.labelled_scores(paths, truth)
    ]
    if not rows:
        raise NoLabelledImagesError("no screened image matched the labels CSV")
    threshold = screener.threshold.value
    report = evaluation_report(rows, threshold, positive)
    report["model"] = screener.model_ref
    report["scheme"] = screener.scheme
    report["interval"] = "Wilson score 95%"
    if plots_dir is not None:
        report["plots"] = [str(p) for p in write_plots(rows, threshold, positive, plots_dir)]
    return report


def write_plots(
    rows: list[dict[str, Any]], threshold: float, positive: str, out: Path
) -> list[Path]:
    """ROC, precision-recall and score histogram (per label) PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    y = [r["label"] == positive for r in rows]
    s = [r["score"] for r in rows]
    by_label: dict[str, Sequence[float]] = {
        lab: [r["score"] for r in rows if r["label"] == lab]
        for lab in sorted({r["label"] for r in rows})
    }
    return [
        ev.plot_roc(y, s, out / "roc.png"),
        ev.plot_pr(y, s, out / "pr.png"),
        ev.plot_histogram(by_label, out / "histogram.png", threshold=threshold),
    ]


def evaluation_report(
    rows: list[dict[str, Any]], threshold: float, positive: str
) -> dict[str, Any]:
    """Everything ``evaluate`` prints, as plain data (pure; tested directly)."""
    y = np.array([r["label"] == positive for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    summary = ev.summarize(y, s, threshold)
    c = summary.confusion
    report: dict[str, Any] = {
        "n": len(rows),
        "n_positive": summary.n_positive,
        "n_negative": summary.n_negative,
        "threshold": threshold,
        "auc": summary.auc,
        "average_precision": summary.average_precision,
        "sensitivity": c.sensitivity.__dict__,
        "specificity": c.specificity.__dict__,
        "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn},
        "threshold_table": [
            {
                "threshold": t.threshold,
                "sensitivity": t.sensitivity.__dict__,
                "specificity": t.specificity.__dict__,
            }
            for t in ev.threshold_table(y, s)
        ],
        "subgroups": [],
    }
    for key in SUBGROUP_COLUMNS:
        if not any(r.get(key) for r in rows):
            continue
        for value in sorted({str(r.get(key) or "unknown") for r in rows}):
            idx = [i for i, r in enumerate(rows) if str(r.get(key) or "unknown") == value]
            sub = ev.summarize(y[idx], s[idx], threshold)
            report["subgroups"].append(
                {
                    "group": key,
                    "value": value,
                    "n": len(idx),
                    "n_positive": sub.n_positive,
                    "auc": sub.auc,
                    "sensitivity": sub.confusion.sensitivity.__dict__,
                    "specificity": sub.confusion.specificity.__dict__,
                }
            )
    return report


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as null: ``--json`` output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value
