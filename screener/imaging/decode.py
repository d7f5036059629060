"""DICOM pixel data -> a MONOCHROME2 float image in [0, 1], or a reason it cannot be screened.

Order of operations (DICOM PS3.3 C.11 grayscale pipeline): stored values -> modality LUT
(rescale slope/intercept or LUT) -> VOI LUT or window (first one given) -> MONOCHROME1 is
inverted so bones are bright in every image. Full bit depth is kept until the very end.
Compressed transfer syntaxes are decoded by pydicom's pylibjpeg / RLE plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut


class NotScreenable(Exception):
    """The object is valid DICOM but is not a single-frame grayscale image we can screen."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 HxW in [0, 1], MONOCHROME2 (bright = dense)
    photometric: str  # as stored, before any inversion
    bits_stored: int


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file (pixel data included); raises on anything that is not DICOM."""
    return pydicom.dcmread(str(path), force=False)


def check_screenable(ds: Dataset) -> None:
    """Raise :class:`NotScreenable` with the reason for non-image, multi-frame or colour objects."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotScreenable("non-image object (no pixel data)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise NotScreenable(f"multi-frame image ({frames} frames)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotScreenable(f"colour image ({photometric or 'unknown'}, {samples} samples)")


def to_unit_range(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's own min and max (constant images become zeros)."""
    values = values.astype(np.float32, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    out = values - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS (WindowCenter/Width may hold several)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)  # type: ignore[arg-type]
    return float(value[0])  # type: ignore[index]


def modality_lut(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale slope/intercept in float32 (fast path), or pydicom's Modality LUT Sequence."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID), float32."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))).astype(
            np.float32
        )
    if function == "LINEAR_EXACT":
        offset, scale = center, 1.0 / max(width, 1e-6)
    else:
        if width < 1:
            raise ValueError(f"window width {width} < 1 is invalid for LINEAR")
        offset, scale = center - 0.5, 1.0 / max(width - 1.0, 1e-6)
    out = values.astype(np.float32, copy=True)
    out -= np.float32(offset)
    out *= np.float32(scale)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def decode_pixels(ds: Dataset) -> DecodedImage:
    """Apply modality LUT, VOI LUT/window and MONOCHROME1 inversion; see the module docstring."""
    check_screenable(ds)
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise NotScreenable(f"unexpected pixel array shape {stored.shape}")
    values = modality_lut(stored, ds)
    if "VOILUTSequence" in ds:
        voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        pixels = to_unit_range(np.asarray(voi, dtype=np.float32))
    else:
        pixels = _window_or_stretch(values, ds)
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "MONOCHROME1":
        pixels = np.subtract(1.0, pixels, out=pixels)
    return DecodedImage(
        pixels=pixels, photometric=photometric, bits_stored=int(ds.get("BitsStored", 8))
    )


def _window_or_stretch(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values to [0, 1]: the VOI window of the tags (mapped straight onto the display
    range, no further stretching), else the full range of the values."""
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return window(
            values,
            _first(ds.WindowCenter),
            _first(ds.WindowWidth),
            str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"),
        )
    return to_unit_range(values)


def _lut_input_range(stored: np.ndarray) -> tuple[int, int] | None:
    """(min, max) of integer pixel data small enough for a lookup table, else None."""
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return None
    return int(stored.min()), int(stored.max())


def decode_display(ds: Dataset) -> tuple[np.ndarray, str]:
    """The uint8 MONOCHROME2 display image and the stored photometric interpretation.

    Same transform as :func:`decode_pixels` followed by rounding to 8 bits, but computed as
    one lookup table over the stored integer range (full precision inside the table, a
    single pass over the pixels); falls back to the float path for LUT sequences, float or
    32-bit data.
    """
    check_screenable(ds)
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise NotScreenable(f"unexpected pixel array shape {stored.shape}")
    photometric = str(ds.PhotometricInterpretation).upper()
    span = _lut_input_range(stored)
    if span is None or "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        pixels = decode_pixels(ds).pixels
    else:
        lo, hi = span
        levels = np.arange(lo, hi + 1, dtype=np.float32)
        table = _window_or_stretch(modality_lut(levels, ds), ds)
        if photometric == "MONOCHROME1":
            table = 1.0 - table
        lut = np.clip(np.rint(table * 255.0), 0, 255).astype(np.uint8)
        offset = stored.astype(np.int32) - lo if lo != 0 else stored
        return lut[offset], photometric
    scaled = np.clip(pixels, 0.0, 1.0) * np.float32(255.0)
    scaled += np.float32(0.5)
    return scaled.astype(np.uint8), photometric
