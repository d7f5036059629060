"""DICOM pixel data -> a MONOCHROME2 float image in [0, 1], or a reason it cannot be screened.

Order of operations (DICOM PS3.3 C.11 grayscale pipeline): stored values -> modality LUT
(rescale slope/intercept or LUT) -> VOI LUT or window (first one given) -> MONOCHROME1 is
inverted so bones are bright in every image. Full bit depth is kept until the very end.
Compressed transfer syntaxes are decoded by pydicom's pylibjpeg / RLE plugins.

JPEG 2000 and HTJ2K hold the image as wavelet resolution levels: a consumer that needs a
long side of ``min_size`` pixels gets the smallest level that still has it (OpenJPEG's
reduced-resolution decode, through Pillow's bundled OpenJPEG), at a fraction of a full
decode's cost (2048 px 12-bit lossless: ~100 ms at one level down, ~10 ms at three, against
~360 ms). The grayscale pipeline above is then applied to the reduced stored values, so
LUTs, windows and MONOCHROME1 behave exactly as at full size.

Pixel Padding Value (0028,0120), with Pixel Padding Range Limit (0028,0121), marks stored
values that are not image (a collimator border): they are left out of the min/max stretch
and shown black, else a border of 0 squeezes the anatomy into half the grey levels. Images
without it are decoded exactly as before. A window that cannot be used (empty, width 0) is
ignored and the image is stretched by its own range, as if it had none.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
)

log = logging.getLogger(__name__)

#: Rows x Columns x frames x samples above this are refused before any pixel is decoded: the
#: decoder allocates what the header claims (65535 x 65535 x 16 bit = 8.6 GB) before it
#: notices the data is short. = the default of ``screening.max_pixels``, which callers pass.
MAX_PIXELS = 50_000_000

#: Single-component wavelet syntaxes a reduced resolution can be decoded from.
WAVELET_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})


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


def check_screenable(ds: Dataset, max_pixels: int = MAX_PIXELS) -> None:
    """Raise :class:`NotScreenable` with the reason for non-image, multi-frame, colour or
    oversized objects (the size before ``pixel_array`` allocates it)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotScreenable("non-image object (no pixel data)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise NotScreenable(f"multi-frame image ({frames} frames)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotScreenable(f"colour image ({photometric or 'unknown'}, {samples} samples)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    total = rows * cols * max(frames, 1) * max(samples, 1)
    if total > max_pixels:
        raise NotScreenable(f"too large ({rows} x {cols} = {total} pixels, maximum {max_pixels})")


@dataclass(frozen=True)
class Codestream:
    """What the main header of a JPEG 2000 codestream says about the image (PS3.5 A.4.4)."""

    rows: int
    columns: int
    components: int
    precision: int  # bits of component 0
    signed: bool
    levels: int  # wavelet decomposition levels: resolutions 0..levels can be decoded


def parse_codestream(data: bytes) -> Codestream:
    """SIZ and COD/COC of a J2K/HTJ2K codestream's main header (ISO/IEC 15444-1 A.5, A.6).

    Raises ValueError when the bytes are not a codestream this module understands.
    """
    if data[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ
        raise ValueError("not a JPEG 2000 codestream (no SOC/SIZ)")
    (_lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz) = struct.unpack(">HHIIII", data[4:24])
    (csiz,) = struct.unpack(">H", data[40:42])
    ssiz = data[42]
    levels: int | None = None
    pos = 4 + _lsiz
    while pos + 4 <= len(data):
        marker, length = struct.unpack(">HH", data[pos : pos + 4])
        if marker in (0xFF90, 0xFF93, 0xFFD9):  # SOT / SOD / EOC: main header ends
            break
        if marker == 0xFF52:  # COD: Scod, SGcod (4), SPcod: decomposition levels first
            cod_levels = data[pos + 9]
            levels = cod_levels if levels is None else min(levels, cod_levels)
        elif marker == 0xFF53:  # COC: Ccoc is 1 byte when Csiz < 257, then Scoc, SPcoc
            at = pos + 4 + (1 if csiz < 257 else 2) + 1
            levels = data[at] if levels is None else min(levels, data[at])
        pos += 2 + length
    if levels is None:
        raise ValueError("JPEG 2000 codestream without a COD marker")
    return Codestream(
        rows=ysiz - yosiz,
        columns=xsiz - xosiz,
        components=csiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def reduction_for(rows: int, columns: int, levels: int, min_size: int) -> int:
    """The most halvings (at most ``levels``) that keep the long side >= ``min_size``."""
    reduce = 0
    while reduce < levels and -(-max(rows, columns) // (2 ** (reduce + 1))) >= min_size:
        reduce += 1
    return reduce


def _reduced_wavelet(ds: Dataset, min_size: int) -> np.ndarray | None:
    """Stored values at the smallest resolution level whose long side is >= ``min_size``;
    None when the full resolution is needed or the codestream is not one we reduce safely
    (the caller then decodes it in full through pydicom)."""
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    info = parse_codestream(frame)
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (
        info.components != 1
        or info.precision != bits_stored
        or info.signed != signed
        or info.precision > 16
        or (info.rows, info.columns) != (int(ds.Rows), int(ds.Columns))
    ):
        return None  # header and codestream disagree: pydicom's full decode sorts it out
    reduce = reduction_for(info.rows, info.columns, info.levels, min_size)
    if reduce == 0:
        return None
    with Image.open(io.BytesIO(frame)) as image:
        image.reduce = reduce  # type: ignore[assignment,method-assign]
        image.load()
        # Pillow scales to its mode's width: value << (8 or 16 - precision), signed data offset
        width = 8 if image.mode == "L" else 16
        values: np.ndarray = np.asarray(image).astype(np.int32 if signed else np.uint16)
    if width - info.precision:
        values = np.right_shift(values, width - info.precision)
    if signed:
        values = (values - (1 << (info.precision - 1))).astype(np.int16)
    expected = (-(-info.rows // 2**reduce), -(-info.columns // 2**reduce))
    if values.shape != expected:
        raise ValueError(f"reduced decode gave {values.shape}, expected {expected}")
    return values


def stored_pixels(ds: Dataset, min_size: int | None = None) -> np.ndarray:
    """The stored values; for JPEG 2000 / HTJ2K with ``min_size``, at the smallest
    resolution level whose long side is still at least ``min_size`` (else full size)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if min_size is not None and syntax in WAVELET_SYNTAXES:
        try:
            reduced = _reduced_wavelet(ds, min_size)
        except Exception as exc:  # anything unexpected: the full decode decides
            log.debug("reduced JPEG 2000 decode not used: %s", exc)
            reduced = None
        if reduced is not None:
            return reduced
    return ds.pixel_array


def to_unit_range(values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Scale to [0, 1] by the image's own min and max (constant images become zeros);
    ``keep``: the values that count for min and max (None: all; padding is left out)."""
    values = values.astype(np.float32, copy=False)
    counted = values if keep is None else values[keep]
    if not counted.size:
        return np.zeros_like(values, dtype=np.float32)
    lo, hi = float(counted.min()), float(counted.max())
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


def _padding(ds: Dataset) -> tuple[int, int] | None:
    """The stored values that are padding, [low, high] inclusive: Pixel Padding Value alone,
    or with Pixel Padding Range Limit (either order). None: no padding, or values that
    cannot be read (the image is then decoded as if it had none)."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        value = ds.PixelPaddingValue
        if value is None or value == "" or isinstance(value, bytes):
            return None
        low = int(_first(value))
        limit = ds.get("PixelPaddingRangeLimit")
        high = low if limit in (None, "") or isinstance(limit, bytes) else int(_first(limit))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(low, high), max(low, high)


def _is_padding(stored: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    """Mask of the padding pixels of integer stored values (none for float data)."""
    if stored.dtype.kind not in "iu":
        return np.zeros(stored.shape, dtype=bool)
    low, high = padding
    if low == high:
        return np.asarray(stored == low)
    return np.asarray((stored >= low) & (stored <= high))


def _usable_window(ds: Dataset) -> tuple[float, float, str] | None:
    """(center, width, function) of the window tags, or None when they are absent or cannot
    be used (empty, not numbers, width below 1 for LINEAR or not above 0 otherwise): such a
    window is ignored rather than failing an otherwise good image."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    if width < 1 if function not in ("LINEAR_EXACT", "SIGMOID") else width <= 0:
        return None
    return center, width, function


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


def decode_pixels(
    ds: Dataset, min_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> DecodedImage:
    """Apply modality LUT, VOI LUT/window and MONOCHROME1 inversion; see the module docstring.
    ``min_size``: the long side the caller needs (JPEG 2000 is then decoded no larger);
    ``max_pixels``: larger headers are refused before decoding."""
    check_screenable(ds, max_pixels)
    stored = stored_pixels(ds, min_size)
    if stored.ndim != 2:
        raise NotScreenable(f"unexpected pixel array shape {stored.shape}")
    return DecodedImage(
        pixels=_grayscale(stored, ds),
        photometric=str(ds.PhotometricInterpretation).upper(),
        bits_stored=int(ds.get("BitsStored", 8)),
    )


def _grayscale(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> [0, 1] MONOCHROME2 floats (modality LUT, VOI, MONOCHROME1), padding
    pixels left out of any stretch and black."""
    padding = _padding(ds)
    pad = None if padding is None else _is_padding(stored, padding)
    keep = None if pad is None else ~pad
    values = modality_lut(stored, ds)
    if "VOILUTSequence" in ds:
        voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        pixels = to_unit_range(np.asarray(voi, dtype=np.float32), keep)
    else:
        pixels = _window_or_stretch(values, ds, keep)
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "MONOCHROME1":
        pixels = np.subtract(1.0, pixels, out=pixels)
    if pad is not None:
        pixels[pad] = 0.0
    return pixels


def _window_or_stretch(
    values: np.ndarray, ds: Dataset, keep: np.ndarray | None = None
) -> np.ndarray:
    """Modality values to [0, 1]: the VOI window of the tags (mapped straight onto the display
    range, no further stretching), else the range of the values in ``keep`` (None: all)."""
    usable = _usable_window(ds)
    if usable is not None:
        return window(values, *usable)
    return to_unit_range(values, keep)


def _lut_input_range(stored: np.ndarray) -> tuple[int, int] | None:
    """(min, max) of integer pixel data small enough for a lookup table, else None."""
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return None
    return int(stored.min()), int(stored.max())


#: Pixels looked up per ``np.take`` call (see :func:`_look_up`).
LOOKUP_BAND_PIXELS = 1 << 19


def _look_up(stored: np.ndarray, lut: np.ndarray, lo: int) -> np.ndarray:
    """``lut[stored - lo]`` for 8/16-bit integers, without the wide index array that costs.

    The table is spread over every value of the stored type, indexed by the pixels' bits
    read as unsigned (a negative int16 -1 is entry 65535), so ``np.take`` reads the pixels
    as they are: 7 ms instead of 15 for a 2048 x 2048 film (benchmarks/pipeline.py's prepare).
    ``np.take`` still widens its indices to ``intp``; a band of rows at a time keeps that
    copy small and in cache instead of a fresh 32 MB array per film (4.7 -> 2.3 ms).
    """
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    unsigned = np.dtype(f"u{stored.dtype.itemsize}")
    table = np.empty(1 << (8 * stored.dtype.itemsize), dtype=np.uint8)
    entries = (np.arange(lo, lo + len(lut), dtype=np.int64) % len(table)).astype(np.intp)
    table[entries] = lut  # values outside [lo, hi] do not occur in ``stored``
    indices = stored.view(unsigned)
    out = np.empty(stored.shape, dtype=np.uint8)
    band = max(1, LOOKUP_BAND_PIXELS // max(1, stored.shape[-1]))
    for start in range(0, stored.shape[0], band):
        np.take(table, indices[start : start + band], out=out[start : start + band])
    return out


def decode_display(
    ds: Dataset, min_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, str]:
    """The uint8 MONOCHROME2 display image and the stored photometric interpretation.

    Same transform as :func:`decode_pixels` followed by rounding to 8 bits, but computed as
    one lookup table over the stored integer range (full precision inside the table, a
    single pass over the pixels); falls back to the float path for LUT sequences, float or
    32-bit data. ``min_size`` and ``max_pixels`` as for :func:`decode_pixels`.
    """
    check_screenable(ds, max_pixels)
    stored = stored_pixels(ds, min_size)
    if stored.ndim != 2:
        raise NotScreenable(f"unexpected pixel array shape {stored.shape}")
    photometric = str(ds.PhotometricInterpretation).upper()
    span = _lut_input_range(stored)
    if span is None or "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        pixels = _grayscale(stored, ds)
    else:
        lo, hi = span
        levels = np.arange(lo, hi + 1, dtype=np.float32)
        padding = _padding(ds)
        pad_levels: np.ndarray | None = None
        keep: np.ndarray | None = None
        if padding is not None:
            # the stretch spans the image's non-padding values, as on the float path
            pad_levels = _is_padding(np.arange(lo, hi + 1, dtype=np.int64), padding)
            image = stored[~_is_padding(stored, padding)]
            keep = ~pad_levels
            if image.size:
                keep &= (levels >= float(image.min())) & (levels <= float(image.max()))
        table = _window_or_stretch(modality_lut(levels, ds), ds, keep)
        if photometric == "MONOCHROME1":
            table = 1.0 - table
        if pad_levels is not None:
            table[pad_levels] = 0.0
        lut = np.clip(np.rint(table * 255.0), 0, 255).astype(np.uint8)
        return _look_up(stored, lut, lo), photometric
    scaled = np.clip(pixels, 0.0, 1.0) * np.float32(255.0)
    scaled += np.float32(0.5)
    return scaled.astype(np.uint8), photometric
