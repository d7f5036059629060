"""Heat-map post-processing, numpy only: the CAM's share inside the lungs, the maps at the
networks' grid brought to any grid the reports draw on, and the geometry of the
occlusion-sensitivity alternative (the engine calls themselves are in :mod:`.models`).

The maps are brought *straight* from the networks' grid (:class:`~screener.results.
ResultGrid`) to the grid where they are used, in one resize each: the heatmap draws the CAM
at a coarse grid and the lungs at film size (:mod:`screener.reports.heatmap`), never from a
display-size copy made first (:func:`expand_to_display` is for the consumers that want
display-size arrays: the parametric map, the PNG fallback)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from screener.imaging.preprocess import Box, bilinear_coefficients, paste_back, resize, to_uint8
from screener.results import ImageResult, ResultGrid

OCCLUSION_PATCH = 56
OCCLUSION_STRIDE = 28

# uint8 level -> [0, 1]; float16 holds k / 255 closely enough that rint(x * 255) == k
_UNIT_FLOATS = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float16)

Window = tuple[int, int, int, int]  # top, left, bottom, right (exclusive) on a target grid


def heatmap_lung_fraction(
    cam: np.ndarray, lung_mask: np.ndarray, *, nonnegative: bool = False
) -> float | None:
    """Share of the positive CAM mass that lies inside the lung mask (None: no mass).

    ``nonnegative``: the caller knows ``cam`` holds no value below zero (a bilinear resize
    of a map that holds none), so clipping it would copy it unchanged. The pixels inside
    a boolean mask of the same shape are gathered by ``np.compress`` (the same values in
    the same order as ``cam[mask]``, so the same sum, in less than half the time)."""
    positive = cam if nonnegative else np.clip(cam, 0.0, None)
    total = float(positive.sum())
    if total <= 0.0:
        return None
    if lung_mask.dtype == bool and lung_mask.shape == positive.shape:
        inside = np.compress(lung_mask.ravel(), positive.ravel())
    else:
        inside = positive[lung_mask]
    return float(inside.sum() / total)


@lru_cache(maxsize=512)
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of Pillow's bilinear resize of ``n_in`` samples to
    ``n_out`` (:func:`~screener.imaging.preprocess.bilinear_coefficients`): a resize is
    ``Ry @ values @ Rx.T``, so sums of a resized map need not make it. Read-only."""
    first, count, weights = bilinear_coefficients(n_in, n_out)
    taps = np.arange(weights.shape[1])
    where = first[:, None] + taps
    used = taps[None, :] < count[:, None]
    out = np.zeros((n_out, n_in))
    rows = np.broadcast_to(np.arange(n_out)[:, None], where.shape)
    out[rows[used], where[used]] = weights[used]
    out.flags.writeable = False
    return out


