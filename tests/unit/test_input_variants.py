"""The pure parts of engines.training.input_variants and the model-card section it feeds.

No engine runs over the corpus here: synthetic arrays and a stand-in classifier."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from engines.calibration import Calibration
from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest
from engines.model_card import _input_variants_section, render_model_card
from engines.training.box_stability import crop_scheme_input
from engines.training.input_variants import (
    COVID,
    VARIANTS,
    Film,
    average_probabilities,
    crop_squares,
    equalize_continuous,
    score_film,
    tta_shifts,
    variant_inputs,
)
from engines.training.robustness import change_stats
from screener.imaging.lung_box import Box
from screener.imaging.preprocess import NET_SIZE, equalize, lung_box, scheme_input

RNG = np.random.default_rng(7)


# -- continuous histogram equalisation ------------------------------------------------------


@pytest.mark.parametrize("bins", [16, 256, 4096])
def test_continuous_equalisation_is_monotone_and_maps_into_unit_range(bins: int) -> None:
    x = RNG.beta(2.0, 5.0, size=(60, 70)).astype(np.float32)
    out = equalize_continuous(x, bins)
    assert out.shape == x.shape and out.dtype == np.float32
    hist = np.histogram(x, bins=bins, range=(0.0, 1.0))[0]
    first, last = hist[np.flatnonzero(hist)[[0, -1]]]
    assert out.min() == 0.0 and 1.0 - last / (x.size - first) - 1e-6 <= out.max() <= 1.0
    order = np.argsort(x, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0.0)


@pytest.mark.parametrize("bins", [64, 4096])
def test_continuous_equalisation_is_the_rank_fraction_within_one_bin(bins: int) -> None:
    """Distinct values map to (rank - lowest bin's count) / (n - that count), clipped at 0,
    up to the count of the value's own bin (the CDF is interpolated inside each bin)."""
    x = RNG.permutation(np.linspace(0.01, 0.97, 5000) ** 2)
    out = equalize_continuous(x, bins).astype(np.float64)
    hist, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
    first = hist[np.flatnonzero(hist)[0]]
    rank = np.argsort(np.argsort(x)) + 1.0  # number of values <= x (distinct values)
    expected = np.clip((rank - first) / (len(x) - first), 0.0, 1.0)
    own_bin = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    tolerance = hist[own_bin] / (len(x) - first) + 1e-6
    assert np.all(np.abs(out - expected) <= tolerance)


def test_continuous_equalisation_keeps_the_order_inside_one_8_bit_level() -> None:
    """What the uint8 path loses: values that round to the same level stay apart."""
    x = np.concatenate([RNG.uniform(0.0, 1.0, 2000), 0.5 + np.arange(1, 8) * 2e-5])
    level = np.rint(x[-7:] * 255.0)
    assert len(set(level)) == 1
    out = equalize_continuous(x)[-7:]
    assert np.all(np.diff(out) > 0.0)
    assert len(set(equalize((x * 255.0 + 0.5).astype(np.uint8))[-7:])) == 1


@pytest.mark.parametrize("x", [np.full((5, 5), 0.3), np.zeros((0,)), np.full((3,), 7.0)])
def test_continuous_equalisation_of_a_flat_or_empty_image_is_black(x: np.ndarray) -> None:
    out = equalize_continuous(x)
    assert out.shape == x.shape and not np.any(out)


# -- test-time averaging ------------------------------------------------------------------


@pytest.mark.parametrize(("side", "step"), [(640, 10), (128, 2), (127, 1), (64, 1), (20, 1)])
def test_tta_shifts(side: int, step: int) -> None:
    shifts = tta_shifts(side)
    assert shifts == [(0, 0), (-step, 0), (step, 0), (0, -step), (0, step)]


def test_crop_squares_move_the_square_by_the_tta_shifts_only() -> None:
    box = Box(top=12, left=-3, size=300)
    assert crop_squares(box, 1) == [box]
    squares = crop_squares(box, 5)
    assert {b.size for b in squares} == {300}
    offsets = [(b.top - box.top, b.left - box.left) for b in squares]
    assert offsets == tta_shifts(300)
    with pytest.raises(ValueError):
        crop_squares(box, 3)


def test_average_probabilities_is_the_mean_class_vector() -> None:
    p = RNG.dirichlet([1.0, 1.0, 1.0], size=5)
    mean = average_probabilities(p)
    assert mean.shape == (3,)
    assert np.allclose(mean, p.sum(axis=0) / 5) and np.isclose(mean.sum(), 1.0)
    assert np.array_equal(average_probabilities(p[:1]), p[0])


def test_change_stats() -> None:
    ref = np.array([0.10, 0.20, 0.50, 0.12])
    copy = np.array([0.15, 0.10, 0.50, 0.11])
    s = change_stats(ref, copy, threshold=0.12)
    assert s["n"] == 4
    assert s["mean_abs_delta"] == pytest.approx(0.16 / 4)
    assert s["max_abs_delta"] == pytest.approx(0.10)
    assert s["p95_abs_delta"] == pytest.approx(np.percentile([0.05, 0.1, 0.0, 0.01], 95))
    assert s["flips"] == 3  # 0.10 -> 0.15 up, 0.20 -> 0.10 down, 0.12 (positive) -> 0.11


# -- which square and which path each variant uses ------------------------------------------


def _film(shift: int = 0) -> tuple[Film, np.ndarray]:
    work = RNG.integers(0, 256, size=(300, 260), dtype=np.uint8)
    mask = np.zeros(work.shape, dtype=bool)
    mask[40 + shift : 250 + shift, 30:220] = True
    box = lung_box(mask)
    assert box is not None
    float_box = Box(top=box.top + 2, left=box.left - 1, size=box.size + 3)
    return Film(work, work.astype(np.float32) / 255.0, box, float_box), mask


def test_variants_cut_the_squares_their_descriptions_name() -> None:
    film, mask = _film()
    ref, _ = _film(shift=5)
    by_key = {v.key: v for v in VARIANTS}
    assert [v.key for v in VARIANTS if v.shipped] == ["A"]
    # A is the shipped crop input, bit for bit
    (a,) = variant_inputs(by_key["A"], film, ref)
    assert np.array_equal(a, scheme_input(film.work_uint8, mask, "crop")[0])
    (b,) = variant_inputs(by_key["B"], film, ref)
    assert np.array_equal(b, crop_scheme_input(film.work_uint8, ref.box_uint8))
    (f,) = variant_inputs(by_key["F"], film, ref)
    (g,) = variant_inputs(by_key["G"], film, ref)
    (d,) = variant_inputs(by_key["D"], film, ref)
    own_float = equalize_continuous(
        np.asarray(_resized_crop(film.work_float, film.box_float), dtype=np.float32)
    )[None]
    assert np.array_equal(f, own_float)
    assert not np.array_equal(f, g) and not np.array_equal(f, d)
    for key in "FGD":
        assert variant_inputs(by_key[key], film, film)[0].dtype == np.float32
    t = variant_inputs(by_key["T"], film, ref)
    u = variant_inputs(by_key["U"], film, ref)
    assert len(t) == len(u) == 5
    assert np.array_equal(t[0], f) and np.array_equal(u[0], a)
    for x in (*t, *u):
        assert x.shape == (1, NET_SIZE, NET_SIZE) and 0.0 <= x.min() and x.max() <= 1.0


def _resized_crop(work: np.ndarray, box: Box) -> np.ndarray:
    from screener.imaging.preprocess import crop, resize

    return resize(crop(work, box), NET_SIZE, NET_SIZE)


class _PatchClassifier:
    """Stand-in engine: a class vector from the mean grey of the input's top-left corner
    (which a shifted crop changes), batch by batch."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(len(batch))
        m = batch[:, 0, :8, :8].reshape(len(batch), -1).mean(axis=1)
        p = np.stack([m, 1.0 - m, np.full_like(m, 0.5)], axis=1)
        return {"probabilities": (p / p.sum(axis=1, keepdims=True)).astype(np.float32)}


def test_score_film_averages_the_tta_crops_before_calibrating() -> None:
    film, _ = _film()
    ref, _ = _film(shift=5)
    platt = Calibration("platt", {"a": 3.0, "b": -0.4})
    engine = _PatchClassifier()
    scores = score_film(film, ref, engine, platt, max_batch=4)
    total = sum(v.crops for v in VARIANTS)
    assert sum(engine.batches) == total and max(engine.batches) <= 4
    assert set(scores) == {v.key for v in VARIANTS}
    for v in VARIANTS:
        raw = _PatchClassifier().infer(np.stack(variant_inputs(v, film, ref)))["probabilities"]
        expected = platt.apply(raw.astype(np.float64).mean(axis=0))
        assert np.allclose(scores[v.key], expected, atol=1e-6)
    tta = next(v for v in VARIANTS if v.key == "T")
    raw = _PatchClassifier().infer(np.stack(variant_inputs(tta, film, ref)))["probabilities"]
    mean_of_calibrated = platt.apply(raw.astype(np.float64)).mean(axis=0)[COVID]
    assert not np.isclose(scores["T"][COVID], mean_of_calibrated, atol=1e-9)


# -- the model-card section -----------------------------------------------------------------


def _block(mean: float = 0.03, flips: int = 4) -> dict[str, Any]:
    def copies(scale: float) -> dict[str, Any]:
        return {
            name: {
                "n": 10,
                "mean_abs_delta": mean * scale,
                "p95_abs_delta": 3 * mean * scale,
                "max_abs_delta": 5 * mean * scale,
                "flips": flips,
            }
            for name in ("jpeg2000_10to1", "jpeg_baseline_q90")
        }

    variants = {}
    for k, v in enumerate(VARIANTS):
        variants[v.key] = {
            "description": v.description,
            "precision": v.precision,
            "square": v.square,
            "crops": v.crops,
            "shipped": v.shipped,
            "n": 10,
            "covid_vs_rest_auc": 0.9,
            "ieee8023_covid_vs_other_auc": 0.7,
            "nih_pneumonia_vs_normal_auc": 0.8,
            "copies": copies(1.0 + 0.1 * k),
        }
    return {
        "split": "val",
        "scheme": "crop",
        "n": 10,
        "threshold": 0.1237,
        "target_mean_abs_delta": 0.02,
        "equalization_bins": 4096,
        "shift_divisor": 64,
        "variants": variants,
    }


def test_no_block_no_section() -> None:
    assert _input_variants_section({}) == []
    metrics = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())
    metrics.pop("input_variants", None)
    card = render_model_card(metrics, shipped=list(load_manifest().schemes))
    assert "## Where the change under compression comes from" not in card


def test_section_states_every_variant_and_the_verdict_from_the_numbers() -> None:
    text = "\n".join(_input_variants_section({"input_variants": _block()}))
    assert "## Where the change under compression comes from (validation split)" in text
    for v in VARIANTS:
        assert f"| `{v.key}`" in text
    assert "| `A` (shipped) |" in text
    assert "0.0300 / 0.0900 / 0.1500 (4)" in text
    assert "**No variant reaches the target**" in text
    assert "lowest mean change is 0.0300 (`A`)" in text
    assert "`B` +10% / +10%" in text  # against the shipped path, per copy
    assert "multiply the classifier's cost per film by 5" in text


def test_section_changes_when_a_number_changes() -> None:
    block = _block()
    before = _input_variants_section({"input_variants": block})
    block["variants"]["D"]["copies"]["jpeg_baseline_q90"]["max_abs_delta"] += 0.001
    assert _input_variants_section({"input_variants": block}) != before


def test_a_variant_that_meets_the_target_is_named_and_not_called_a_failure() -> None:
    block = _block()
    for c in block["variants"]["U"]["copies"].values():
        c["mean_abs_delta"], c["flips"] = 0.015, 0
    text = "\n".join(_input_variants_section({"input_variants": block}))
    assert "**`U` reached the target on validation**" in text
    assert "No variant reaches" not in text and "responds to the" not in text
    # flips alone keep a variant out
    block["variants"]["U"]["copies"]["jpeg2000_10to1"]["flips"] = 1
    assert "**No variant reaches the target**" in "\n".join(
        _input_variants_section({"input_variants": block})
    )
