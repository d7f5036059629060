"""Heatmap secondary capture: the CAM over the radiograph, the result in margins around it.

The overlay is what a radiologist sees in any viewer, including ones that know nothing of
parametric maps. The film is the MONOCHROME2 image with the class activation map blended
in a perceptual colour map (matplotlib ``inferno``: monotonic lightness, readable in
greyscale) and the lung contour the pipeline used (its two largest components: stray
islands at a shoulder or an apex are segmentation noise, not lung). The CAM is drawn only
inside the body and inside the classifier's crop box, and fades out towards their edges:
outside the body it has no anatomical meaning, and the crop square's edge would otherwise
show as a hard-edged rectangle.

Everything written (both calls with their probabilities, the view, the colour scale, the
operating point, model@version, the disclaimer) lies in black margins added *around* the
film, so no film pixel is covered: apices and clavicles stay visible. The film keeps the
display geometry (long side at most ``reports.heatmap_max_size``); the margins add rows.

Rendering works where the heatmap is drawn: the CAM is brought from the networks' grid
(:class:`~screener.results.ResultGrid`) straight to a coarse grid (at most ``MASK_GRID``
pixels) and multiplied there by the body/crop weight and its feathering; one bilinear upscale
to film size, the crop box cut exactly there, then one uint8 lookup table gives the blended
RGB. The lung mask is brought from the grid to film size, where its contour is drawn. Nothing
is first expanded to display size to be shrunk again. The pixels are RGB and the object says
BurnedInAnnotation YES.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from screener.imaging.components import fill_holes, largest_components
from screener.imaging.views import view_caption
from screener.reports.common import (
    SC_SERIES_NUMBER,
    common_attributes,
    disclaimer_of,
    output_character_set,
    pneumonia_present,
    processing_equipment,
)
from screener.reports.operating_point import OperatingPointStatement, statement_for
from screener.reports.output_uids import OutputUids
from screener.reports.sc_document import secondary_capture
from screener.reports.sr_document import Equipment
from screener.results import ImageResult, ResultGrid, StudyResult
from screener.screening.cam import Window, box_on, cam_on, lung_on, reach, resize_within
from screener.settings import Settings

COLORMAP = "inferno"
MAX_ALPHA = 0.55  # opacity of the hottest CAM value
CAM_FLOOR = 0.15  # opacity rises from 0 here to MAX_ALPHA at 1 (no step at the floor)
CONTOUR_RGB = (64, 224, 255)
SERIES_DESCRIPTION = "AI screening heatmap (not for diagnosis)"
MASK_GRID = 256  # body mask and feathering are computed at this long side, then upscaled
FEATHER = 1 / 40  # width of the CAM's fade-out at the body / crop edge, share of the long side
MIN_BODY_SHARE = 0.05  # body components smaller than this share of the largest are dropped
MIN_TEXT_WIDTH = 512  # a narrower film is centred on a canvas this wide, so text stays legible
FOOTER_CACHE = 8  # footers kept, one per film width and text (0.9 MB at 1024 px, 3.6 at 2048)
BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST

POSITIVE_RGB = (255, 80, 80)
NEGATIVE_RGB = (120, 230, 120)
TEXT_RGB = (235, 235, 235)
DISCLAIMER_RGB = (255, 210, 0)
Colour = tuple[int, int, int]


@lru_cache(maxsize=1)
def _colormap_lut() -> np.ndarray:
    """256 x 3 uint8 lookup table of the perceptual colour map."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=1)
def _alpha_lut() -> np.ndarray:
    """256 uint16 opacities in 1/256 units: 0 up to the floor, rising to MAX_ALPHA."""
    v = np.arange(256, dtype=np.float64) / 255.0
    ramp = np.clip((v - CAM_FLOOR) / (1.0 - CAM_FLOOR), 0.0, 1.0)
    return np.rint(MAX_ALPHA * 256.0 * ramp).astype(np.uint16)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans shipped with matplotlib (no system font needed), else PIL's default."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # pragma: no cover - matplotlib without its fonts
        return ImageFont.load_default(size)