@lru_cache(maxsize=512)
def linear_pieces(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`bilinear_weights` of an enlarging resize as ``basis @ slopes``, to weigh a 0/1
    mask at float32 speed without float32's rounding. Between two input centres every
    weight is linear in the output position ``x + 0.5``: ``basis`` (n_out, 2 * pieces,
    float32) holds a 1 and that position in its piece's two columns, ``slopes`` (2 * pieces,
    n_in, float64) each piece's intercepts and slopes. ``mask @ basis`` sums whole and half
    numbers below 2**24, exact in any order. None: not enlarging (the shrinking filter's
    normalisation is not linear), or too long an axis for float32 to sum exactly."""
    if n_out <= n_in or n_out > 4096:
        return None
    weights = bilinear_weights(n_in, n_out)
    at = np.arange(n_out) + 0.5
    # the piece between the input centres j + 0.5 and j + 1.5; -1 and n_in - 1: the ends
    piece = np.clip(np.floor(at * (n_in / n_out) - 0.5), -1, n_in - 1).astype(np.int64) + 1
    count = n_in + 1
    slopes = np.zeros((2 * count, n_in))
    for index in range(count):
        where = np.flatnonzero(piece == index)
        if where.size == 0:
            continue
        first, last = int(where[0]), int(where[-1])
        slope = (weights[last] - weights[first]) / (at[last] - at[first]) if last > first else 0
        slopes[index] = weights[first] - at[first] * slope
        slopes[count + index] = slope
    basis = np.zeros((n_out, 2 * count), dtype=np.float32)
    basis[np.arange(n_out), piece] = 1.0
    basis[np.arange(n_out), count + piece] = at
    if float(np.abs(basis.astype(np.float64) @ slopes - weights).max()) > 1e-12:
        return None  # not linear between the centres after all: weigh with the weights
    basis.flags.writeable = False
    slopes.flags.writeable = False
    return basis, slopes


def pasted_heat_lung_fraction(
    heat: np.ndarray, box: Box | None, lung_mask: np.ndarray
) -> float | None:
    """``heatmap_lung_fraction(paste_back(heat, box, lung_mask.shape), lung_mask)`` without
    making the pasted map (0.13 ms instead of 0.54 on a 512-px image): the paste is the
    linear ``Ry @ heat @ Rx.T`` (:func:`bilinear_weights` of the crop square, its rows and
    columns inside the image), so its mass is ``sum(heat * outer(Ry.sum(0), Rx.sum(0)))``
    and its mass inside the lungs ``sum(heat * (Ry.T @ mask @ Rx))`` (``mask @ Rx`` by
    :func:`linear_pieces`), in float64: the exact share to ~1e-14, where the pasted map's,
    summed in float32, is within ~1.5e-7 of it (1e-6 in the tests).

    Only for a finite ``heat`` with nothing below zero (what ``classify`` hands over) and a
    boolean mask: anything else, and a heat too faint for float32, takes the pasted map."""
    values = np.asarray(heat, dtype=np.float32)  # what paste_back resizes
    if (
        values.ndim != 2
        or values.size == 0
        or lung_mask.dtype != bool
        or lung_mask.ndim != 2
        or not bool(np.isfinite(values).all())
        or float(values.min()) < 0.0
    ):
        return _pasted_fraction(heat, box, lung_mask)
    peak = float(values.max())
    if peak == 0.0:
        return None  # the pasted map is all zeros
    if peak < 1e-20:  # so faint that float32 products might underflow to zero
        return _pasted_fraction(heat, box, lung_mask)
    rows, cols = lung_mask.shape
    if box is None:
        top, left, height, width = 0, 0, rows, cols
    else:
        top, left, height, width = box.top, box.left, box.size, box.size
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, cols)
    if y1 <= y0 or x1 <= x0:
        return None  # the square misses the image: nothing is pasted
    ry = bilinear_weights(values.shape[0], height)[y0 - top : y1 - top]
    rx = bilinear_weights(values.shape[1], width)[x0 - left : x1 - left]
    grid = values.astype(np.float64)
    total = float(ry.sum(axis=0) @ grid @ rx.sum(axis=0))
    if total <= 0.0:
        return None
    part = lung_mask[y0:y1, x0:x1]
    pieces = linear_pieces(values.shape[1], width)
    if pieces is None:
        weighed = ry.T @ (part @ rx)  # float64
    else:
        basis, slopes = pieces
        sums = part @ basis[x0 - left : x1 - left]  # exact in float32
        weighed = (ry.T @ sums.astype(np.float64)) @ slopes
    inside = float((grid * weighed).sum())
    return inside / total


def _pasted_fraction(heat: np.ndarray, box: Box | None, lung_mask: np.ndarray) -> float | None:
    """The lung share of the pasted map itself (the general path)."""
    cam = paste_back(heat, box, (lung_mask.shape[0], lung_mask.shape[1]))
    # a bilinear resize of a map with nothing below zero has nothing below zero either
    nonnegative = not bool((heat < 0).any())
    return heatmap_lung_fraction(cam, lung_mask, nonnegative=nonnegative)


def box_on(grid: ResultGrid, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The classifier's crop square on a grid of ``shape`` with the working image's extent
    (top, left, bottom, right; None: the whole image)."""
    if grid.box is None:
        return None
    top, left, size = grid.box
    sy, sx = shape[0] / grid.work_shape[0], shape[1] / grid.work_shape[1]
    return (round(top * sy), round(left * sx), round((top + size) * sy), round((left + size) * sx))


