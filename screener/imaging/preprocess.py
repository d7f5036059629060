"""Pre-processing schemes of the thoughtful-evaluation paper, on uint8 MONOCHROME2 images.

The same pure functions run in training (corpus PNGs) and at run time (decoded DICOM), so
what the networks see is identical in both. Network inputs are float32 ``(1, S, S)`` in
[0, 1]; ImageNet normalisation and channel replication live inside the exported models.

- ``raw``: whole image resized to S x S, histogram-equalised.
- ``crop``: square around the lung mask's bounding box (side = the longer extent), cropped
  from the image (not masked), resized, equalised.
- ``segment``: as ``crop``, then the mask is dilated 5x5, everything outside it is black and
  the histogram is equalised inside the lungs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image

from screener.imaging import lung_box as boxes
from screener.imaging.lung_box import Box, BoxRule

NET_SIZE = 224
Scheme = Literal["raw", "crop", "segment"]
SCHEMES: tuple[Scheme, ...] = ("raw", "crop", "segment")


def to_uint8(pixels01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded (values outside [0, 1] are clipped)."""
    scaled = np.clip(pixels01, 0.0, 1.0) * np.float32(255.0)
    scaled += np.float32(0.5)
    return scaled.astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int, *, nearest: bool = False) -> np.ndarray:
    """Antialiased resize with Pillow (float32 in, float32 out; uint8 in, uint8 out)."""
    if image.shape == (height, width):
        return image.copy()
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), resample))
    pil = Image.fromarray(image.astype(np.float32), mode="F")
    return np.asarray(pil.resize((width, height), resample), dtype=np.float32)


def _exact_span(lo: int, hi: int, n_in: int, n_out: int) -> tuple[float, float, int, int] | None:
    """The outputs ``[a, b)`` of a bilinear resize of ``n_in`` samples to ``n_out`` whose
    kernel can reach inputs ``lo..hi`` (inclusive), with the ``box`` span that asks Pillow
    for them alone, if Pillow then computes them bit for bit as in the whole resize: as
    ``(box start, box end, a, b)``; None: only the whole axis is.

    Pillow places output ``x`` at ``box[0] + (x + 0.5) * (box[2] - box[0]) / n``, the box in
    single precision: that is the whole resize's position only when every term is exact,
    i.e. when the scale ``n_in / n_out`` is a short binary fraction (224 -> 512: 7/16). Then
    the kernel (position, reach, weights) and so each output are the same."""
    if n_in == n_out:
        return None  # no pass on this axis in the whole resize
    g = math.gcd(n_in, n_out)
    p, q = n_in // g, n_out // g
    if q & (q - 1) or q > 1 << 16:
        return None
    support = max(1.0, p / q)  # the bilinear kernel's reach, in input samples
    a = max(0, math.floor((lo - support - 1.0) * q / p) - 1)
    b = min(n_out, math.ceil((hi + support + 2.0) * q / p) + 1)
    start, end, width = a * p / q, b * p / q, (b - a) * p / q  # exact: q is a power of 2
    if any(float(np.float32(v)) != v for v in (start, end, width)):
        return None  # the box would be rounded to single precision
    return start, end, a, b


def _resized_around_high(
    values: np.ndarray, where: np.ndarray, height: int, width: int, level: float
) -> np.ndarray:
    """``resize(values, height, width) >= level`` with Pillow resizing only around the
    inputs at least ``level`` (``where``; a bilinear value is never above all of its
    inputs): on the lung probability 224 -> 512 that is ~60% of the map. An axis whose span
    Pillow would not compute exactly alone is resized whole."""
    out = np.zeros((height, width), dtype=bool)
    rows = np.flatnonzero(where.any(axis=1))
    cols = np.flatnonzero(where.any(axis=0))
    n_rows, n_cols = values.shape
    ys = _exact_span(int(rows[0]), int(rows[-1]), n_rows, height)
    xs = _exact_span(int(cols[0]), int(cols[-1]), n_cols, width)
    if ys is None and xs is None:
        return resize(values, height, width) >= level
    y0, y1, top, bottom = ys or (0.0, float(n_rows), 0, height)
    x0, x1, left, right = xs or (0.0, float(n_cols), 0, width)
    pil = Image.fromarray(values, mode="F")
    part = pil.resize((right - left, bottom - top), Image.Resampling.BILINEAR, (x0, y0, x1, y1))
    out[top:bottom, left:right] = np.asarray(part, dtype=np.float32) >= level
    return out


