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

import numpy as np
from PIL import Image

from screener.imaging.preprocess import Box, paste_back, resize, to_uint8
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
