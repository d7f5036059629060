"""The screenability gate: which received objects the models may screen, and why not.

A PACS sends whole studies: besides the radiographs come dose reports, key object
selections, presentation states, secondary captures, CT slices, raw "for processing"
detector images. The model was trained on frontal and lateral projection radiographs of
the chest, displayed for presentation, greyscale, one frame; anything else would get a
score that means nothing (a test pattern was once called COVID POSITIVE), and the study
score is the maximum over images. One function, :func:`screenability`, decides for the
listener (whether a late object re-opens a study), the workers' prepare stage and offline
``screener screen``, on the header alone, in this order:

====================  ==============================================================
code                  refused because
====================  ==============================================================
``not_image``         no pixel data, no Rows/Columns (SR, KOS, presentation state, ...)
``secondary_capture`` a Secondary Capture SOP class (screenshots, test patterns, ...)
``for_processing``    DX For Processing class, or Presentation Intent FOR PROCESSING
``not_projection``    SOP class not in ``screening.sop_classes``, or Modality not in
                      ``screening.modalities`` (CT, MR, US, XA, mammography, ...)
``derived``           Image Type DERIVED\\SECONDARY (post-processed, not a radiograph)
``not_chest``         Body Part Examined, else Anatomic Region Sequence, names
                      something else (both empty: accepted, as many CRs carry neither)
``multi_frame``       Number of Frames above 1
``colour``            Samples per Pixel not 1, or not MONOCHROME1/MONOCHROME2
``too_small``         Rows or Columns below ``screening.min_size``
``too_large``         Rows x Columns above ``screening.max_pixels``: a header that claims
                      65535 x 65535 would make the decoder allocate gigabytes first
====================  ==============================================================

Frontal versus lateral is *not* decided here: laterals of the chest are screenable
objects that the view filter sets aside (a lateral-only study gets a "not performed" SR).
Reasons name the attribute and only coded values (CS, UIDs), never free text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from screener.settings import ScreeningSettings

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)
FOR_PROCESSING_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral - For Processing
    }
)
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double, plain Pixel Data
_CS_VALUE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


@dataclass(frozen=True)
class Refusal:
    """Why an object is not screened: a stable code and a human-readable reason."""

    code: str
    reason: str

    def __str__(self) -> str:
        return self.reason


def _coded(value: object) -> str:
    """A CS value for a reason text, or a placeholder when it is not a plain defined term."""
    text = str(value or "").strip().upper()
    return text if _CS_VALUE.match(text) else "(non-standard value)"


def sop_class_name(uid: str) -> str:
    """The registered name of a SOP class, or 'private SOP class' (never free text)."""
    name = UID(uid).name if uid else ""
    return name if name and name != uid else "private or unknown SOP class"


def _chest_region(ds: Dataset, settings: ScreeningSettings) -> bool | None:
    """True/False when Body Part Examined or Anatomic Region Sequence say; None if neither."""
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part:
        return part in {p.upper() for p in settings.body_parts}
    codes = [str(item.get("CodeValue", "") or "") for item in ds.get("AnatomicRegionSequence", [])]
    codes = [c for c in codes if c]
    if codes:
        return any(c in settings.anatomic_region_codes for c in codes)
    return None


def screenability(
    ds: Dataset, settings: ScreeningSettings, *, has_pixel_data: bool | None = None
) -> Refusal | None:
    """None when ``ds`` (a header; pixels not needed) may be screened, else the refusal.

    ``has_pixel_data`` says whether the object holds pixel data when ``ds`` was read
    without it; None: look for the Pixel Data elements in ``ds`` itself.
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if has_pixel_data is None:
        has_pixel_data = any(BaseTag(tag) in ds for tag in PIXEL_DATA_TAGS)
    if not has_pixel_data or "Rows" not in ds or "Columns" not in ds:
        return Refusal("not_image", f"not an image ({sop_class_name(sop_class)})")
    configured = sop_class in settings.sop_classes
    if sop_class in SECONDARY_CAPTURE_CLASSES and not configured:
        return Refusal("secondary_capture", "derived image: secondary capture")
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if (sop_class in FOR_PROCESSING_CLASSES and not configured) or intent == "FOR PROCESSING":
        return Refusal("for_processing", "for-processing image (raw detector data)")
    if not configured:
        return Refusal(
            "not_projection",
            f"not a projection radiograph of a screened class ({sop_class_name(sop_class)})",
        )
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in {m.upper() for m in settings.modalities}:
        return Refusal(
            "not_projection", f"not a projection radiograph (Modality {_coded(modality)})"
        )
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if (
        not settings.accept_derived
        and image_type[:1] == ["DERIVED"]
        and image_type[1:2] == ["SECONDARY"]
    ):
        return Refusal("derived", "derived image: Image Type DERIVED\\SECONDARY")
    chest = _chest_region(ds, settings)
    if chest is False:
        if str(ds.get("BodyPartExamined", "") or "").strip():
            where = f"Body Part Examined {_coded(ds.BodyPartExamined)}"
        else:
            where = "Anatomic Region Sequence"
        return Refusal("not_chest", f"not the chest ({where})")
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        return Refusal("multi_frame", f"multi-frame image ({n_frames} frames)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return Refusal("colour", f"colour image (Photometric Interpretation {_coded(photometric)})")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if min(rows, cols) < settings.min_size:
        return Refusal("too_small", f"too small ({rows} x {cols}, minimum {settings.min_size})")
    if rows * cols > settings.max_pixels:
        return Refusal(
            "too_large",
            f"too large ({rows} x {cols} = {rows * cols} pixels, maximum {settings.max_pixels})",
        )
    return None


def read_header(path: Path | str) -> tuple[Dataset, bool]:
    """The data set up to Pixel Data, and whether pixel data follows (pixels not read)."""
    seen: list[int] = []

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag >= 0x7FE00008:
            seen.append(int(tag))
            return True
        return False

    with open(path, "rb") as fh:
        ds = pydicom.filereader.read_partial(fh, stop_when=stop)
    return ds, bool(seen) and seen[0] in PIXEL_DATA_TAGS


def pixel_data_follows(ds: Dataset, next_tag: int | None) -> bool:
    """``has_pixel_data`` for a header parsed from memory up to Pixel Data (7FE0,0010)
    (:func:`screener.dicom.dataset_check.read_header_dataset`), ``next_tag`` the tag of the
    top-level element that follows it (None: none). The rule of :func:`read_header`: the
    first element at or after (7FE0,0008) is one of :data:`PIXEL_DATA_TAGS`.
    """
    later = [int(tag) for tag in ds.keys() if tag >= 0x7FE00008]
    first = min(later) if later else next_tag
    return first is not None and first in PIXEL_DATA_TAGS


def screenability_of_file(path: Path | str, settings: ScreeningSettings) -> Refusal | None:
    """:func:`screenability` of a DICOM file, reading its header only."""
    ds, has_pixels = read_header(path)
    return screenability(ds, settings, has_pixel_data=has_pixels)
