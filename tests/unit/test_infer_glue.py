"""The infer stage's CPU glue takes short cuts that must give the same bits as the plain
computation they replace: the lung mask resized only around the lungs, the min/max lung box
from two reductions, the equalisation histogram counted by Pillow, the CAM's lung share
without a copy, the CAM's lung share without pasting it (to 1e-6: the pasted map sums in
float32), and the glue pool's chunked map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from screener.imaging import lung_box as boxes
from screener.imaging.lung_box import Box
from screener.imaging.preprocess import (
    BOX_RULE,
    equalize,
    lung_box,
    paste_back,
    resize,
    resized_at_least,
)
from screener.screening.cam import (
    bilinear_weights,
    heatmap_lung_fraction,
    linear_pieces,
    pasted_heat_lung_fraction,
)

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
    here = threading.current_thread().name
    try:
        for n in [0, 1, 2, 5, 32]:
            names: list[str] = []
            values = list(range(n))
            got = handler.map(
                lambda v, seen=names: (seen.append(threading.current_thread().name), v * v)[1],
                values,
            )
            assert got == [v * v for v in values]
            # one value is not worth a hand-off: the calling thread does it
            assert all(name == here if n == 1 else name.startswith("infer-glue") for name in names)
        with pytest.raises(ZeroDivisionError):
            handler.map(lambda v: 1 // v, [3, 2, 1, 0])
    finally:
        handler.pool.shutdown()

    handler.threads, handler.pool = 1, None  # one glue thread: no pool, the caller maps
    names = []
    negated = handler.map(lambda v: (names.append(threading.current_thread().name), -v)[1], [1, 2])
    assert negated == [-1, -2] and names == [here, here]


def test_the_windowed_mask_thresholds_what_resize_resizes_float32() -> None:
    rng = np.random.default_rng(13)
    lung = _blob(rng).astype(np.float64)
    lung[0:10, 0:10] = 0.49999999999  # below 0.5 in float64, 0.5 in float32; far from the lungs
    lung = lung[:, ::-1]  # not contiguous either
    assert np.array_equal(resized_at_least(lung, 512, 512, 0.5), resize(lung, 512, 512) >= 0.5)


def _pasted_share(heat: np.ndarray, box: Box | None, mask: np.ndarray) -> float | None:
    """The lung share as image_result computed it: of the CAM pasted onto the work grid."""
    cam = paste_back(heat, box, (mask.shape[0], mask.shape[1]))
    return heatmap_lung_fraction(cam, mask, nonnegative=not bool((heat < 0).any()))


def test_the_bilinear_weights_are_pillows() -> None:
    # by hand, from Resample.c: 2 -> 4 puts the outputs at 0.25, 0.75, 1.25, 1.75; the outer
    # ones reach one input only (its weight normalised to 1)
    assert np.array_equal(
        bilinear_weights(2, 4), [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    )
    assert np.array_equal(bilinear_weights(7, 7), np.eye(7))  # Pillow leaves the axis alone
    rng = np.random.default_rng(17)
    for _ in range(150):  # enlarging (the CAM) and shrinking, odd and even sizes
        n_in = (int(v) for v in rng.integers(1, 40, 2))
        rows_in, cols_in = n_in
        rows, cols = (int(v) for v in rng.integers(1, 700, 2))
        heat = rng.random((rows_in, cols_in), dtype=np.float32)
        got = bilinear_weights(rows_in, rows) @ heat @ bilinear_weights(cols_in, cols).T
        want = resize(heat, rows, cols)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert np.allclose(bilinear_weights(rows_in, rows).sum(axis=1), 1.0)


def test_enlarging_weights_are_linear_pieces_that_sum_exactly() -> None:
    for n_in, n_out in [(7, 8), (7, 224), (7, 287), (7, 430), (7, 512), (2, 4), (13, 600)]:
        pieces = linear_pieces(n_in, n_out)
        assert pieces is not None, (n_in, n_out)  # the CAM's squares take the fast path
        basis, slopes = pieces
        np.testing.assert_allclose(basis @ slopes, bilinear_weights(n_in, n_out), atol=1e-13)
        assert basis.dtype == np.float32 and basis.shape == (n_out, 2 * (n_in + 1))
    assert linear_pieces(7, 7) is None and linear_pieces(40, 30) is None  # not enlarging


def test_the_lung_share_by_hand() -> None:
    heat = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    # 2 x 2 -> 4 x 4 (raw scheme): the map is outer(r, r), r = [1, 0.75, 0.25, 0]: its mass
    # is 2 * 2, inside the top-left 2 x 2 it is 1.75 * 1.75
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert pasted_heat_lung_fraction(heat, None, mask) == 0.765625
    # the square one pixel up and left of a 3 x 3 image: rows and columns 1..3 of it show,
    # r = [0.75, 0.25, 0] there: mass 1, and 0.75 * 0.75 at the image's first pixel
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = True
    assert pasted_heat_lung_fraction(heat, Box(-1, -1, 4), mask) == 0.5625
    for box in (None, Box(-1, -1, 4)):
        want = _pasted_share(heat, box, mask)
        assert want is not None
        assert pasted_heat_lung_fraction(heat, box, mask) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("shape", [(512, 512), (512, 410), (410, 512), (512, 300)])
def test_the_lung_share_without_the_pasted_map_is_the_pasted_maps(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    rows, cols = shape
    for trial in range(40):
        mask = resize(_blob(rng), rows, cols) >= 0.5
        heat = rng.random((7, 7), dtype=np.float32)
        if trial % 4 == 0:
            heat[heat < 0.7] = 0.0  # most of the map without heat, as after clip(cam, 0)
        if trial % 5 == 0:
            box = None  # the raw scheme: the whole image
        else:  # squares inside, and past any edge of the image
            size = int(rng.integers(100, 600))
            box = Box(
                int(rng.integers(-size // 2, rows - size // 3)),
                int(rng.integers(-size // 2, cols - size // 3)),
                size,
            )
        want = _pasted_share(heat, box, mask)
        got = pasted_heat_lung_fraction(heat, box, mask)
        assert want is not None and got is not None
        assert got == pytest.approx(want, abs=1e-6), (trial, box)
        empty = np.zeros(shape, dtype=bool)  # no lung pixel: nothing inside
        assert pasted_heat_lung_fraction(heat, box, empty) == _pasted_share(heat, box, empty)
        assert pasted_heat_lung_fraction(heat, box, empty) == 0.0


def test_the_lung_share_of_a_shrunk_heat_is_the_pasted_maps() -> None:
    rng = np.random.default_rng(29)
    for trial in range(20):  # a map larger than where it goes: weighed with the weights
        heat = rng.random((int(rng.integers(20, 64)), int(rng.integers(20, 64))), np.float32)
        mask = rng.random((40, 33)) > 0.5
        box = None if trial % 2 else Box(int(rng.integers(-8, 20)), int(rng.integers(-8, 20)), 30)
        want = _pasted_share(heat, box, mask)
        assert want is not None
        assert pasted_heat_lung_fraction(heat, box, mask) == pytest.approx(want, abs=1e-6)


def test_the_lung_share_of_odd_heat_is_the_pasted_maps() -> None:
    rng = np.random.default_rng(23)
    mask = resize(_blob(rng), 512, 410) >= 0.5
    box = Box(-20, 30, 450)
    zero = np.zeros((7, 7), dtype=np.float32)
    assert pasted_heat_lung_fraction(zero, box, mask) is None
    assert pasted_heat_lung_fraction(zero, None, mask) is None
    assert _pasted_share(zero, box, mask) is None
    heat = rng.random((7, 7), dtype=np.float32)
    assert pasted_heat_lung_fraction(heat, Box(600, 0, 100), mask) is None  # off the image
    assert _pasted_share(heat, Box(600, 0, 100), mask) is None
    negative = heat - np.float32(0.5)
    with_nan = heat.copy()
    with_nan[3, 3] = np.nan
    faint = heat * np.float32(1e-30)
    # what the shortcut does not take (below zero, NaN, too faint): the pasted map's bits
    for odd in (negative, with_nan, faint, heat.astype(np.float64)):
        for where in (box, None):
            want = _pasted_share(odd, where, mask)
            got = pasted_heat_lung_fraction(odd, where, mask)
            if odd is with_nan:
                assert want is not None and got is not None and np.isnan(want) and np.isnan(got)
            elif odd is negative or odd is faint:
                assert got == want
            else:
                assert got == pytest.approx(want, abs=1e-6)


def test_the_lung_share_of_real_cams_is_the_pasted_maps(cxr_dir: Path, tmp_path: Path) -> None:
    """The shipped models on corpus films (square, portrait, landscape): image_result's
    share is the pasted CAM's, for the crop square and for the whole image."""
    from screener.results import ThresholdInfo
    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import prepare_instance
    from screener.settings import Settings
    from screener.testing.dicom_factory import (
        StudyIdentity,
        corpus_image,
        make_instance,
        pick_images,
        write_datasets,
    )
    from tests.workers_support import require_models

    require_models()
    settings = Settings()
    models = ScreeningModels.from_settings(settings)
    picked = pick_images(cxr_dir, 2, split="test", view="PA")
    picked += pick_images(cxr_dir, 1, split="test", view="AP")
    checked = 0
    for index, (row, size) in enumerate(
        zip(picked, [(2048, 2048), (2048, 1640), (1640, 2048)], strict=True)
    ):
        ds = make_instance(
            corpus_image(cxr_dir, row["id"]),
            study=StudyIdentity.new(),
            view_position=row["view"],
            target_size=size,
        )
        [path] = write_datasets([ds], tmp_path / f"dicom-{index}")
        image = prepare_instance(path, settings)
        seg, _ = models.segment([image])
        plan = models.plan(image, float(seg["lateral_probability"][0]), seg["lung_probability"][0])
        assert plan.classifier_input is not None and plan.work_mask is not None
        out, _ = models.classify(plan.classifier_input[None])
        heat = out["heat"][0]
        result = models.image_result(image, plan, ThresholdInfo(0.5), out["probabilities"][0], heat)
        for box in (plan.box, None):
            want = _pasted_share(heat, box, plan.work_mask)
            assert want is not None
            got = pasted_heat_lung_fraction(heat, box, plan.work_mask)
            assert got == pytest.approx(want, abs=1e-6), (row["id"], box)
            if box is plan.box:
                assert result.heatmap_lung_fraction == got
        checked += 1
    assert checked == 3