# ------------------------------------------------------------------------------------------
# Masks: connected components, body, crop box


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (maximum between-class variance)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    weight0 = np.cumsum(hist)
    total = weight0[-1]
    weight1 = total - weight0
    levels = np.arange(256, dtype=np.float64)
    sum0 = np.cumsum(hist * levels)
    mean0 = sum0 / np.maximum(weight0, 1.0)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1.0)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def _coarse_shape(shape: tuple[int, int], grid: int = MASK_GRID) -> tuple[int, int]:
    rows, cols = shape
    scale = min(1.0, grid / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _resize_u8(image: np.ndarray, shape: tuple[int, int], how: Image.Resampling) -> np.ndarray:
    if image.shape == shape:
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), how))


def air_threshold(small: np.ndarray, lungs: np.ndarray | None) -> int:
    """Grey level at or below which a pixel can be air outside the patient: Otsu's
    threshold, but always below the darkest 5% of the lungs. Air is darker than the lungs;
    in a film without air around the patient, Otsu alone would split lungs from soft
    tissue and call dark lung regions that reach the border (apices, costophrenic angles)
    "outside"."""
    threshold = otsu_threshold(small)
    if lungs is not None and lungs.any():
        threshold = min(threshold, int(np.percentile(small[lungs], 5)) - 1)
    return threshold


