"""Probability calibration of the COVID score: fit on validation, apply at run time.

The network's softmax COVID probability is a ranking score (class-weighted training moves it
far from a frequency). A strictly increasing map ``g`` turns it into a calibrated
probability; because ``g`` is strictly increasing, ``g(p) >= g(t)`` exactly when ``p >= t``,
so a threshold carried over as ``g(t)`` changes no call. Methods (chosen on validation by
cross-validated log loss): ``temperature`` (logit / T), ``platt`` (a * logit + b) and
``isotonic`` (pool-adjacent-violators, interpolated, blended with 0.1% of the raw score so it
stays strictly increasing). Pneumonia and normal keep the network's ratio and share what
COVID leaves (``1 - g(p)``): they are rescaled, not separately calibrated.

Pure numpy: this module is on the run-time path (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Method = Literal["identity", "temperature", "platt", "isotonic"]
METHODS: tuple[Method, ...] = ("temperature", "platt", "isotonic")
EPS = 1e-7
ISOTONIC_BLEND = 1e-3  # share of the raw score kept so the isotonic map is strictly increasing
COVID = 0  # index of COVID in the class vector (covid, pneumonia, normal)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass(frozen=True)
class Calibration:
    """A strictly increasing map of the COVID probability, with where it was fitted."""

    method: Method = "identity"
    params: dict[str, Any] = field(default_factory=dict)
    fitted_on: str = ""  # e.g. "validation split, 247 frontal images"

    def covid(self, p: np.ndarray | float) -> np.ndarray:
        """Calibrated COVID probability of raw COVID probabilities ``p``."""
        raw = np.asarray(p, dtype=np.float64)
        if self.method == "identity":
            return raw
        if self.method == "temperature":
            return _sigmoid(_logit(raw) / float(self.params["temperature"]))
        if self.method == "platt":
            return _sigmoid(float(self.params["a"]) * _logit(raw) + float(self.params["b"]))
        if self.method == "isotonic":
            xs = np.asarray(self.params["x"], dtype=np.float64)
            ys = np.asarray(self.params["y"], dtype=np.float64)
            blend = float(self.params.get("blend", ISOTONIC_BLEND))
            return (1.0 - blend) * np.interp(raw, xs, ys) + blend * raw
        raise ValueError(f"unknown calibration method {self.method!r}")

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrate class vectors (..., 3): COVID mapped, the other classes rescaled to share
        the rest in the network's ratio (so every vector still sums to 1)."""
        probs = np.asarray(probabilities, dtype=np.float64)
        if self.method == "identity":
            return probs
        raw = probs[..., COVID]
        cal = self.covid(raw)
        rest = np.clip(1.0 - raw, EPS, None)
        out = probs * ((1.0 - cal) / rest)[..., None]
        out[..., COVID] = cal
        return out

    @property
    def description(self) -> str:
        """One line for reports and JSONL consumers: what the probability is."""
        if self.method == "identity":
            return "uncalibrated network output (softmax)"
        if self.method == "temperature":
            what = f"temperature scaling (T={float(self.params['temperature']):.3g})"
        elif self.method == "platt":
            a, b = float(self.params["a"]), float(self.params["b"])
            what = f"Platt scaling (a={a:.3g}, b={b:.3g})"
        else:
            what = "isotonic regression"
        where = f" fitted on the {self.fitted_on}" if self.fitted_on else ""
        return (
            f"COVID-19 probability calibrated by {what}{where}; pneumonia and normal "
            "rescaled, not separately calibrated; frequencies of the training corpus, "
            "not of a clinical population"
        )

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "fitted_on": self.fitted_on}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Calibration:
        if not data:
            return cls()
        method = str(data.get("method", "identity"))
        if method not in ("identity", *METHODS):
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(method, dict(data.get("params", {})), str(data.get("fitted_on", "")))


IDENTITY = Calibration()


# ------------------------------------------------------------------------------------------
# Fitting (validation split only)


def _binary_labels(labels: np.ndarray | list[bool]) -> np.ndarray:
    return np.asarray(labels, dtype=np.float64)


def log_loss(labels: np.ndarray | list[bool], probs: np.ndarray) -> float:
    y = _binary_labels(labels)
    q = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def _fit_logistic(z: np.ndarray, y: np.ndarray, with_bias: bool) -> tuple[float, float]:
    """Newton's method on the log loss of sigmoid(a z + b) (b fixed at 0 without bias)."""
    a, b = 1.0, 0.0
    for _ in range(100):
        q = _sigmoid(a * z + b)
        r = q - y
        w = np.clip(q * (1.0 - q), 1e-12, None)
        ga, gb = float(np.dot(r, z)), float(r.sum())
        haa, hab, hbb = float(np.dot(w, z * z)), float(np.dot(w, z)), float(w.sum())
        haa += 1e-9
        if with_bias:
            det = haa * hbb - hab * hab + 1e-12
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        else:
            da, db = ga / haa, 0.0
        a, b = a - da, b - db
        if abs(da) < 1e-10 and abs(db) < 1e-10:
            break
    return a, b