@dataclass(frozen=True)
class _Taps:
    """One axis of Pillow's bilinear enlargement (``precompute_coeffs`` in Resample.c, the
    whole-axis box) by *window*, the inputs an output's taps read: window ``t`` is inputs
    ``t - 1`` and ``t``, windows ``0`` and ``n_in`` the edge inputs alone (``paired``); on
    an axis Pillow leaves as it is, window ``t`` is input ``t``. ``window[i]``: output
    ``i``'s window; ``head[t]``, ``tail[t]``: the inputs of its first and second tap (a
    missing second tap: the first, with weight 0); ``outputs[:, t]``, ``first[:, t]``,
    ``second[:, t]``: its outputs and their two taps' weights (float64), the last output
    repeated to fill the column. Read-only (cached)."""

    window: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    outputs: np.ndarray
    first: np.ndarray
    second: np.ndarray
    paired: bool


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


@lru_cache(maxsize=512)
def bilinear_coefficients(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's bilinear resize of ``n_in`` samples to ``n_out``, as ``precompute_coeffs``
    in Pillow's Resample.c computes it for the whole-axis box, step by step in doubles: per
    output, its first input (``first``, C's truncating ``(int)``), how many taps it reads
    (``count``) and the normalised weights of its ``ceil(support) * 2 + 1`` taps
    (``weights``; 0 past ``count``; summed for the normalisation in tap order). For code
    that needs :func:`resize`'s arithmetic without the resize. Read-only."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter reaches one input sample
    centers = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.intp), 0)
    count = np.minimum((centers + support + 0.5).astype(np.intp), n_in) - first
    taps = np.arange(math.ceil(support) * 2 + 1)
    x = np.abs(((first[:, None] + taps) - centers[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(x < 1.0, 1.0 - x, 0.0)
    weights[taps[None, :] >= count[:, None]] = 0.0
    total = np.zeros(n_out)
    for tap in taps:  # summed in Pillow's order
        total = total + weights[:, tap]
    weights /= np.where(total != 0.0, total, 1.0)[:, None]
    _read_only(first, count, weights)
    return first, count, weights


@lru_cache(maxsize=64)
def _bilinear_taps(n_in: int, n_out: int) -> _Taps | None:
    """Pillow's taps for ``n_in`` -> ``n_out`` samples; None: shrinking (wider windows), or
    a window that no output reads."""
    if n_in == n_out:  # Pillow skips the pass: each output is its input, untouched
        index = np.arange(n_in)
        ones, zeros = np.ones((1, n_in)), np.zeros((1, n_in))
        _read_only(index, ones, zeros)
        return _Taps(index, index, index, index[None], ones, zeros, False)
    if n_out < n_in:
        return None
    first, count, weights = bilinear_coefficients(n_in, n_out)  # enlarging: 3 taps each
    single = count == 1
    if np.any((count < 1) | (count > 2)) or np.any(single & (first != 0) & (first != n_in - 1)):
        return None
    window = np.where(single, np.where(first == 0, 0, n_in), first + 1)
    start = np.searchsorted(window, np.arange(n_in + 1), "left")
    stop = np.searchsorted(window, np.arange(n_in + 1), "right")
    if np.any(np.diff(window) < 0) or np.any(stop <= start):
        return None
    run = int((stop - start).max())
    outputs = np.minimum(start + np.arange(run)[:, None], stop - 1)  # (run, n_in + 1)
    head = np.clip(np.arange(n_in + 1) - 1, 0, n_in - 1)
    tail = np.minimum(np.arange(n_in + 1), n_in - 1)
    tail[0] = 0
    taps_first, taps_second = weights[outputs, 0], weights[outputs, 1]
    _read_only(window, head, tail, outputs, taps_first, taps_second)
    return _Taps(window, head, tail, outputs, taps_first, taps_second, True)


def _windows(inputs: np.ndarray, ys: _Taps, xs: _Taps, every: bool) -> np.ndarray:
    """Per window (rows x columns, see :class:`_Taps`): whether ``inputs`` holds for all of
    its inputs (``every``) or for any."""
    op = np.logical_and if every else np.logical_or
    if ys.paired:
        n = inputs.shape[0]
        rows = np.empty((n + 1, inputs.shape[1]), dtype=bool)
        rows[0], rows[n] = inputs[0], inputs[-1]
        op(inputs[:-1], inputs[1:], out=rows[1:n])
        inputs = rows
    if xs.paired:
        n = inputs.shape[1]
        cols = np.empty((inputs.shape[0], n + 1), dtype=bool)
        cols[:, 0], cols[:, n] = inputs[:, 0], inputs[:, -1]
        op(inputs[:, :-1], inputs[:, 1:], out=cols[:, 1:n])
        inputs = cols
    return inputs


def _pillow_windows(
    values: np.ndarray, ys: _Taps, xs: _Taps, ty: np.ndarray, tx: np.ndarray
) -> np.ndarray:
    """Pillow's bilinear outputs of windows ``(ty, tx)`` of a finite map, as ``(run_y,
    run_x, windows)`` float32: per pass, input (float32) times weight (float64), summed in
    tap order in float64, rounded to float32; horizontal first, then vertical
    (ImagingResampleInner). A missing tap reads a (finite) input times 0: it adds 0."""
    n_cols = values.shape[1]
    flat = values.reshape(-1)
    top, bottom = ys.head.take(ty) * n_cols, ys.tail.take(ty) * n_cols
    left, right = xs.head.take(tx), xs.tail.take(tx)
    first, second = xs.first.take(tx, axis=1), xs.second.take(tx, axis=1)
    upper = flat.take(top + left) * first + flat.take(top + right) * second
    lower = flat.take(bottom + left) * first + flat.take(bottom + right) * second
    up, down = ys.first.take(ty, axis=1)[:, None], ys.second.take(ty, axis=1)[:, None]
    upper, lower = upper.astype(np.float32), lower.astype(np.float32)
    return (upper * up + lower * down).astype(np.float32)


def _resized_near_level(
    values: np.ndarray, where: np.ndarray, ys: _Taps, xs: _Taps, level: np.float32
) -> np.ndarray:
    """``resize(values) >= level`` for a finite map, resizing only the outputs whose
    window (see :class:`_Taps`) straddles ``level``.

    Each pass sums ``input * weight`` over an output's taps in float64 (weights >= 0 that
    sum to 1 within a few ulps) and rounds to float32, every step monotone. So if every
    input of an output's window is at least ``level``, its value is at least ``level`` *
    (1 - 1e-15), which rounds to ``level`` or above; if every input is below ``level`` (at
    most the float32 below it), its value rounds to that float32 or below. Only the other
    windows' outputs are computed, as Pillow computes them."""
    sure = _windows(where, ys, xs, True)
    maybe = _windows(where, ys, xs, False) ^ sure  # any input, not all
    across = np.ascontiguousarray(sure.T.take(xs.window, axis=0).T)
    out = across.take(ys.window, axis=0)
    ty, tx = np.divmod(np.flatnonzero(maybe), maybe.shape[1])  # np.nonzero: 10x slower
    if ty.size:
        at = ys.outputs.take(ty, axis=1)[:, None] * out.shape[1] + xs.outputs.take(tx, axis=1)
        out.reshape(-1)[at] = _pillow_windows(values, ys, xs, ty, tx) >= level
    return out


def resized_at_least(values: np.ndarray, height: int, width: int, level: float) -> np.ndarray:
    """``resize(values, height, width) >= level`` for a float map, bit for bit, computing
    the resize only where the answer is in doubt: when enlarging, an output is certainly at
    least ``level`` if all of its inputs are and certainly below if none is; the rest (a thin
    ring where the map crosses ``level``) is computed as Pillow computes it. Shrinking, NaN
    or infinities (an unused tap's 0 * inf), or an odd ``level``: Pillow resizes around the
    inputs at least ``level``."""
    values = np.ascontiguousarray(values, dtype=np.float32)  # what resize() resizes
    where = values >= level
    if not where.any():  # nothing at least ``level``: no output is (NaN never is)
        return np.zeros((height, width), dtype=bool)
    if values.shape == (height, width):
        return where
    ys = _bilinear_taps(values.shape[0], height)
    xs = _bilinear_taps(values.shape[1], width)
    if (
        ys is None
        or xs is None
        or not 2.0**-100 <= abs(level) <= 2.0**100  # float32 rounding near it: relative
        or float(np.float32(level)) != level  # ``values >= level`` compares in float32
        or not np.isfinite(values).all()
    ):
        return _resized_around_high(values, where, height, width, level)
    return _resized_near_level(values, where, ys, xs, np.float32(level))


def limited_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """The shape :func:`limit_size` gives an image of ``height`` x ``width``."""
    scale = max_size / max(height, width)
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def limit_size(image: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink so the long side is at most ``max_size`` (aspect kept, never enlarged)."""
    h, w = image.shape
    shape = limited_shape(h, w, max_size)
    return image if shape == image.shape else resize(image, *shape)


def limit_display_size(image: np.ndarray, max_size: int) -> np.ndarray:
    """:func:`limit_size` for what is only looked at (the heatmap SC, the console's PNG):
    box-reduced by a whole factor first, then the antialiased resize (Pillow's
    ``reducing_gap=1``): 1.2 ms instead of 7 for a 2048-px film to 1024, and a film a few
    tenths of a grey level sharper. Never for the networks' inputs: their filter is the one
    the model was validated with (``screener.screening.prepare.work_image``)."""
    h, w = image.shape
    shape = limited_shape(h, w, max_size)
    if shape == image.shape:
        return image
    if image.dtype != np.uint8:
        return resize(image, *shape)
    small = Image.fromarray(image).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR, reducing_gap=1.0
    )
    return np.asarray(small)


def _histogram(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Grey-level counts of a uint8 image (inside a boolean ``mask``) as float64; None: no
    pixel counted. Pillow counts a 2-D uint8 image in place (20 us for 224 x 224, where
    np.bincount first widens every value to an index: 60 us, 150 with a mask)."""
    if image.dtype == np.uint8 and image.ndim == 2 and (mask is None or mask.dtype == bool):
        pil = Image.fromarray(np.ascontiguousarray(image))
        if mask is None:
            counts = pil.histogram()
        else:
            counts = pil.histogram(Image.fromarray(np.ascontiguousarray(mask).view(np.uint8)))
        hist = np.array(counts, dtype=np.float64)
        return hist if hist.sum() > 0 else None
    values = image[mask] if mask is not None else image.ravel()
    if values.size == 0:
        return None
    return np.bincount(values, minlength=256).astype(np.float64)


def equalize(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Histogram equalisation of a uint8 image; with ``mask``, the CDF is computed inside the
    mask only and everything outside is set to 0."""
    hist = _histogram(image, mask)
    if hist is None:
        return np.zeros_like(image)
    cdf = np.cumsum(hist)
    cdf_min = cdf[hist > 0][0]
    denom = max(cdf[-1] - cdf_min, 1.0)
    lut = np.clip(np.rint((cdf - cdf_min) / denom * 255.0), 0, 255).astype(np.uint8)
    out = np.take(lut, image)  # lut[image], without fancy indexing's overhead (~40% less)
    if mask is not None:
        out = np.where(mask, out, 0).astype(np.uint8)
    return out


def dilate(mask: np.ndarray, size: int = 5) -> np.ndarray:
    """Binary dilation with a size x size square (numpy only)."""
    r = size // 2
    padded = np.pad(mask.astype(bool), r)
    out = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    for dy in range(size):
        for dx in range(size):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


# How the crop square is placed (screener.imaging.lung_box); training, evaluation and run
# time all go through scheme_input, so they agree.
BOX_RULE = BoxRule()


def lung_box(mask: np.ndarray, rule: BoxRule | None = None) -> Box | None:
    """Square centred on the lung extents, side = the longer extent (``rule``: BOX_RULE)."""
    return boxes.lung_box(mask, BOX_RULE if rule is None else rule)


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """Crop ``box`` from ``image``, zero-padding where the square leaves the image."""
    h, w = image.shape
    out = np.zeros((box.size, box.size), dtype=image.dtype)
    y0, x0 = max(box.top, 0), max(box.left, 0)
    y1, x1 = min(box.top + box.size, h), min(box.left + box.size, w)
    if y1 > y0 and x1 > x0:
        out[y0 - box.top : y1 - box.top, x0 - box.left : x1 - box.left] = image[y0:y1, x0:x1]
    return out


WORK_SIZE = 512  # the corpus images the models were trained on are <= 512 px


def segmenter_input(image: np.ndarray, size: int = NET_SIZE) -> np.ndarray:
    """Input of the first engine (segmenter + view head): whole image, squashed, equalised.
    Large images are first reduced to WORK_SIZE (as the training images were)."""
    small = resize(limit_size(image, WORK_SIZE), size, size)
    return (equalize(small).astype(np.float32) / 255.0)[None]


def scheme_input(
    image: np.ndarray,
    lung_mask: np.ndarray | None,
    scheme: Scheme,
    size: int = NET_SIZE,
    *,
    equalized: bool = True,
    box_rule: BoxRule | None = None,
) -> tuple[np.ndarray, Box | None]:
    """Classifier input ``(1, size, size)`` for a scheme, and the crop box used (None = whole
    image, squashed). ``lung_mask`` is boolean at ``image`` geometry; an empty mask falls
    back to the raw scheme (the caller records it). ``equalized=False`` skips the histogram
    equalisation of the papers' schemes (a measured variant, see the model card); ``box_rule``
    (default BOX_RULE) places the crop square."""
    box = None if scheme == "raw" or lung_mask is None else lung_box(lung_mask, box_rule)
    if box is None or lung_mask is None:
        if equalized:
            return segmenter_input(image, size), None
        small = resize(limit_size(image, WORK_SIZE), size, size)
        return (small.astype(np.float32) / 255.0)[None], None
    region = resize(crop(image, box), size, size)
    if scheme == "crop":
        out = equalize(region) if equalized else region
        return (out.astype(np.float32) / 255.0)[None], box
    region_mask = resize(crop(lung_mask.astype(np.uint8) * 255, box), size, size) >= 128
    region_mask = dilate(region_mask, 5)
    if equalized:
        out = equalize(region, region_mask)
    else:
        out = np.where(region_mask, region, 0).astype(np.uint8)
    return (out.astype(np.float32) / 255.0)[None], box


def paste_back(values: np.ndarray, box: Box | None, shape: tuple[int, int]) -> np.ndarray:
    """Map a map at network-input geometry (e.g. a CAM) back onto an image of ``shape``."""
    h, w = shape
    if box is None:
        return resize(values.astype(np.float32), h, w)
    out = np.zeros((h, w), dtype=np.float32)
    scaled = resize(values.astype(np.float32), box.size, box.size)
    y0, x0 = max(box.top, 0), max(box.left, 0)
    y1, x1 = min(box.top + box.size, h), min(box.left + box.size, w)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = scaled[y0 - box.top : y1 - box.top, x0 - box.left : x1 - box.left]
    return out