def reach(where: np.ndarray, shape: tuple[int, int]) -> Window | None:
    """The rows and columns of a grid of ``shape`` that a bilinear resize of a map at
    ``where``'s grid can draw from its True pixels (None: none True). The kernel reaches
    one input pixel when enlarging, 1/scale when shrinking; one more for rounding."""
    rows = np.flatnonzero(where.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(where.any(axis=0))
    spans = []
    for lo, hi, n_in, n_out in (
        (int(rows[0]), int(rows[-1]) + 1, where.shape[0], shape[0]),
        (int(cols[0]), int(cols[-1]) + 1, where.shape[1], shape[1]),
    ):
        scale = n_out / n_in
        margin = 1.0 + max(1.0, 1.0 / scale)
        spans.append(
            (
                max(0, math.floor((lo - margin) * scale)),
                min(n_out, math.ceil((hi + margin) * scale)),
            )
        )
    return spans[0][0], spans[1][0], spans[0][1], spans[1][1]


def resize_within(values: np.ndarray, shape: tuple[int, int], window: Window | None) -> np.ndarray:
    """uint8 ``values`` resized bilinearly to ``shape`` inside ``window``, zero elsewhere:
    the work is the window's, not the whole grid's. Pillow samples the window at the
    positions of the whole resize (the same values to within one level of rounding)."""
    out = np.zeros(shape, dtype=np.uint8)
    if window is None:
        return out
    top, left, bottom, right = window
    if bottom <= top or right <= left:
        return out
    if values.shape == shape:  # nothing to resize
        out[top:bottom, left:right] = values[top:bottom, left:right]
        return out
    sy, sx = values.shape[0] / shape[0], values.shape[1] / shape[1]
    part = Image.fromarray(values).resize(
        (right - left, bottom - top),
        Image.Resampling.BILINEAR,
        box=(left * sx, top * sy, right * sx, bottom * sy),
    )
    out[top:bottom, left:right] = np.asarray(part)
    return out


def lung_on(grid: ResultGrid, shape: tuple[int, int]) -> np.ndarray:
    """The lung mask on a grid of ``shape``: the segmenter's probability resized there
    (bilinear), at least one half; computed only where a pixel at least one half reaches
    (a bilinear value is never above all of its inputs)."""
    lung = np.ascontiguousarray(grid.lung, dtype=np.uint8)
    return resize_within(lung, shape, reach(lung >= 128, shape)) >= 128


def cam_on(grid: ResultGrid, shape: tuple[int, int]) -> np.ndarray | None:
    """The COVID heat on a grid of ``shape``, float32 in [0, 1] relative to its peak, zero
    outside the crop square: the classifier's map resized once onto the square's extent
    there (None: no CAM; NaN counts as no heat)."""
    if grid.cam is None:
        return None
    heat = np.nan_to_num(grid.cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.clip(heat, 0.0, None)
    rows, cols = shape
    box = box_on(grid, shape)
    if box is None:
        cam = resize(heat, rows, cols)
    else:
        top, left, bottom, right = box
        cam = np.zeros(shape, dtype=np.float32)
        scaled = resize(heat, max(1, bottom - top), max(1, right - left))
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + scaled.shape[0], rows), min(left + scaled.shape[1], cols)
        if y1 > y0 and x1 > x0:
            cam[y0:y1, x0:x1] = scaled[y0 - top : y1 - top, x0 - left : x1 - left]
    peak = float(cam.max())
    if peak <= 0.0:
        return np.zeros(shape, dtype=np.float32)
    cam *= np.float32(1.0 / peak)
    return np.clip(cam, 0.0, 1.0, out=cam)


def attach_display(result: ImageResult, display: np.ndarray | None) -> None:
    """Give a result its display image and the crop box on it, and nothing at display size
    besides: the heatmap maps the CAM and the lungs from the grid itself."""
    if result.grid is None or display is None:
        return
    result.display_image = display
    result.cam_box = box_on(result.grid, display.shape)


def expand_to_display(result: ImageResult, display: np.ndarray | None) -> None:
    """Fill the display-size arrays (display image, lung mask, CAM in [0, 1], crop box) from
    the result's maps at the networks' grid, for consumers that want them at that size."""
    grid = result.grid
    if grid is None or display is None:
        return
    attach_display(result, display)
    result.lung_mask = lung_on(grid, display.shape)
    if grid.cam is None:
        return
    box = None if grid.box is None else Box(*grid.box)
    cam = paste_back(grid.cam.astype(np.float32), box, grid.work_shape)
    peak = float(cam.max())
    cam8 = to_uint8(cam / peak) if peak > 0 else np.zeros(grid.work_shape, np.uint8)
    window = reach(cam8 > 0, display.shape)  # the crop square's reach: the rest stays 0
    result.cam = np.zeros(display.shape, dtype=np.float16)
    if window is not None:
        top, left, bottom, right = window
        big = resize_within(cam8, display.shape, window)
        result.cam[top:bottom, left:right] = _UNIT_FLOATS[big[top:bottom, left:right]]


def occlusion_starts(size: int) -> list[int]:
    """Top (= left) offsets of the occluding patch along one side of a ``size`` input."""
    return list(range(0, size - OCCLUSION_PATCH + 1, OCCLUSION_STRIDE))


def occlusion_copies(image: np.ndarray) -> np.ndarray:
    """Every occluded copy of one (C, S, S) input, a grey patch per position: one batch."""
    starts = occlusion_starts(image.shape[-1])
    copies = []
    for top in starts:
        for left in starts:
            copy = image.copy()
            copy[:, top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] = 0.5
            copies.append(copy)
    return np.stack(copies)


def occlusion_heat(base_score: float, scores: np.ndarray, size: int) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus): the drop of the COVID score per patch
    position (``scores`` in :func:`occlusion_copies` order), averaged where patches overlap."""
    starts = occlusion_starts(size)
    drop = np.clip(base_score - scores, 0.0, None).reshape(len(starts), len(starts))
    heat = np.zeros((size, size), dtype=np.float32)
    count = np.zeros((size, size), dtype=np.float32)
    for a, top in enumerate(starts):
        for b, left in enumerate(starts):
            heat[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += drop[a, b]
            count[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += 1
    return heat / np.maximum(count, 1)