# The lung mask resized only where the map crosses 0.5 (resized_at_least): every output whose
# window of inputs is all at least 0.5, or all below, is decided without the resize; the
# ring between is computed with Pillow's arithmetic. Checked bit for bit against Pillow.
RING_SHAPES = [(512, 512), (512, 410), (410, 512), (300, 512), (513, 511)]
BELOW = np.nextafter(np.float32(0.5), np.float32(0))
ABOVE = np.nextafter(np.float32(0.5), np.float32(1))
NEAR_HALF = np.array(
    [np.nextafter(BELOW, np.float32(0)), BELOW, np.float32(0.5), ABOVE, np.nextafter(ABOVE, 1)],
    dtype=np.float32,
)


def _near_half(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """``lung`` with pixels snapped to 0.5 and the float32 values next to it: most of those
    near its 0.5 rim, a few anywhere, sometimes a whole band at exactly 0.5."""
    lung = lung.copy()
    near = np.abs(lung - 0.5) < rng.uniform(0.002, 0.05)
    snap = (near & (rng.random(lung.shape) < rng.uniform(0.2, 1.0))) | (
        rng.random(lung.shape) < 0.002
    )
    lung[snap] = rng.choice(NEAR_HALF, int(snap.sum()))
    if rng.random() < 0.2:
        lung[near] = np.float32(0.5)
    return lung


def _wobbly(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A smooth random map around 0.5 (a few bumps, enlarged): many crossings of 0.5."""
    coarse = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6))), dtype=np.float32)
    return resize(coarse, rows, cols)


def _check_against_pillow(values: np.ndarray, shape: tuple[int, int], note: object) -> None:
    want = resize(values, *shape) >= 0.5
    got = resized_at_least(values, *shape, 0.5)
    assert got.shape == want.shape and got.dtype == bool, note
    assert np.array_equal(got, want), (note, shape, int((got != want).sum()))


@pytest.mark.parametrize("shape", RING_SHAPES)
def test_the_ring_mask_of_lung_like_maps_near_the_level_is_pillows(
    shape: tuple[int, int],
) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for trial in range(60):
        lung = _blob(rng) if trial % 3 else _wobbly(rng, 224, 224)
        _check_against_pillow(_near_half(rng, lung), shape, trial)


def test_the_ring_mask_of_small_maps_near_the_level_is_pillows() -> None:
    """Thousands of small maps, enlarged by odd factors, one axis kept or shrunk at times
    (that axis: Pillow leaves it alone, or the whole-resize fallback)."""
    rng = np.random.default_rng(41)
    for trial in range(3000):
        rows, cols = (int(v) for v in rng.integers(1, 40, 2))
        values = _near_half(rng, _wobbly(rng, rows, cols))
        shape = [int(rng.integers(n, 3 * n + 8)) for n in (rows, cols)]
        if trial % 10 == 0:
            shape[trial % 20 // 10] = (rows, cols)[trial % 20 // 10]  # one axis kept
        elif trial % 25 == 1:
            shape[0] = max(1, rows - int(rng.integers(1, 5)))  # shrunk: the fallback
        _check_against_pillow(values, (shape[0], shape[1]), trial)


def test_the_ring_mask_at_and_next_to_the_level_everywhere() -> None:
    """Maps made only of 0.5 and its float32 neighbours (every window in doubt), and flat
    maps at each of them (no window in doubt)."""
    rng = np.random.default_rng(43)
    for trial in range(40):
        values = rng.choice(NEAR_HALF[1:4], (int(rng.integers(8, 60)), int(rng.integers(8, 60))))
        for shape in [(512, 512), (513, 511), (2 * values.shape[0] + 1, 3 * values.shape[1])]:
            _check_against_pillow(values, shape, trial)
    for level in NEAR_HALF:
        flat = np.full((224, 224), level, dtype=np.float32)
        for shape in RING_SHAPES:
            _check_against_pillow(flat, shape, level)


def test_the_ring_mask_with_nan_and_infinities_is_pillows() -> None:
    rng = np.random.default_rng(47)
    for trial in range(60):
        lung = _near_half(rng, _blob(rng))
        odd = [np.nan, np.inf, -np.inf, np.float32(3.4e38), np.float32(-3.4e38)][trial % 5]
        where = rng.random(lung.shape) < rng.choice([1e-4, 1e-3, 0.05])
        if trial % 7 == 0:  # next to the lungs' rim, where the ring is
            where |= (np.abs(lung - 0.5) < 0.01) & (rng.random(lung.shape) < 0.1)
        lung[where] = odd
        for shape in RING_SHAPES[trial % 5 :: 2]:
            _check_against_pillow(lung, shape, (trial, odd))


def test_the_ring_mask_computes_pillows_values() -> None:
    """The ring's values are Pillow's bit for bit (computed here for every output), and the
    taps are Pillow's weights (screener.screening.cam.bilinear_weights)."""
    from screener.imaging.preprocess import _bilinear_taps, _pillow_windows

    rng = np.random.default_rng(53)
    for trial, (n_in, shape) in enumerate(
        [((224, 224), s) for s in RING_SHAPES] + [((224, 224), (224, 512)), ((37, 23), (80, 23))]
    ):
        values = rng.random(n_in, dtype=np.float32) * np.float32(10 ** (trial % 4 - 1))
        ys, xs = _bilinear_taps(n_in[0], shape[0]), _bilinear_taps(n_in[1], shape[1])
        assert ys is not None and xs is not None
        ty, tx = (v.ravel() for v in np.indices((ys.head.size, xs.head.size)))
        got = np.zeros(shape, dtype=np.float32)
        at = ys.outputs.take(ty, axis=1)[:, None] * shape[1] + xs.outputs.take(tx, axis=1)
        got.reshape(-1)[at] = _pillow_windows(values, ys, xs, ty, tx)
        assert np.array_equal(got.view(np.uint32), resize(values, *shape).view(np.uint32))
        for taps, n, m in ((ys, n_in[0], shape[0]), (xs, n_in[1], shape[1])):
            dense = np.zeros((m, n))
            outputs = taps.outputs
            np.add.at(dense, (outputs, taps.head[None].repeat(len(outputs), 0)), taps.first)
            np.add.at(dense, (outputs, taps.tail[None].repeat(len(outputs), 0)), taps.second)
            dense /= np.bincount(outputs.ravel(), minlength=m)[:, None]  # repeated outputs
            if taps.paired:
                assert np.array_equal(dense, bilinear_weights(n, m)), (n, m)
    assert _bilinear_taps(300, 224) is None  # shrinking: Pillow resizes


def test_the_ring_mask_of_real_segmenter_outputs_is_pillows(cxr_dir: Path) -> None:
    """The shipped segmenter's lung probability for corpus films (PA and AP), resized to
    each film's own work shape and to the ring shapes."""
    from screener.imaging.preprocess import segmenter_input
    from screener.results import SourceImageRef
    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import PreparedImage, work_image
    from screener.settings import Settings
    from screener.testing.dicom_factory import corpus_image, pick_images
    from tests.workers_support import require_models

    require_models()
    models = ScreeningModels.from_settings(Settings())
    rows = pick_images(cxr_dir, 12, split="test", view="PA")
    rows += pick_images(cxr_dir, 6, split="test", view="AP")
    works = [work_image(corpus_image(cxr_dir, row["id"])) for row in rows]
    images = [
        PreparedImage(SourceImageRef("1", "2", "3", "4"), network_input=segmenter_input(work))
        for work in works
    ]
    seg, _ = models.segment(images)
    lungs = seg["lung_probability"]
    assert lungs.shape == (len(rows), 224, 224) and lungs.dtype == np.float32
    for row, work, lung in zip(rows, works, lungs, strict=True):
        assert 0.05 < float((lung >= 0.5).mean()) < 0.8, row["id"]  # lungs, and a rim
        for shape in [work.shape, *RING_SHAPES]:
            _check_against_pillow(lung, (int(shape[0]), int(shape[1])), row["id"])


def test_the_ring_mask_at_other_levels_is_pillows() -> None:
    """Levels that float32 holds take the ring (negative ones too); others (0.3, 0, NaN)
    the whole-resize fallback: all give Pillow's answer."""
    rng = np.random.default_rng(59)
    for trial in range(200):
        rows, cols = (int(v) for v in rng.integers(2, 40, 2))
        values = _wobbly(rng, rows, cols) * np.float32(4) - np.float32(2)
        level = float([0.25, 0.75, -1.5, 1e-3, 0.3, 0.0, np.float32(1e-3)][trial % 7])
        below = np.nextafter(np.float32(level), np.float32(-np.inf))
        values[rng.random(values.shape) < 0.1] = rng.choice([np.float32(level), below])
        shape = (int(rng.integers(rows, 3 * rows + 8)), int(rng.integers(cols, 3 * cols + 8)))
        want = resize(values, *shape) >= level
        assert np.array_equal(resized_at_least(values, *shape, level), want), (trial, level)
    nan = resized_at_least(_blob(rng), 512, 512, float("nan"))
    assert nan.shape == (512, 512) and not nan.any()
