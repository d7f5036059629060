"""Projection (PA / AP / LATERAL) and body part as the DICOM tags state them.

Tags are often missing or wrong (the thoughtful-evaluation authors had to correct them by
hand), so this is only the tag half of the view filter; the image-based frontal/lateral
classifier decides when the two disagree, and both answers are recorded.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

CHEST_BODY_PARTS = frozenset({"", "CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHEST_PA", "TORSO"})
_LATERAL_POSITIONS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LATERAL_DECUBITUS"})
_TEXT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("LATERAL", re.compile(r"(?<![A-Z])(LAT|LATERAL|LL|RL|SEITLICH|PROFIL)(?![A-Z])")),
    ("PA", re.compile(r"(?<![A-Z])(PA|P\.A\.|POSTERO[- ]?ANTERIOR)(?![A-Z])")),
    ("AP", re.compile(r"(?<![A-Z])(AP|A\.P\.|ANTERO[- ]?POSTERIOR|SUPINE|PORTABLE)(?![A-Z])")),
)


def _from_view_position(value: str) -> str | None:
    value = value.strip().upper()
    if value in ("PA", "AP"):
        return value
    if value in _LATERAL_POSITIONS:
        return "LATERAL"
    return None


def _from_view_code(ds: Dataset) -> str | None:
    for item in ds.get("ViewCodeSequence", []) or []:
        meaning = str(item.get("CodeMeaning", "")).lower()
        if "lateral" in meaning:
            return "LATERAL"
        if "postero-anterior" in meaning or "posteroanterior" in meaning:
            return "PA"
        if "antero-posterior" in meaning or "anteroposterior" in meaning:
            return "AP"
    return None


def _from_patient_orientation(ds: Dataset) -> str | None:
    """Frontal images run L/R along one axis, laterals run A/P: only LATERAL is decidable."""
    value = ds.get("PatientOrientation")
    if not value:
        return None
    if isinstance(value, str):
        parts = value.upper().replace("\\", " ").split()
    else:
        parts = [str(p).upper() for p in value]
    if len(parts) != 2:
        return None
    first = {p[:1] for p in parts}
    if first & {"A", "P"} and not first & {"L", "R"}:
        return "LATERAL"
    return None


def _from_text(*texts: str) -> str | None:
    for text in texts:
        upper = text.upper()
        for view, pattern in _TEXT_PATTERNS:
            if pattern.search(upper):
                return view
    return None


def view_from_tags(ds: Dataset) -> str | None:
    """PA, AP or LATERAL from (in order) ViewPosition, ViewCodeSequence, PatientOrientation,
    SeriesDescription and ProtocolName; None when no tag says."""
    return (
        _from_view_position(str(ds.get("ViewPosition", "") or ""))
        or _from_view_code(ds)
        or _from_patient_orientation(ds)
        or _from_text(
            str(ds.get("SeriesDescription", "") or ""), str(ds.get("ProtocolName", "") or "")
        )
    )


def non_chest_body_part(ds: Dataset) -> str | None:
    """The BodyPartExamined value when it names something other than the chest, else None."""
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    return None if part in CHEST_BODY_PARTS else part


def view_label(view: str, view_source: str, view_image: str | None = None) -> str:
    """The projection as a reader is told it: PA / AP / LATERAL when the tags decided,
    FRONTAL / LATERAL when the image model did (it tells frontal from lateral, not PA from
    AP). The pipeline records an image-decided frontal view as ``UNKNOWN`` from ``image``
    (the projection within frontal is unknown); that is a FRONTAL image, not an unknown one."""
    if view_source == "image":
        if view_image in ("FRONTAL", "LATERAL"):
            return view_image
        if view == "LATERAL":
            return "LATERAL"
        if view in ("UNKNOWN", "PA", "AP"):
            return "FRONTAL"  # decide_view only lets the image model pass frontal images
    return view or "UNKNOWN"


def view_caption(view: str, view_source: str, view_image: str | None = None) -> str:
    """``FRONTAL (image model)`` / ``PA (DICOM tags)``: the label and who decided it."""
    label = view_label(view, view_source, view_image)
    if label == "UNKNOWN":
        return "view not determined"
    return f"{label} ({'image model' if view_source == 'image' else 'DICOM tags'})"
