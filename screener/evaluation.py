"""Screening metrics as pure functions (numpy only), plus plots with matplotlib's Agg backend.

Used by ``screener evaluate``, the training recipes' model cards and ``screener threshold
tune``. Conventions: ``labels`` are booleans (True = the positive class, e.g. COVID-19),
``scores`` are floats where higher means more likely positive, and an image is called
positive when ``score >= threshold``. Confidence intervals are **Wilson score intervals**
(95%, z = 1.96), which stay inside [0, 1] and behave near p = 1 where the normal
approximation used in the papers does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Proportion:
    """k successes out of n, with its Wilson 95% interval."""

    k: int
    n: int
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a (n=0)"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


def wilson_interval(k: int, n: int, z: float = Z_95) -> Proportion:
    """Wilson score interval for a binomial proportion k/n (NaN for n = 0)."""
    if n == 0:
        return Proportion(k, n, math.nan, math.nan, math.nan)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Proportion(k, n, p, max(0.0, centre - half), min(1.0, centre + half))


def _arrays(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} {s.shape}")
    return y, s


def roc_curve(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending; the
    first point is (0, 0) at threshold +inf."""
    y, s = _arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def roc_auc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is absent."""
    y, s = _arrays(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U with average ranks: exact, handles ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_recall_curve(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for each distinct threshold, descending."""
    y, s = _arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    predicted = distinct + 1
    precision = tps / predicted
    recall = tps / max(int(y.sum()), 1)
    return precision, recall, s[distinct]


def average_precision(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n (step-wise, no interpolation)."""
    y, _ = _arrays(labels, scores)
    if not y.any():
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> Proportion:
        return wilson_interval(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Proportion:
        return wilson_interval(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Proportion:
        return wilson_interval(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Proportion:
        return wilson_interval(self.tn, self.tn + self.fn)


def confusion_at(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> Confusion:
    """Binary confusion matrix; positive when ``score >= threshold``."""
    y, s = _arrays(labels, scores)
    pred = s >= threshold
    return Confusion(
        tp=int((pred & y).sum()),
        fp=int((pred & ~y).sum()),
        tn=int((~pred & ~y).sum()),
        fn=int((~pred & y).sum()),
    )


def multiclass_confusion(
    truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> np.ndarray:
    """Counts[i, j] = images of class ``classes[i]`` predicted as ``classes[j]``."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            out[index[t], index[p]] += 1
    return out


def threshold_for_sensitivity(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float
) -> float:
    """The highest threshold whose sensitivity is >= ``target`` (highest = best specificity
    at that sensitivity). Choose it on a validation split, never on the test split."""
    y, s = _arrays(labels, scores)
    positives = np.sort(s[y])[::-1]
    if positives.size == 0:
        raise ValueError("no positive samples: cannot choose a threshold for a sensitivity")
    needed = math.ceil(target * positives.size - 1e-9)
    needed = min(max(needed, 1), positives.size)
    return float(positives[needed - 1])


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    sensitivity: Proportion
    specificity: Proportion


def threshold_table(
    labels: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> list[ThresholdRow]:
    """Threshold -> sensitivity, specificity (with Wilson intervals), as in the papers' tables."""
    rows = []
    for t in thresholds:
        c = confusion_at(labels, scores, t)
        rows.append(ThresholdRow(float(t), c.sensitivity, c.specificity))
    return rows


@dataclass(frozen=True)
class BinarySummary:
    n_positive: int
    n_negative: int
    auc: float
    average_precision: float
    threshold: float
    confusion: Confusion


def summarize(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> BinarySummary:
    y, s = _arrays(labels, scores)
    return BinarySummary(
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        auc=roc_auc(y, s),
        average_precision=average_precision(y, s) if y.any() else math.nan,
        threshold=threshold,
        confusion=confusion_at(y, s, threshold),
    )


# --------------------------------------------------------------------------------------
# Plots (files only; Agg backend, no display needed)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use
    so the service never loads matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(
    labels: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    path: Path,
    title: str = "ROC",
) -> Path:
    plt = pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC = {roc_auc(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pr(
    labels: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    path: Path,
    title: str = "Precision-recall",
) -> Path:
    plt = pyplot()
    precision, recall, _ = precision_recall_curve(labels, scores)
    y = np.asarray(labels, dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(
        np.r_[0.0, recall],
        np.r_[1.0, precision],
        drawstyle="steps-post",
        label=f"AP = {average_precision(labels, scores):.3f}",
    )
    ax.axhline(
        y.mean() if y.size else 0.0, color="k", linestyle=":", linewidth=0.8, label="prevalence"
    )
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histogram(
    scores_by_group: dict[str, Sequence[float]],
    path: Path,
    threshold: float | None = None,
    title: str = "Score histogram",
) -> Path:
    """Score histograms per class (e.g. covid / normal / other disease), threshold marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bins = np.linspace(0.0, 1.0, 41)
    for name, values in scores_by_group.items():
        if len(values):
            ax.hist(np.asarray(values), bins=bins, alpha=0.5, label=f"{name} (n={len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="COVID-19 score", ylabel="images", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(
    curves: dict[str, list[tuple[float, float, int]]],
    path: Path,
    title: str = "Reliability (COVID-19)",
) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin,
    one line per named curve (e.g. raw and calibrated); marker area ~ images in the bin."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
    for name, rows in curves.items():
        xs = [m for m, _, _ in rows]
        ys = [f for _, f, _ in rows]
        sizes = [8 + 2 * c for _, _, c in rows]
        (line,) = ax.plot(xs, ys, marker="", label=name)
        ax.scatter(xs, ys, s=sizes, color=line.get_color(), alpha=0.6)
    ax.set(
        xlabel="mean predicted probability (bin)",
        ylabel="observed frequency",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
