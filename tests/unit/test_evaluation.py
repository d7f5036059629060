"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from screener import evaluation as ev


def test_wilson_interval_known_values() -> None:
    # Wilson 95% for 8/10: 0.4902 .. 0.9433 (standard reference value).
    p = ev.wilson_interval(8, 10)
    assert p.value == pytest.approx(0.8)
    assert p.low == pytest.approx(0.4902, abs=1e-4)
    assert p.high == pytest.approx(0.9433, abs=1e-4)
    full = ev.wilson_interval(20, 20)  # p = 1: the normal approximation would give [1, 1]
    assert full.high == 1.0 and full.low == pytest.approx(0.8389, abs=1e-4)
    assert math.isnan(ev.wilson_interval(0, 0).value)
    assert "n/a" in str(ev.wilson_interval(0, 0))


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    s = np.round(rng.random(60) + 0.3 * y, 1)  # coarse: many ties
    assert ev.roc_auc(y, s) == pytest.approx(_brute_auc(y, s))
    assert ev.roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert ev.roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert math.isnan(ev.roc_auc([True, True], [0.1, 0.9]))


def test_roc_curve_area_equals_auc() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    s = rng.random(200) + 0.5 * y
    fpr, tpr, thr = ev.roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(thr[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ev.roc_auc(y, s))


def test_average_precision_hand_computed() -> None:
    # ranking: P N P N -> precision at recall steps 1/1 and 2/3 -> AP = 0.5*1 + 0.5*2/3
    assert ev.average_precision([True, False, True, False], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(
        5 / 6
    )
    assert math.isnan(ev.average_precision([False, False], [0.1, 0.2]))


def test_confusion_and_threshold_table() -> None:
    y = [True, True, True, False, False, False, False]
    s = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.05]
    c = ev.confusion_at(y, s, 0.5)
    assert (c.tp, c.fn, c.fp, c.tn) == (2, 1, 1, 3)
    assert c.sensitivity.value == pytest.approx(2 / 3)
    assert c.specificity.value == pytest.approx(3 / 4)
    table = ev.threshold_table(y, s, thresholds=(0.0, 0.5, 1.0))
    assert [r.sensitivity.value for r in table] == [1.0, pytest.approx(2 / 3), 0.0]
    assert [r.specificity.value for r in table] == [0.0, 0.75, 1.0]


def test_threshold_for_sensitivity_is_the_highest_meeting_the_target() -> None:
    y = np.array([True] * 20 + [False] * 5)
    s = np.r_[np.linspace(0.05, 1.0, 20), np.full(5, 0.5)]
    t = ev.threshold_for_sensitivity(y, s, 0.95)
    assert ev.confusion_at(y, s, t).sensitivity.value >= 0.95
    # any higher threshold loses the target
    higher = np.nextafter(t, 2.0)
    assert ev.confusion_at(y, s, higher).sensitivity.value < 0.95
    assert ev.threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        ev.threshold_for_sensitivity([False], [0.3], 0.9)


def test_multiclass_confusion() -> None:
    m = ev.multiclass_confusion(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])
    assert m.tolist() == [[1, 1], [0, 1]]


def test_plots_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    y = rng.random(50) < 0.5
    s = np.clip(rng.random(50) * 0.7 + 0.3 * y, 0, 1)
    for path in (
        ev.plot_roc(y, s, tmp_path / "roc.png"),
        ev.plot_pr(y, s, tmp_path / "pr.png"),
        ev.plot_histogram({"covid": s[y], "other": s[~y]}, tmp_path / "hist.png", threshold=0.5),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
