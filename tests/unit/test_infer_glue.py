"""The infer stage's CPU glue takes short cuts that must give the same bits as the plain
computation they replace: the lung mask resized only around the lungs, the min/max lung box
from two reductions, the equalisation histogram counted by Pillow, the CAM's lung share
without a copy, and the glue pool's chunked map."""

from __future__ import annotations

import numpy as np
import pytest

from screener.imaging import lung_box as boxes
from screener.imaging.preprocess import (
    BOX_RULE,
    equalize,
    lung_box,
    resize,
    resized_at_least,
)
from screener.screening.cam import heatmap_lung_fraction

SHAPES = [(512, 512), (512, 419), (419, 512), (448, 512), (512, 224), (100, 512), (224, 224)]


def _blob(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A lung-like probability map: two soft ellipses, values near 0.5 at their rims."""
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.35)
    a, b = rng.uniform(0.15, 0.3), rng.uniform(0.08, 0.15)
    left = 1 - ((y - cy) / a) ** 2 - ((x - cx) / b) ** 2
    right = 1 - ((y - cy) / a) ** 2 - ((x - 1 + cx) / b) ** 2
    return (1 / (1 + np.exp(-8 * np.maximum(left, right)))).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_lung_mask_resized_around_the_lungs_is_the_whole_resize_s(
    shape: tuple[int, int],
) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(8):
        lung = _blob(rng)
        assert np.array_equal(resized_at_least(lung, *shape, 0.5), resize(lung, *shape) >= 0.5)


def test_the_windowed_mask_holds_at_the_threshold_and_for_odd_values() -> None:
    rng = np.random.default_rng(7)
    below = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(16, 240, 2))
        values = rng.random((h, w), dtype=np.float32)
        kind = trial % 4
        if kind == 0:  # exactly at and just below the level
            values = np.where(rng.random((h, w)) > 0.9, np.float32(0.5), below)
        elif kind == 1:  # NaN and infinities
            values[rng.random((h, w)) > 0.97] = np.nan
            values[rng.random((h, w)) > 0.99] = np.inf
            values[rng.random((h, w)) > 0.99] = -np.inf
        elif kind == 2:  # nothing reaches the level
            values *= np.float32(0.49)
        for shape in [(512, 512), (2 * h, 4 * w), (h + 5, 512), (max(1, h // 2), 3 * w)]:
            got = resized_at_least(values, *shape, 0.5)
            assert np.array_equal(got, resize(values, *shape) >= 0.5), (trial, shape)


def _box_by_sums(mask: np.ndarray) -> boxes.Box | None:
    """The min/max lung box as it was computed: extents from the row and column sums."""
    mask = mask.astype(bool)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.sum(axis=1)), np.flatnonzero(mask.sum(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    side = int(max(bottom - top + 1, right - left + 1))
    cy, cx = (top + bottom + 1) / 2.0, (left + right + 1) / 2.0
    return boxes.Box(top=int(round(cy - side / 2.0)), left=int(round(cx - side / 2.0)), size=side)


def test_the_min_max_lung_box_reads_extents_as_the_sums_did() -> None:
    assert BOX_RULE == boxes.BoxRule()  # the min/max rule: extents by ``any``
    rng = np.random.default_rng(3)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((h, w)) > rng.uniform(0.5, 1.0)
        if trial % 5 == 0:
            mask[:] = False
        assert lung_box(mask) == _box_by_sums(mask), trial
        assert lung_box(mask.astype(np.uint8)) == _box_by_sums(mask), trial
    mask = resize(_blob(rng), 512, 419) >= 0.5
    assert lung_box(mask) == _box_by_sums(mask)


def _equalize_bincount(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The histogram equalisation as it was written with np.bincount."""
    values = image[mask] if mask is not None else image.ravel()
    if values.size == 0:
        return np.zeros_like(image)
    hist = np.bincount(values, minlength=256).astype(np.float64)
    cdf = np.cumsum(hist)
    cdf_min = cdf[hist > 0][0]
    denom = max(cdf[-1] - cdf_min, 1.0)
    lut = np.clip(np.rint((cdf - cdf_min) / denom * 255.0), 0, 255).astype(np.uint8)
    out = lut[image]
    if mask is not None:
        out = np.where(mask, out, 0).astype(np.uint8)
    return out


def test_equalize_counts_with_pillow_as_with_bincount() -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        image = rng.integers(0, 256, (224, 224), dtype=np.uint8)
        if trial % 3 == 0:
            image = (image // 16).astype(np.uint8)  # few grey levels
        mask = rng.random((224, 224)) > rng.uniform(0.0, 1.0)
        if trial % 7 == 0:
            mask[:] = False
        view = image[::2, 1::2]  # not contiguous
        for args in [(image,), (image, mask), (view,), (view, mask[::2, 1::2])]:
            got, want = equalize(*args), _equalize_bincount(*args)
            assert got.dtype == want.dtype and np.array_equal(got, want), trial


def test_the_lung_share_of_a_nonnegative_cam_is_the_clipped_one_s() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        heat = rng.random((7, 7), dtype=np.float32)
        cam = np.zeros((512, 512), dtype=np.float32)
        cam[40:470, 30:460] = resize(heat, 430, 430)
        mask = resize(_blob(rng), 512, 512) >= 0.5
        clipped = np.clip(cam, 0.0, None)
        want = float(clipped[mask].sum() / float(clipped.sum()))
        got = heatmap_lung_fraction(cam, mask, nonnegative=True)
        assert got is not None and np.float64(got).tobytes() == np.float64(want).tobytes()
        assert heatmap_lung_fraction(cam, mask) == got
    assert heatmap_lung_fraction(np.zeros((4, 4), np.float32), np.ones((4, 4), bool)) is None


def test_the_glue_pool_maps_in_order_in_one_task_per_thread() -> None:
    import threading

    from workers.infer_stage import ScreeningHandler

    handler = ScreeningHandler.__new__(ScreeningHandler)
    from concurrent.futures import ThreadPoolExecutor

    handler.threads = 3
    handler.pool = ThreadPoolExecutor(3, thread_name_prefix="infer-glue")
    try:
        names: list[str] = []
        for n in [0, 1, 2, 5, 32]:
            values = list(range(n))
            got = handler.map(
                lambda v: (names.append(threading.current_thread().name), v * v)[1], values
            )
            assert got == [v * v for v in values]
        assert all(name.startswith("infer-glue") for name in names)
        with pytest.raises(ZeroDivisionError):
            handler.map(lambda v: 1 // v, [3, 2, 1, 0])
    finally:
        handler.pool.shutdown()


def test_the_windowed_mask_thresholds_what_resize_resizes_float32() -> None:
    rng = np.random.default_rng(13)
    lung = _blob(rng).astype(np.float64)
    lung[0:10, 0:10] = 0.49999999999  # below 0.5 in float64, 0.5 in float32; far from the lungs
    lung = lung[:, ::-1]  # not contiguous either
    assert np.array_equal(resized_at_least(lung, 512, 512, 0.5), resize(lung, 512, 512) >= 0.5)