def _as_u8(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as 0/1 uint8 without a copy (Pillow resizes uint8, not bool)."""
    return mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)


def _coarse_lungs(lung_mask: np.ndarray, coarse: tuple[int, int]) -> np.ndarray:
    """Coarse cells that hold any lung pixel of a mask at film size."""
    return _resize_u8(_as_u8(lung_mask), coarse, Image.Resampling.BOX) > 0


def _coarse_body(small: np.ndarray, lungs: np.ndarray | None) -> np.ndarray:
    """The body mask at the coarse grid (see :func:`body_mask`) from the image and the
    lungs at that grid."""
    body = small > air_threshold(small, lungs)
    body = fill_holes(largest_components(body, keep=8, min_share=MIN_BODY_SHARE))
    if lungs is not None:
        body |= lungs
    return body


def _nearest_up(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _resize_u8(_as_u8(mask), shape, Image.Resampling.NEAREST) > 0


def body_mask(gray: np.ndarray, lung_mask: np.ndarray | None = None) -> np.ndarray:
    """Where the patient is, at ``gray``'s geometry, computed at a coarse grid: what is
    brighter than air (:func:`air_threshold`), holes filled (dark structures inside the
    body), specks such as burned-in markers dropped, the lungs added."""
    coarse = _coarse_shape(gray.shape)
    small = _resize_u8(gray, coarse, Image.Resampling.BOX)
    lungs = None
    if lung_mask is not None and lung_mask.shape == gray.shape:
        lungs = _coarse_lungs(lung_mask, coarse)
    return _nearest_up(_coarse_body(small, lungs), gray.shape)


def _row_window_sums(values: np.ndarray, k: int) -> np.ndarray:
    """Sums of every ``k`` consecutive rows, by doubling (sums of 1, 2, 4, ... rows, the
    ones of ``k``'s binary digits added): a few whole-array adds, each along contiguous
    rows. Integers, so exact in any order."""
    n_out = values.shape[0] - k + 1
    total: np.ndarray | None = None
    offset, span, power = 0, 1, values
    while True:
        if k & 1:
            term = power[offset : offset + n_out]
            total = term.copy() if total is None else total + term
            offset += span
        k >>= 1
        if not k:
            assert total is not None
            return total
        power = power[:-span] + power[span:]
        span *= 2


def _box_blur(mask: np.ndarray, radius: int) -> np.ndarray:
    """Mean of a boolean mask over a (2r+1)^2 square, edges padded by reflection, float64:
    separable, down the columns then along the rows.

    The values are those of float64 cumulative sums along each axis in turn, bit for bit
    (they feed the CAM blend): down the columns the window sums of a 0/1 mask are exact
    integers, so they are added as integers (numpy's cumulative sum down axis 0 walks the
    array column by column, three times the cost of one along the rows); along the rows,
    the sums of fractions keep numpy's sequential cumulative sum, windows cut by slices."""
    k = 2 * radius + 1
    padded = np.pad(mask.astype(np.uint16), ((radius, radius), (0, 0)), mode="reflect")
    out = _row_window_sums(padded, k) / k  # a count over k: one rounding, as before
    c = np.cumsum(np.pad(out, ((0, 0), (radius + 1, radius)), mode="reflect"), axis=1)
    out = c[:, k:] - c[:, :-k]
    out /= k
    return out


def _erode3(mask: np.ndarray) -> np.ndarray:
    """3 x 3 erosion (outside the image counts as False), separable: along the rows, then
    down the columns."""
    rows = mask.copy()
    rows[:, 1:] &= mask[:, :-1]
    rows[:, :-1] &= mask[:, 1:]
    rows[:, 0] = rows[:, -1] = False
    out = rows.copy()
    out[1:] &= rows[:-1]
    out[:-1] &= rows[1:]
    out[0] = out[-1] = False
    return out


def crop_region(shape: tuple[int, int], box: Sequence[int] | None) -> np.ndarray:
    """Boolean image of the classifier's crop box (top, left, bottom, right; None: all)."""
    region = np.zeros(shape, dtype=bool)
    if box is None:
        region[:] = True
        return region
    top, left, bottom, right = (int(v) for v in box)
    region[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = True
    return region


def coarse_fade(body: np.ndarray, shape: tuple[int, int], box: Sequence[int] | None) -> np.ndarray:
    """Weight of the CAM at the coarse grid of ``body``, float in [0, 1]: zero outside the
    body and outside the crop box (given at film ``shape``), rising over ``FEATHER`` of the
    long side from their edges.

    The region is eroded by one coarse pixel before the fade, so a bilinear upscale of
    anything multiplied by it stays zero wherever the nearest-upscaled body mask is False;
    the box is then cut exactly at film resolution (:func:`_drawn_cam`)."""
    coarse = body.shape
    region = body.copy()
    if box is not None:
        sy, sx = coarse[0] / shape[0], coarse[1] / shape[1]
        top, left, bottom, right = (float(v) for v in box)
        inner = (  # the coarse box lies inside the film box: the fade ends at its edge
            math.ceil(top * sy),
            math.ceil(left * sx),
            math.floor(bottom * sy),
            math.floor(right * sx),
        )
        region &= crop_region(coarse, inner)
    core = _erode3(region)
    radius = max(1, round(max(coarse) * FEATHER))
    # 2 * mean - 1 is 0 at a straight edge and 1 one radius inside: a fade *inwards*
    fade = _box_blur(core, radius)
    fade *= 2.0
    fade -= 1.0
    np.clip(fade, 0.0, 1.0, out=fade)
    fade *= core
    return fade


def main_lungs(mask: np.ndarray) -> np.ndarray:
    """The lung mask without stray islands: its two largest components, found at the
    coarse grid (the segmenter's own resolution is coarser still) and cut from the mask."""
    coarse = _coarse_shape(mask.shape)
    small = _resize_u8(_as_u8(mask), coarse, Image.Resampling.NEAREST) > 0
    keep = ~_erode3(~largest_components(small, keep=2))  # dilated: keeps the lung borders
    cut = _nearest_up(keep, mask.shape)
    if mask.dtype != np.bool_:
        return mask & cut
    cut &= mask  # a fresh array: cut in place
    return cut


# ------------------------------------------------------------------------------------------
# The film: CAM blend and lung contour


def lung_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask (mask minus its 4-neighbour erosion, outside the
    image counting as False), thickened by 4-neighbour dilations; in place on shifted
    slices, no padded copies."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return mask.copy()
    eroded = mask.copy()
    eroded[1:] &= mask[:-1]
    eroded[:-1] &= mask[1:]
    eroded[:, 1:] &= mask[:, :-1]
    eroded[:, :-1] &= mask[:, 1:]
    eroded[0] = eroded[-1] = False
    eroded[:, 0] = eroded[:, -1] = False
    edge = mask ^ eroded  # the erosion lies inside the mask: mask and not eroded
    for _ in range(max(0, thickness - 1)):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def _draw_contour(rgb: np.ndarray, lungs: np.ndarray, thickness: int) -> None:
    """Paint the lung contour, working only on the lungs' bounding box."""
    rows = np.flatnonzero(lungs.any(axis=1))
    cols = np.flatnonzero(lungs.any(axis=0))
    if rows.size == 0:
        return
    m = thickness + 1
    r0, r1 = max(int(rows[0]) - m, 0), min(int(rows[-1]) + m + 1, lungs.shape[0])
    c0, c1 = max(int(cols[0]) - m, 0), min(int(cols[-1]) + m + 1, lungs.shape[1])
    window = rgb[r0:r1, c0:c1]
    edge = lung_contour(lungs[r0:r1, c0:c1], thickness)
    for channel, value in enumerate(CONTOUR_RGB):  # a channel at a time: half the cost
        window[..., channel][edge] = value


@lru_cache(maxsize=1)
def _blend_lut() -> np.ndarray:
    """65536 x 3 uint8: the RGB blend of grey ``g`` and CAM ``c`` at row ``g << 8 | c``
    (integer arithmetic, opacity in 1/256 units)."""
    g = np.arange(256, dtype=np.uint32)[:, None, None]
    a = _alpha_lut().astype(np.uint32)[None, :, None]
    colours = _colormap_lut().astype(np.uint32)[None, :, :]
    lut = ((g * (256 - a) + colours * a + 128) >> 8).astype(np.uint8)
    return np.ascontiguousarray(lut.reshape(65536, 3))


def _grey_into(rgb: np.ndarray, gray: np.ndarray) -> None:
    """Copy a grey image into the three channels of ``rgb`` (one strided copy each: a
    third cheaper than ``np.repeat``, and no temporary)."""
    for channel in range(3):
        rgb[..., channel] = gray


def blend_cam(
    gray: np.ndarray,
    cam8: np.ndarray,
    window: Window | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8: the grey image with the uint8 CAM in the colour map, opacity rising with
    the CAM, by one table lookup per pixel (all three channels at once). Where the CAM is
    below the floor the pixel is the grey value exactly; given the ``window`` outside which
    the CAM is 0, only the window is looked up and the rest is the grey value copied.

    ``out``: the H x W x 3 array to draw into (a view of the Secondary Capture's pixels,
    so the film is not copied there afterwards); each pixel is written once."""
    if gray.shape != cam8.shape:
        raise ValueError(f"CAM shape {cam8.shape} differs from image shape {gray.shape}")
    if out is None:
        out = np.empty((*gray.shape, 3), dtype=np.uint8)
    elif out.shape != (*gray.shape, 3) or out.dtype != np.uint8:
        raise ValueError(f"output {out.shape} {out.dtype} is not {gray.shape} x 3 uint8")
    top, left, bottom, right = (0, 0, *gray.shape) if window is None else window
    # grey where the CAM is 0: the bands above and below the window, then beside it
    _grey_into(out[:top], gray[:top])
    _grey_into(out[bottom:], gray[bottom:])
    _grey_into(out[top:bottom, :left], gray[top:bottom, :left])
    _grey_into(out[top:bottom, right:], gray[top:bottom, right:])
    index = gray[top:bottom, left:right].astype(np.uint16)
    index <<= 8
    index |= cam8[top:bottom, left:right]
    # mode="clip": no bounds check (every uint16 is a row); straight into the window
    np.take(_blend_lut(), index, axis=0, mode="clip", out=out[top:bottom, left:right])
    return out


def _fit_shape(shape: tuple[int, ...], max_size: int) -> tuple[int, int]:
    """Rows and columns of the display image fitted by :func:`fit_gray`."""
    rows, cols = int(shape[0]), int(shape[1])
    if max(rows, cols) <= max_size:
        return rows, cols
    scale = max_size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def fit_gray(gray: np.ndarray, max_size: int) -> np.ndarray:
    """The display image with the longer side at most ``max_size`` (Lanczos)."""
    rows, cols = _fit_shape(gray.shape, max_size)
    if (rows, cols) == gray.shape:
        return gray
    return np.asarray(Image.fromarray(gray).resize((cols, rows), Image.Resampling.LANCZOS))


def _scaled_box(
    box: Sequence[int] | None, before: tuple[int, int], after: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    if box is None:
        return None
    sy, sx = after[0] / before[0], after[1] / before[1]
    top, left, bottom, right = (float(v) for v in box)
    return round(top * sy), round(left * sx), round(bottom * sy), round(right * sx)


@dataclass
class Film:
    """The radiograph with the overlay, and what went into it (kept for the tests)."""

    rgb: np.ndarray  # H x W x 3 uint8 (from render: a view of the Rendering's pixels)
    gray: np.ndarray  # H x W uint8, the display image at film size
    cam: np.ndarray  # H x W uint8: the CAM as drawn (after body/crop weighting)
    lungs: np.ndarray | None  # H x W bool: the lung mask whose contour is drawn
    lung_mask: np.ndarray | None  # H x W bool: the segmentation as received (film size)
    box: tuple[int, int, int, int] | None  # the crop box at film size

    @property
    def region(self) -> np.ndarray:
        """Body and crop box: the only place the CAM may be drawn."""
        return body_mask(self.gray, self.lung_mask) & crop_region(self.gray.shape, self.box)


def _grid_with_cam(image: ImageResult) -> ResultGrid | None:
    grid = image.grid
    return grid if grid is not None and grid.cam is not None else None


def has_heatmap(image: ImageResult) -> bool:
    """Whether ``image`` carries what :func:`render_film` draws: a display image and a CAM
    (at the networks' grid, or as a display-size array)."""
    return image.display_image is not None and (
        image.cam is not None or _grid_with_cam(image) is not None
    )


def _lungs(
    image: ImageResult, shape: tuple[int, int], coarse: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The lung mask at film ``shape`` and at the ``coarse`` grid: a display-size mask the
    result carries when the film has the display's size, else the segmenter's map brought
    from the grid straight onto each; without a grid, the display-size mask shrunk by
    nearest neighbour. (None, None): no mask, or one on another grid, which would draw a
    wrong contour."""
    mask = image.lung_mask
    display = image.display_image
    carried = mask is not None and display is not None and mask.shape == display.shape
    if carried and mask is not None and mask.shape == shape:
        return mask, _coarse_lungs(mask, coarse)
    if image.grid is not None:
        return lung_on(image.grid, shape), lung_on(image.grid, coarse)
    if carried and mask is not None:
        film = _resize_u8(_as_u8(mask), shape, NEAREST) > 0
        return film, _coarse_lungs(film, coarse)
    return None, None


def _coarse_cam(image: ImageResult, coarse: tuple[int, int]) -> np.ndarray:
    """The CAM at the coarse grid, float32 in [0, 1]: from the networks' grid when the
    result carries it, else the display-size array resized there (NaN draws nothing)."""
    grid = _grid_with_cam(image)
    if grid is not None:
        cam = cam_on(grid, coarse)
        assert cam is not None
        return cam
    assert image.cam is not None
    cam = np.nan_to_num(np.asarray(image.cam, dtype=np.float32), nan=0.0)
    if cam.shape != coarse:
        cam = np.asarray(
            Image.fromarray(cam, mode="F").resize((coarse[1], coarse[0]), BILINEAR),
            dtype=np.float32,
        )
    return np.clip(cam, 0.0, 1.0)


def _drawn_cam(
    cam: np.ndarray, weight: np.ndarray, shape: tuple[int, int], box: Sequence[int] | None
) -> tuple[np.ndarray, Window | None]:
    """The CAM as drawn at film ``shape``, uint8, and the window outside which it is 0: CAM
    times weight at the coarse grid, one bilinear upscale computed only where that product
    reaches, inside the crop box (cut exactly at film resolution)."""
    product = cam * weight  # float64, as before: the same roundings, in place
    product *= 255.0
    coarse = np.rint(product, out=product).astype(np.uint8)
    window = reach(coarse > 0, shape)
    if window is not None and box is not None:
        top, left, bottom, right = (max(int(v), 0) for v in box)
        window = (
            max(window[0], top),
            max(window[1], left),
            min(window[2], bottom),
            min(window[3], right),
        )
        if window[2] <= window[0] or window[3] <= window[1]:
            window = None
    return resize_within(coarse, shape, window), window


def _display_of(image: ImageResult) -> np.ndarray:
    """The display image :func:`render_film` draws on (ValueError: none, or no CAM)."""
    display = image.display_image
    if display is None or not has_heatmap(image):
        raise ValueError(f"image {image.source.sop_instance_uid} has no display image or CAM")
    if display.ndim != 2:
        raise ValueError("display_image must be a 2-D MONOCHROME2 array")
    return display


def render_film(image: ImageResult, max_size: int = 2048, out: np.ndarray | None = None) -> Film:
    """The display image (long side at most ``max_size``) with the masked, feathered CAM
    and the lung contour, each map brought once from where it lives to where it is drawn;
    ``out``: where to draw the RGB film (see :func:`blend_cam`)."""
    display = _display_of(image)
    gray = np.ascontiguousarray(fit_gray(display, max_size), dtype=np.uint8)
    shape = (int(gray.shape[0]), int(gray.shape[1]))
    grid = _grid_with_cam(image)
    box = (
        box_on(grid, shape)
        if grid is not None
        else _scaled_box(image.cam_box, display.shape, shape)
    )
    # body, fade and CAM at the coarse grid, multiplied there; one upscale to film size
    coarse = _coarse_shape(shape)
    mask, lungs = _lungs(image, shape, coarse)
    small = _resize_u8(gray, coarse, Image.Resampling.BOX)
    weight = coarse_fade(_coarse_body(small, lungs), shape, box)
    drawn, window = _drawn_cam(_coarse_cam(image, coarse), weight, shape, box)
    rgb = blend_cam(gray, drawn, window, out)
    main = None
    if mask is not None and mask.any():
        main = main_lungs(mask)
        _draw_contour(rgb, main, thickness=max(1, min(shape) // 300))
    return Film(rgb=rgb, gray=gray, cam=drawn, lungs=main, lung_mask=mask, box=box)


# ------------------------------------------------------------------------------------------
# Text in the margins


@dataclass(frozen=True)
class TextLine:
    text: str
    colour: Colour = TEXT_RGB


@dataclass(frozen=True)
class HeatmapText:
    """What is burned into the margins: above the film the calls, below it the rest."""

    header: list[TextLine]
    footer: list[TextLine]
    scale_caption: str = "COVID-19 activation (CAM, relative to this image's maximum)"

    @property
    def lines(self) -> list[str]:
        return [line.text for line in (*self.header, *self.footer)] + [self.scale_caption]


def heatmap_text(
    image: ImageResult,
    result: StudyResult,
    statement: OperatingPointStatement,
    disclaimer: str,
) -> HeatmapText:
    """The burned-in text: both calls with their probabilities, the view, the operating
    point, model@version and what the probabilities are, the disclaimer."""
    probs = image.probabilities or {}
    covid = "POSITIVE" if image.covid_positive else "NEGATIVE"
    pneumonia = pneumonia_present(probs) if probs else False
    view = view_caption(image.view, image.view_source, image.view_image)
    header = [
        TextLine(
            f"COVID-19: {covid}, probability {probs.get('covid', float('nan')):.3f}"
            f" (threshold {result.threshold.value:.4f})",
            POSITIVE_RGB if image.covid_positive else NEGATIVE_RGB,
        ),
        TextLine(
            f"Pneumonia: {'PRESENT' if pneumonia else 'ABSENT'}, probability "
            f"{probs.get('pneumonia', float('nan')):.3f} (present when the most probable class)",
            POSITIVE_RGB if pneumonia else NEGATIVE_RGB,
        ),
        TextLine(f"Normal: probability {probs.get('normal', float('nan')):.3f}. View: {view}"),
    ]
    model = f"Model {result.model.ref} ({result.model.scheme} scheme)"
    if statement.calibration_short:
        model += f"; {statement.calibration_short}"
    footer = [
        TextLine(f"{statement.headline()}; {statement.origin()}"),
        TextLine(model),
        TextLine(disclaimer, DISCLAIMER_RGB),
    ]
    return HeatmapText(header=header, footer=footer)


@lru_cache(maxsize=4096)
def _word_width(size: int, word: str) -> float:
    """Pixel width of a word in the margin font (cached: the texts repeat from image to
    image, so a worker measures each word once)."""
    return float(_font(size).getlength(word))


def _wrap(text: str, size: int, width: int) -> list[str]:
    """Greedy word wrap measured in pixels, word by word (a word wider than the line is
    cut). Sums of word widths ignore kerning, hence the 2% slack."""
    usable = width * 0.98
    space = _word_width(size, " ")
    lines: list[str] = []
    current: list[str] = []
    used = 0.0
    for word in text.split():
        w = _word_width(size, word)
        while w > usable and len(word) > 1:  # an overlong token (a UID, say): cut it
            cut = max(1, int(len(word) * usable / w) - 1)
            if current:
                lines.append(" ".join(current))
                current, used = [], 0.0
            lines.append(word[:cut])
            word = word[cut:]
            w = _word_width(size, word)
        if current and used + space + w > usable:
            lines.append(" ".join(current))
            current, used = [], 0.0
        used += (space if current else 0.0) + w
        current.append(word)
    if current:
        lines.append(" ".join(current))
    return lines or [""]


@lru_cache(maxsize=FOOTER_CACHE)
def _footer(
    lines: tuple[TextLine, ...], width: int, size: int, scale_caption: str | None
) -> np.ndarray:
    """The band below the film (:func:`_margin`), cached, read only: the footer (operating
    point, model, disclaimer, scale) is the same for every image of a run at one film
    width, and costs as much to draw as the film. The header holds the image's own
    probabilities and is drawn each time: cached with the footers, it only pushed them out
    (films of a few different widths missed every time)."""
    return _margin(lines, width, size, scale_caption)


def _margin(
    lines: tuple[TextLine, ...],
    width: int,
    size: int,
    scale_caption: str | None = None,
) -> np.ndarray:
    """A black band with ``lines`` (and, with a ``scale_caption``, the colour scale on top:
    the colour map from low to high, then the caption saying what it measures), read
    only."""
    font = _font(size)
    line_height = int(size * 1.3)
    pad = max(2, line_height // 4)
    usable = max(8, width - 2 * pad)
    wrapped: list[tuple[str, Colour]] = []
    for line in lines:
        wrapped += [(part, line.colour) for part in _wrap(line.text, size, usable)]
    scale_rows = 0
    caption_lines: list[str] = []
    if scale_caption is not None:
        caption_lines = _wrap(scale_caption, size, usable)
        scale_rows = 1 + len(caption_lines)
    height = line_height * (len(wrapped) + scale_rows) + 2 * pad
    band = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    y = pad
    if scale_caption is not None:
        low, high = "low", "high"
        x0 = pad + int(_word_width(size, low + " "))
        x1 = max(x0 + 16, width - pad - int(_word_width(size, " " + high)))
        bar = _colormap_lut()[np.linspace(0, 255, x1 - x0).astype(np.uint8)]
        bar_h = max(4, int(line_height * 0.7))
        strip = Image.fromarray(np.repeat(bar[None], bar_h, axis=0), mode="RGB")
        band.paste(strip, (x0, y + (line_height - bar_h) // 2))
        draw.text((pad, y), low, fill=TEXT_RGB, font=font)
        draw.text((x1 + int(_word_width(size, " ")), y), high, fill=TEXT_RGB, font=font)
        y += line_height
        for part in caption_lines:
            draw.text((pad, y), part, fill=TEXT_RGB, font=font)
            y += line_height
    for part, colour in wrapped:
        draw.text((pad, y), part, fill=colour, font=font)
        y += line_height
    pixels = np.asarray(band, dtype=np.uint8)
    pixels.flags.writeable = False
    return pixels


@dataclass
class Rendering:
    """The SC pixels and where the film sits in them (``top``/``left``: its first row and
    column; everything else is margin)."""

    pixels: np.ndarray  # H x W x 3 uint8
    top: int
    left: int
    film: Film
    text: HeatmapText

    @property
    def film_pixels(self) -> np.ndarray:
        rows, cols = self.film.gray.shape
        return self.pixels[self.top : self.top + rows, self.left : self.left + cols]


def render(
    image: ImageResult,
    result: StudyResult,
    disclaimer: str,
    max_size: int = 2048,
    statement: OperatingPointStatement | None = None,
) -> Rendering:
    """Film (long side at most ``max_size``) with text margins above and below it; a film
    narrower than ``MIN_TEXT_WIDTH`` is centred between black side margins."""
    rows, cols = _fit_shape(_display_of(image).shape, max_size)
    statement = statement or statement_for(result.threshold, result.model)
    text = heatmap_text(image, result, statement, disclaimer)
    width = max(cols, MIN_TEXT_WIDTH)
    size = max(10, min(rows, width) // 38)
    top = _margin(tuple(text.header), width, size)
    bottom = _footer(tuple(text.footer), width, size, text.scale_caption)
    left = (width - cols) // 2
    above, below = top.shape[0], bottom.shape[0]
    # every pixel written once: the margins copied, the film drawn in place
    pixels = np.empty((above + rows + below, width, 3), dtype=np.uint8)
    pixels[:above] = top
    pixels[above : above + rows, :left] = 0
    pixels[above : above + rows, left + cols :] = 0
    pixels[above + rows :] = bottom
    film = render_film(image, max_size, out=pixels[above : above + rows, left : left + cols])
    return Rendering(pixels=pixels, top=above, left=left, film=film, text=text)


def build_heatmap_sc(
    image: ImageResult,
    source: Dataset,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    *,
    instance_number: int,
    created_at: datetime,
    statement: OperatingPointStatement | None = None,
) -> Dataset:
    """The RGB Secondary Capture of one screened image, in the source's study (built as
    highdicom's ``SCImage.from_ref_dataset`` built it: :mod:`screener.reports.sc_document`)."""
    disclaimer = disclaimer_of(result, settings)
    statement = statement or statement_for(result.threshold, result.model, settings)
    rendering = render(image, result, disclaimer, settings.reports.heatmap_max_size, statement)
    orientation = source.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2
    sc = secondary_capture(
        source,
        rendering.pixels,  # copied once, into Pixel Data (colour-by-pixel)
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance(image.source.sop_instance_uid),
        instance_number=instance_number,
        patient_orientation=(orientation[0], orientation[1]) if known else ("L", "F"),
        series_description=SERIES_DESCRIPTION,
        equipment=Equipment(
            manufacturer=settings.reports.manufacturer,
            contributing=[processing_equipment(result, settings)],
            **common_attributes(result, settings),  # type: ignore[arg-type]
        ),
        specific_character_set=output_character_set(
            source,
            [disclaimer, settings.reports.manufacturer, settings.reports.institution_name],
        ),
        content_datetime=created_at,
    )
    if not known:
        sc["PatientOrientation"].value = ""  # unknown: Type 2, left empty rather than guessed
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"
    sc.DerivationDescription = (
        f"Class activation map of {result.model.ref} blended over the source image inside "
        f"the body and the classifier's crop; lung contour; text in margins around the "
        f"image (it starts at row {rendering.top}, column {rendering.left}); "
        f"{statement.headline()}"
    )[:1024]
    sc.ImageComments = "\n".join(text for text in rendering.text.lines)[:10240]
    sc.LossyImageCompression = source.get("LossyImageCompression", "00") or "00"
    src = Dataset()
    src.ReferencedSOPClassUID = image.source.sop_class_uid
    src.ReferencedSOPInstanceUID = image.source.sop_instance_uid
    sc.SourceImageSequence = [src]
    # a screened image is a chest radiograph (the screenability gate takes an empty Body
    # Part Examined for one): said so when the source leaves it out, or a validator must
    # ask for the series' Laterality (Type 2C, required for a paired body part)
    sc.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    if source.get("StudyDescription"):
        sc.StudyDescription = source.StudyDescription
    sc.ConversionType = "WSD"  # workstation: rendered by the screener, not digitised film
    return sc
