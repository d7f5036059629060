"""The prepare stage (CPU): one DICOM file -> the first engine's input and the images the
later stages draw on.

Never raises for bad input: the reason lands in ``PreparedImage.skip_reason``. The header is
judged by the screenability gate first, so a refused object's pixels are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from screener import direct_io
from screener.direct_io import ViewReader
from screener.imaging.decode import NotScreenable, decode_display
from screener.imaging.preprocess import (
    WORK_SIZE,
    limit_display_size,
    limit_size,
    segmenter_input,
)
from screener.imaging.views import view_from_tags
from screener.results import SourceImageRef
from screener.screenability import read_header, screenability
from screener.screening import prepared_file
from screener.settings import Settings


@dataclass
class PreparedImage:
    """Output of the CPU 'prepare' stage; the workers save it to the spool."""

    source: SourceImageRef
    view_tag: str | None = None  # view read from tags (PA/AP/LATERAL/None)
    skip_reason: str | None = None  # set => not screenable
    refused: bool = False  # refused by the screenability gate (not a study image at all)
    network_input: np.ndarray | None = None  # float32 (1, S, S): first engine's input
    display_image: np.ndarray | None = None  # uint8 MONOCHROME2, long side <= heatmap_max_size
    # uint8, long side <= WORK_SIZE: what the classifier's input is cut from (infer reads
    # this, never the display image, which only the report stage loads)
    work_image: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # modality, sex... (no name/ID)

    def save(self, path: Path) -> None:
        """Write the prepared file (:mod:`.prepared_file`: a JSON header, then raw arrays,
        no pickle); in place, not fsynced: prepare rewrites a job's files when it reruns."""
        header = {
            "source": self.source.__dict__,
            "view_tag": self.view_tag,
            "skip_reason": self.skip_reason,
            "refused": self.refused,
            "meta": self.meta,
        }
        arrays: dict[str, np.ndarray] = {}
        if self.network_input is not None:
            arrays["network_input"] = self.network_input
        if self.display_image is not None:
            arrays["display_image"] = self.display_image
        if self.work_image is not None:
            arrays["work_image"] = self.work_image
        path.parent.mkdir(parents=True, exist_ok=True)
        prepared_file.write(path, header, arrays)

    @classmethod
    def load(cls, path: Path, *, display: bool = True) -> PreparedImage:
        """Read a prepared file, also an ``np.savez`` one from the previous version;
        ``display=False`` leaves the display image's bytes unread (infer never needs it)."""
        contents = prepared_file.read(path, skip=() if display else ("display_image",))
        arrays = contents.arrays
        work = arrays.get("work_image")
        if work is None and "display_image" in contents.stored:  # prepared by an older version
            shown = arrays.get("display_image")
            if shown is None:  # skipped above (display=False), but the work image is cut from it
                shown = prepared_file.read(path).arrays["display_image"]
            # a copy: writeable (a resize is read-only) and never the display image itself
            work = np.array(limit_size(shown, WORK_SIZE))
        header = contents.header
        try:
            return cls(
                source=SourceImageRef(**header["source"]),
                view_tag=header["view_tag"],
                skip_reason=header["skip_reason"],
                refused=bool(header.get("refused", False)),
                network_input=arrays.get("network_input"),
                display_image=arrays.get("display_image") if display else None,
                work_image=work,
                meta=header["meta"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: prepared-file header lacks a field ({exc!r})") from None


def _checked_source_ref(ds: pydicom.Dataset, path: Path) -> tuple[SourceImageRef, str | None]:
    """The identifying UIDs and, when one of them cannot be read (a UI element with a wrong
    VR raises on access), why not; an unreadable UID is left empty (or ``unknown:<file>``),
    so that a malformed header is a skipped image, never an exception out of prepare."""
    values: dict[str, str] = {}
    problem: str | None = None
    for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
        try:
            value = ds.get(keyword, "")
        except Exception as exc:  # malformed element value
            value, why = None, type(exc).__name__
        else:  # a wrong VR can also read as a sequence, tags, numbers: not a UID either
            why = "" if value is None or isinstance(value, str) else "not a UID"
        values[keyword] = str(value) if isinstance(value, str) else ""
        if why and problem is None:
            problem = f"{keyword}: {why}"
    source = SourceImageRef(
        sop_instance_uid=values["SOPInstanceUID"] or f"unknown:{path.name}",
        sop_class_uid=values["SOPClassUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"] or f"unknown:{path.name}",
        file_path=str(path),
    )
    return source, problem


def _source_ref(ds: pydicom.Dataset, path: Path) -> SourceImageRef:
    """The identifying UIDs of ``ds``; never raises (see :func:`_checked_source_ref`)."""
    return _checked_source_ref(ds, path)[0]


def _meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """Subgroup attributes for results and evaluation; never names or patient IDs."""
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "sex": str(ds.get("PatientSex", "") or ""),
        "age": str(ds.get("PatientAge", "") or ""),
        "view_position": str(ds.get("ViewPosition", "") or ""),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "") or ""),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
    }


