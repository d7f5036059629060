"""``screener evaluate`` as plain data: labelled images scored, metrics with intervals, plots.

The labels CSV is read here (``threshold tune`` reads it the same way); the metrics are
:mod:`screener.evaluation`'s pure functions; the command prints the report this returns.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from screener import evaluation as ev
from screener.offline_screening import LabelledRun, OfflineScreener

log = logging.getLogger(__name__)
SUBGROUP_COLUMNS = ("view", "modality", "sex", "source")


class LabelsError(ValueError):
    """The labels CSV cannot be used (message names the file and what is missing)."""


class NoLabelledImagesError(RuntimeError):
    """No screened image matched the labels CSV: nothing to evaluate (``failed_studies``:
    study UID -> reason, when studies failed; then the command exits 1, not 3)."""

    def __init__(self, message: str, failed_studies: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed_studies = dict(failed_studies or {})


@dataclass
class LabelFile:
    """A labels CSV as read: the labelled rows, and how many rows had an empty label."""

    rows: dict[str, dict[str, str]]
    blank: int = 0  # rows left out: an empty label is unknown, not negative


def read_label_file(path: Path) -> LabelFile:
    """Labels CSV keyed by ``sop_instance_uid`` (column ``label``; optional view, modality,
    sex, source columns for the subgroup tables). Column names and label values match
    case-insensitively (labels are returned lower-case). UTF-8, with or without the byte
    order mark a spreadsheet's "CSV UTF-8" export writes (it hid the first column).

    A row whose label is empty is left out and counted: anything but the positive label
    counts as negative, and an image nobody labelled is not known to be negative."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames:
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        if not reader.fieldnames or not {"sop_instance_uid", "label"} <= set(reader.fieldnames):
            raise LabelsError(f"{path.name}: the labels CSV needs columns sop_instance_uid,label")
        rows = {(row["sop_instance_uid"] or "").strip(): row for row in reader}
    for row in rows.values():
        row["label"] = (row["label"] or "").strip().lower()
    labelled = {uid: row for uid, row in rows.items() if row["label"]}
    return LabelFile(labelled, blank=len(rows) - len(labelled))


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    """The labelled rows of :func:`read_label_file`, with a warning counting the rows left
    out for an empty label (``threshold tune`` reads labels through this)."""
    labels = read_label_file(path)
    if labels.blank:
        log.warning(blank_label_warning(path, labels.blank))
    return labels.rows


def blank_label_warning(path: Path, blank: int) -> str:
    return (
        f"{path.name}: {blank} row(s) with an empty label left out "
        "(an unlabelled image is unknown, not negative)"
    )


def evaluate_labelled(
    screener: OfflineScreener,
    paths: list[Path],
    truth: dict[str, dict[str, str]],
    positive: str = "covid",
    plots_dir: Path | None = None,
    *,
    blank_labels: int = 0,
) -> dict[str, Any]:
    """Screen ``paths``, match images to ``truth`` and report (plots into ``plots_dir``):
    the metrics, the threshold and where it comes from, and every labelled image left out
    of the metrics with why (``not_scored``; ``failed_studies``: the command exits 1).

    Raises :class:`NoLabelledImagesError` when no screened image has a label.
    """
    positive = positive.strip().lower()
    run = screener.score_labelled(paths, truth)
    rows = [row | {"score": score, "view_screened": image.view} for row, score, image in run.scored]
    if not rows:
        raise NoLabelledImagesError(
            "no screened image matched the labels CSV" + _failed_note(run.failed_studies),
            failed_studies=run.failed_studies,
        )
    threshold = screener.threshold.value
    report = evaluation_report(rows, threshold, positive)
    report["model"] = screener.model_ref
    report["scheme"] = screener.scheme
    report["interval"] = "Wilson score 95%"
    report |= threshold_fields(screener)
    report |= accounting_fields(run, len(truth), blank_labels)
    if plots_dir is not None:
        report["plots"] = [str(p) for p in write_plots(rows, threshold, positive, plots_dir)]
    return report


def threshold_fields(screener: OfflineScreener) -> dict[str, Any]:
    """Which threshold the metrics are at and why: the model's embedded (validation)
    threshold, or the one given on the command line; never one set with `threshold set`."""
    return {
        "threshold_source": screener.threshold_source,
        "operating_point": screener.threshold.operating_point,
    }


def accounting_fields(run: LabelledRun[Any], n_labelled: int, blank: int) -> dict[str, Any]:
    """The labelled images the metrics leave out, by reason, and the studies that failed."""
    not_scored = run.not_scored()
    return {
        "n_labelled": n_labelled,
        "n_blank_labels": blank,
        "n_not_scored": sum(not_scored.values()),
        "not_scored": not_scored,
        "failed_studies": [
            {"study_instance_uid": uid, "reason": reason}
            for uid, reason in run.failed_studies.items()
        ],
    }


def _failed_note(failed: dict[str, str]) -> str:
    return f" ({len(failed)} study(ies) failed)" if failed else ""


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
