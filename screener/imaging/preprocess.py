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


def resized_at_least(values: np.ndarray, height: int, width: int, level: float) -> np.ndarray:
    """``resize(values, height, width) >= level`` for a float map, resized only around the
    inputs at least ``level`` (a bilinear value is never above all of its inputs): on the
    lung probability 224 -> 512 that is ~60% of the map. Bit for bit the whole resize's
    answer; an axis whose span Pillow would not compute exactly alone is resized whole."""
    values = np.ascontiguousarray(values, dtype=np.float32)  # what resize() resizes
    where = values >= level
    out = np.zeros((height, width), dtype=bool)
    rows = np.flatnonzero(where.any(axis=1))
    if rows.size == 0:  # nothing at least ``level``: no output is (NaN never is)
        return out
    if values.shape == (height, width):
        return where
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
    out = lut[image]
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