def refused_image(ds: pydicom.Dataset, path: Path, settings: Settings) -> PreparedImage | None:
    """A refused PreparedImage when the screenability gate refuses ``ds``, else None."""
    try:
        refusal = screenability(ds, settings.screening)
    except Exception as exc:  # malformed element values
        reason = f"decode failed: bad header ({type(exc).__name__})"
        return PreparedImage(source=_source_ref(ds, path), skip_reason=reason)
    if refusal is None:
        return None
    return PreparedImage(source=_source_ref(ds, path), skip_reason=refusal.reason, refused=True)


def prepare_dataset(ds: pydicom.Dataset, path: Path, settings: Settings) -> PreparedImage:
    """Prepare one already-read dataset (see :func:`prepare_instance`)."""
    source, problem = _checked_source_ref(ds, path)
    if problem is not None:
        return PreparedImage(source=source, skip_reason=f"decode failed: bad header ({problem})")
    try:
        meta = _meta(ds)
    except Exception as exc:  # malformed element values
        return PreparedImage(source=source, skip_reason=f"decode failed: bad header ({exc})")
    refused = refused_image(ds, path, settings)
    if refused is not None:
        refused.meta = meta
        return refused
    prepared = PreparedImage(source=source, meta=meta)
    try:
        prepared.view_tag = view_from_tags(ds)
        # full resolution, also for JPEG 2000: the networks' input is resized from it, and a
        # reduced wavelet level moves COVID scores by up to 0.05-0.12 (tests/test_reduced_decode)
        full, _ = decode_display(ds, max_pixels=settings.screening.max_pixels)
    except NotScreenable as exc:
        prepared.skip_reason = str(exc)
        return prepared
    except Exception as exc:  # corrupt pixel data, unsupported syntax, ...
        prepared.skip_reason = f"decode failed: {type(exc).__name__}: {exc}"
        return prepared
    # 8 bits from here on: the VOI transform above already chose what is displayed.
    prepared.display_image = limit_display_size(full, settings.reports.heatmap_max_size)
    prepared.work_image = work_image(full)
    prepared.network_input = segmenter_input(prepared.work_image)
    return prepared


# The networks' images are reduced from the film through this fixed long side, whatever the
# heatmap's display size: scores must not depend on how large the SC is drawn (with the
# display image in between, lowering reports.heatmap_max_size from 2048 to 1024 moved
# validation COVID probabilities by up to 0.16). 2048 keeps the scores of every film
# exactly what the shipped model was validated with when the display size was 2048.
SCORING_GRID = 2048


def work_image(full: np.ndarray) -> np.ndarray:
    """The image the networks' inputs are cut from (long side <= WORK_SIZE)."""
    return limit_size(limit_size(full, SCORING_GRID), WORK_SIZE)


def prepare_instance(path: Path, settings: Settings) -> PreparedImage:
    """Decode one DICOM file into the first engine's input; never raises for bad input.

    The header is read first and judged by the screenability gate; the pixels of a refused
    object (a CT series, a dose report) are never read.
    """
    path = Path(path)
    try:
        header, has_pixels = read_header(path)
        refusal = screenability(header, settings.screening, has_pixel_data=has_pixels)
        if refusal is not None:
            return PreparedImage(
                source=_source_ref(header, path), skip_reason=refusal.reason, refused=True
            )
        # the listener writes spool files past the page cache: read them so too
        data = direct_io.read_file(path) if settings.listener.direct_io else None
        ds = pydicom.dcmread(str(path) if data is None else cast(BinaryIO, ViewReader(data)))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        source = SourceImageRef(
            sop_instance_uid=f"unknown:{path.name}",
            sop_class_uid="",
            series_instance_uid="",
            study_instance_uid=f"unknown:{path.name}",
            file_path=str(path),
        )
        return PreparedImage(source=source, skip_reason=f"decode failed: not DICOM ({exc})")
    except Exception as exc:
        source = SourceImageRef(f"unknown:{path.name}", "", "", f"unknown:{path.name}", str(path))
        return PreparedImage(source=source, skip_reason=f"decode failed: {exc}")
    return prepare_dataset(ds, path, settings)