def _pav(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: block centres (mean x) and strictly increasing block means.

    Equal scores are one block from the start: otherwise tied scores with mixed labels
    (saturated softmax outputs) were split or pooled by their order in the input, and the
    same data fitted a different curve."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.ravel(), weights=y, minlength=len(values))
    blocks: list[list[float]] = []  # [sum_y, count, sum_x]
    for value, sum_y, count in zip(values, sums, counts, strict=True):
        blocks.append([float(sum_y), float(count), float(value) * float(count)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            sy, n, sx = blocks.pop()
            blocks[-1][0] += sy
            blocks[-1][1] += n
            blocks[-1][2] += sx
    xs = np.array([b[2] / b[1] for b in blocks])
    ys = np.array([b[0] / b[1] for b in blocks])
    return xs, ys


def fit(method: Method, scores: np.ndarray, labels: np.ndarray | list[bool]) -> Calibration:
    """Fit one method on raw COVID probabilities and COVID labels."""
    p = np.asarray(scores, dtype=np.float64)
    y = _binary_labels(labels)
    if method == "identity":
        return IDENTITY
    if method == "temperature":
        a, _ = _fit_logistic(_logit(p), y, with_bias=False)
        if a <= 0:
            raise ValueError("temperature fit is not increasing: scores anti-correlated")
        return Calibration("temperature", {"temperature": 1.0 / a})
    if method == "platt":
        a, b = _fit_logistic(_logit(p), y, with_bias=True)
        if a <= 0:
            raise ValueError("Platt fit is not increasing: scores anti-correlated")
        return Calibration("platt", {"a": a, "b": b})
    if method == "isotonic":
        xs, ys = _pav(p, y)
        return Calibration(
            "isotonic",
            {"x": xs.tolist(), "y": ys.tolist(), "blend": ISOTONIC_BLEND},
        )
    raise ValueError(f"unknown calibration method {method!r}")


def cross_validated_log_loss(
    method: Method,
    scores: np.ndarray,
    labels: np.ndarray | list[bool],
    folds: int = 5,
    repeats: int = 20,
    seed: int = 0,
) -> float:
    """Mean held-out log loss of ``method`` over repeated, label-stratified k-fold splits of
    the validation split (fit on the other folds): an in-sample loss would always favour the
    most flexible method, and one k-fold split of ~250 images is too noisy to rank them."""
    p = np.asarray(scores, dtype=np.float64)
    y = _binary_labels(labels)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(repeats):
        fold = np.empty(len(p), dtype=int)
        for value in (0.0, 1.0):
            members = np.flatnonzero(y == value)
            fold[members] = (rng.permutation(len(members)) + int(rng.integers(folds))) % folds
        out = np.empty_like(p)
        for k in range(folds):
            held = fold == k
            out[held] = fit(method, p[~held], y[~held]).covid(p[held])
        losses.append(log_loss(y, out))
    return float(np.mean(losses))


def choose(
    scores: np.ndarray, labels: np.ndarray | list[bool], fitted_on: str, folds: int = 5
) -> tuple[Calibration, dict[str, float]]:
    """The method with the lowest cross-validated log loss, refitted on all of ``scores``."""
    losses: dict[str, float] = {
        m: cross_validated_log_loss(m, scores, labels, folds) for m in METHODS
    }
    losses["identity"] = log_loss(labels, np.asarray(scores, dtype=np.float64))
    best = min(METHODS, key=lambda m: losses[m])
    chosen = fit(best, scores, labels)
    return Calibration(chosen.method, chosen.params, fitted_on), losses


# ------------------------------------------------------------------------------------------
# Expected calibration error


def reliability(
    labels: np.ndarray | list[bool], probs: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int]]:
    """Per equal-width bin: (mean predicted probability, observed frequency, count)."""
    y = _binary_labels(labels)
    q = np.asarray(probs, dtype=np.float64)
    index = np.minimum((q * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            rows.append((float(q[sel].mean()), float(y[sel].mean()), int(sel.sum())))
    return rows


def ece(labels: np.ndarray | list[bool], probs: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: count-weighted |mean probability - frequency| over 10
    equal-width bins (Guo et al. 2017)."""
    rows = reliability(labels, probs, bins)
    n = sum(c for _, _, c in rows)
    return float(sum(c * abs(m - f) for m, f, c in rows) / n) if n else math.nan


def ece_interval(
    labels: np.ndarray | list[bool],
    probs: np.ndarray,
    *,
    bins: int = 10,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """ECE with a percentile bootstrap 95% interval (images resampled with replacement)."""
    y = _binary_labels(labels)
    q = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = [ece(y[i], q[i], bins) for i in rng.integers(0, len(q), size=(resamples, len(q)))]
    low, high = np.percentile(values, [2.5, 97.5])
    return ece(y, q, bins), float(low), float(high)


def ece_noise_floor(
    probs: np.ndarray, *, bins: int = 10, resamples: int = 1000, seed: int = 0
) -> float:
    """Mean ECE a perfectly calibrated model with these probabilities would measure on this
    many images (labels drawn from the probabilities): below it, a target is not testable."""
    q = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(rng.random(len(q)) < q, q, bins) for _ in range(resamples)]))
