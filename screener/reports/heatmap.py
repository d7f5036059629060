"""Heatmap secondary capture: the CAM over the radiograph, with the result burned in.

The overlay is what a radiologist sees in any viewer, including ones that know nothing of
parametric maps: the MONOCHROME2 image, the class activation map blended in a perceptual
colour map (matplotlib ``inferno``: monotonic lightness, readable in greyscale), the lung
contour the pipeline used, and burned-in text with the score, the threshold, the call, the
model and the disclaimer. The pixels are RGB and the object says BurnedInAnnotation YES.
"""

from __future__ import annotations

import textwrap
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.reports.common import (
    SC_SERIES_NUMBER,
    common_attributes,
    disclaimer_of,
    output_character_set,
    processing_equipment,
)
from screener.reports.output_uids import OutputUids
from screener.results import ImageResult, StudyResult
from screener.settings import Settings

COLORMAP = "inferno"
MAX_ALPHA = 0.55  # opacity of the hottest CAM value; low activations stay transparent
CAM_FLOOR = 0.15  # activations below this are not drawn at all
CONTOUR_RGB = (64, 224, 255)
SERIES_DESCRIPTION = "AI screening heatmap (not for diagnosis)"


@lru_cache(maxsize=1)
def _colormap_lut() -> np.ndarray:
    """256 x 3 uint8 lookup table of the perceptual colour map."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans shipped with matplotlib (no system font needed), else PIL's default."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # pragma: no cover - matplotlib without its fonts
        return ImageFont.load_default(size)


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


def blend_cam(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """RGB uint8: the grey image with the CAM in the colour map, opacity rising with the CAM."""
    if gray.shape != cam.shape:
        raise ValueError(f"CAM shape {cam.shape} differs from image shape {gray.shape}")
    base = np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)
    cam01 = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    colour = _colormap_lut()[(cam01 * 255.0).astype(np.uint8)].astype(np.float32)
    alpha = np.where(cam01 >= CAM_FLOOR, MAX_ALPHA * cam01, 0.0)[..., None]
    return np.clip(base * (1.0 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def _draw_text_band(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    *,
    width: int,
    top: int | None,
    bottom: int | None,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    line_height: int,
    fills: list[tuple[int, int, int]],
) -> None:
    pad = max(2, line_height // 4)
    band = line_height * len(lines) + 2 * pad
    y0 = top if top is not None else (bottom or 0) - band
    draw.rectangle((0, y0, width, y0 + band), fill=(0, 0, 0))
    for i, (line, fill) in enumerate(zip(lines, fills, strict=True)):
        draw.text((pad, y0 + pad + i * line_height), line, fill=fill, font=font)


def heatmap_lines(image: ImageResult, result: StudyResult) -> tuple[list[str], str]:
    """The burned-in header lines and the call (POSITIVE/NEGATIVE)."""
    score = image.covid_score
    threshold = result.threshold
    call = "POSITIVE" if image.covid_positive else "NEGATIVE"
    sens = (
        f", target sensitivity {threshold.target_sensitivity:.2f}"
        if threshold.target_sensitivity is not None
        else ""
    )
    lines = [
        f"COVID-19 score {score:.3f}  threshold {threshold.value:.3f}  {call}",
        f"model {result.model.ref}  threshold v{threshold.version}{sens}",
    ]
    return lines, call


def fit_within(
    gray: np.ndarray, cam: np.ndarray, mask: np.ndarray | None, max_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Downscale image, CAM and mask together so the longer side is at most ``max_size``."""
    rows, cols = gray.shape
    if max(rows, cols) <= max_size:
        return gray, cam, mask
    scale = max_size / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.LANCZOS))
    cam = np.asarray(
        Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    )
    if mask is not None:
        mask = (
            np.asarray(
                Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
            )
            > 127
        )
    return gray, cam, mask


def render_heatmap(
    image: ImageResult, result: StudyResult, disclaimer: str, max_size: int = 2048
) -> np.ndarray:
    """The RGB overlay (H x W x 3 uint8) at the display geometry, at most ``max_size``."""
    if image.display_image is None or image.cam is None:
        raise ValueError(f"image {image.source.sop_instance_uid} has no display image or CAM")
    if image.display_image.ndim != 2:
        raise ValueError("display_image must be a 2-D MONOCHROME2 array")
    mask = image.lung_mask
    if mask is not None and mask.shape != image.display_image.shape:
        mask = None  # a mask on another grid would draw a wrong contour: leave it out
    gray, cam, mask = fit_within(image.display_image, image.cam, mask, max_size)
    rgb = blend_cam(gray, cam)
    rows, cols = gray.shape
    if mask is not None:
        rgb[lung_contour(mask, thickness=max(1, min(rows, cols) // 300))] = CONTOUR_RGB

    pil = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(pil)
    size = max(9, min(rows, cols) // 38)
    font = _font(size)
    line_height = int(size * 1.3)
    header, call = heatmap_lines(image, result)
    call_colour = (255, 80, 80) if call == "POSITIVE" else (120, 230, 120)
    chars = max(20, int(cols / (size * 0.62)))
    header_lines: list[str] = []
    header_fills: list[tuple[int, int, int]] = []
    for number, line in enumerate(header):
        wrapped = textwrap.wrap(line, width=chars) or [""]
        header_lines += wrapped
        header_fills += [call_colour if number == 0 else (255, 255, 255)] * len(wrapped)
    _draw_text_band(
        draw,
        header_lines,
        width=cols,
        top=0,
        bottom=None,
        font=font,
        line_height=line_height,
        fills=header_fills,
    )
    footer = textwrap.wrap(disclaimer, width=chars)[:3] or [""]
    _draw_text_band(
        draw,
        footer,
        width=cols,
        top=None,
        bottom=rows,
        font=font,
        line_height=line_height,
        fills=[(255, 210, 0)] * len(footer),
    )
    return np.asarray(pil, dtype=np.uint8)


def build_heatmap_sc(
    image: ImageResult,
    source: Dataset,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    *,
    instance_number: int,
    created_at: datetime,
) -> hd.sc.SCImage:
    """The RGB Secondary Capture of one screened image, in the source's study."""
    disclaimer = disclaimer_of(result, settings)
    pixels = render_heatmap(image, result, disclaimer, settings.reports.heatmap_max_size)
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
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
            source, [disclaimer, settings.reports.manufacturer, settings.reports.institution_name]
        ),
        content_date=created_at.date(),
        content_time=created_at.time(),
        **common_attributes(result, settings),  # type: ignore[arg-type]
    )
    if orientation is None or len(orientation) != 2:
        sc["PatientOrientation"].value = ""  # unknown: Type 2, left empty rather than guessed
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"
    sc.DerivationDescription = (
        f"Class activation map of {result.model.ref} blended over the source image; "
        "lung contour and result burned in"
    )[:1024]
    sc.ImageComments = disclaimer[:10240]
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
