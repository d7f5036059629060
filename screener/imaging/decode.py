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
    return ((values - lo) / (hi - lo)).astype(np.float32)


def decode_pixels(ds: Dataset) -> DecodedImage:
    """Apply modality LUT, VOI LUT/window and MONOCHROME1 inversion; see the module docstring."""
    check_screenable(ds)
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise NotScreenable(f"unexpected pixel array shape {stored.shape}")
    values = apply_modality_lut(stored, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    pixels = to_unit_range(np.asarray(values))
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return DecodedImage(
        pixels=pixels, photometric=photometric, bits_stored=int(ds.get("BitsStored", 8))
    )
