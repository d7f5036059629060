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

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

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


def _box_blur(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 square, edges padded by reflection (separable cumulative sums)."""
    k = 2 * radius + 1
    out = values.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="reflect"), axis=axis)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        out = (hi - lo) / k
    return out


def _erode3(mask: np.ndarray) -> np.ndarray:
    """3 x 3 erosion (outside the image counts as False)."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + h, dx : dx + w]
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
    return np.clip(2.0 * _box_blur(core, radius) - 1.0, 0.0, 1.0) * core


def main_lungs(mask: np.ndarray) -> np.ndarray:
    """The lung mask without stray islands: its two largest components, found at the
    coarse grid (the segmenter's own resolution is coarser still) and cut from the mask."""
    coarse = _coarse_shape(mask.shape)
    small = _resize_u8(_as_u8(mask), coarse, Image.Resampling.NEAREST) > 0
    keep = ~_erode3(~largest_components(small, keep=2))  # dilated: keeps the lung borders
    return mask & _nearest_up(keep, mask.shape)


# ------------------------------------------------------------------------------------------
# The film: CAM blend and lung contour


def lung_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask (mask minus its 4-neighbour erosion), thickened."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    edge = mask & ~eroded
    for _ in range(max(0, thickness - 1)):
        p = np.pad(edge, 1, mode="constant", constant_values=False)
        edge = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
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
    window[lung_contour(lungs[r0:r1, c0:c1], thickness)] = CONTOUR_RGB


@lru_cache(maxsize=1)
def _blend_lut() -> np.ndarray:
    """65536 x 3 uint8: the RGB blend of grey ``g`` and CAM ``c`` at row ``g << 8 | c``
    (integer arithmetic, opacity in 1/256 units)."""
    g = np.arange(256, dtype=np.uint32)[:, None, None]
    a = _alpha_lut().astype(np.uint32)[None, :, None]
    colours = _colormap_lut().astype(np.uint32)[None, :, :]
    lut = ((g * (256 - a) + colours * a + 128) >> 8).astype(np.uint8)
    return np.ascontiguousarray(lut.reshape(65536, 3))


def blend_cam(gray: np.ndarray, cam8: np.ndarray, window: Window | None = None) -> np.ndarray:
    """RGB uint8: the grey image with the uint8 CAM in the colour map, opacity rising with
    the CAM, by one table lookup per pixel (all three channels at once). Where the CAM is
    below the floor the pixel is the grey value exactly; given the ``window`` outside which
    the CAM is 0, only the window is looked up and the rest is the grey value copied."""
    if gray.shape != cam8.shape:
        raise ValueError(f"CAM shape {cam8.shape} differs from image shape {gray.shape}")
    if window is None:
        window = (0, 0, *gray.shape)
        rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
    else:
        rgb = np.repeat(gray[..., None], 3, axis=2)
    top, left, bottom, right = window
    index = (gray[top:bottom, left:right].astype(np.uint16) << 8) | cam8[top:bottom, left:right]
    # mode="clip": no bounds check (every uint16 is a row)
    rgb[top:bottom, left:right] = np.take(_blend_lut(), index, axis=0, mode="clip")
    return rgb


def fit_gray(gray: np.ndarray, max_size: int) -> np.ndarray:
    """The display image with the longer side at most ``max_size`` (Lanczos)."""
    rows, cols = gray.shape
    if max(rows, cols) <= max_size:
        return gray
    scale = max_size / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.LANCZOS))


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

    rgb: np.ndarray  # H x W x 3 uint8
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
    coarse = np.rint(cam * weight * 255.0).astype(np.uint8)
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


def render_film(image: ImageResult, max_size: int = 2048) -> Film:
    """The display image (long side at most ``max_size``) with the masked, feathered CAM
    and the lung contour, each map brought once from where it lives to where it is drawn."""
    display = image.display_image
    if display is None or not has_heatmap(image):
        raise ValueError(f"image {image.source.sop_instance_uid} has no display image or CAM")
    if display.ndim != 2:
        raise ValueError("display_image must be a 2-D MONOCHROME2 array")
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
    rgb = blend_cam(gray, drawn, window)
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


@lru_cache(maxsize=4)
def _margin(
    lines: tuple[TextLine, ...],
    width: int,
    size: int,
    scale_caption: str | None = None,
) -> np.ndarray:
    """A black band with ``lines`` (and, with a ``scale_caption``, the colour scale on top:
    the colour map from low to high, then the caption saying what it measures).

    Cached, read only: the footer (operating point, model, disclaimer, scale) is the same
    for every image of a run at one film width, and costs as much to draw as the film."""
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
    film = render_film(image, max_size)
    statement = statement or statement_for(result.threshold, result.model)
    text = heatmap_text(image, result, statement, disclaimer)
    rows, cols = film.gray.shape
    width = max(cols, MIN_TEXT_WIDTH)
    size = max(10, min(rows, width) // 38)
    top = _margin(tuple(text.header), width, size)
    bottom = _margin(tuple(text.footer), width, size, scale_caption=text.scale_caption)
    left = (width - cols) // 2
    above, below = top.shape[0], bottom.shape[0]
    pixels = np.zeros((above + rows + below, width, 3), dtype=np.uint8)  # one copy of each
    pixels[:above] = top
    pixels[above : above + rows, left : left + cols] = film.rgb
    pixels[above + rows :] = bottom
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
) -> hd.sc.SCImage:
    """The RGB Secondary Capture of one screened image, in the source's study."""
    disclaimer = disclaimer_of(result, settings)
    statement = statement or statement_for(result.threshold, result.model, settings)
    rendering = render(image, result, disclaimer, settings.reports.heatmap_max_size, statement)
    orientation = source.get("PatientOrientation")
    pixels = rendering.pixels
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        # highdicom checks the array (uint8, 3 samples, RGB) and would encode it with two
        # full copies (flatten, then tobytes): it gets the first row only, and the whole
        # frame is set below with one copy (Rows too; Columns is already the frame's)
        pixel_array=pixels[:1],
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance(image.source.sop_instance_uid),
        instance_number=instance_number,
        manufacturer=settings.reports.manufacturer,
        patient_orientation=(
            tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
        ),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(result, settings)],
        series_description=SERIES_DESCRIPTION,
        specific_character_set=output_character_set(
            source,
            [disclaimer, settings.reports.manufacturer, settings.reports.institution_name],
        ),
        content_date=created_at.date(),
        content_time=created_at.time(),
        **common_attributes(result, settings),  # type: ignore[arg-type]
    )
    sc.Rows = pixels.shape[0]
    sc.PixelData = np.ascontiguousarray(pixels).tobytes()  # colour-by-pixel, as PlanarConfig 0
    if orientation is None or len(orientation) != 2:
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
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("StudyDescription"):
        sc.StudyDescription = source.StudyDescription
    sc.ConversionType = "WSD"  # workstation: rendered by the screener, not digitised film
    return sc
