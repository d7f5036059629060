"""Logging to stderr (stdout is reserved for machine-readable output such as --format jsonl).

Patient names and IDs are never logged at INFO; use :func:`redact` for anything that may hold
them, and log identifying detail only at DEBUG.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_screener", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._screener = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and dataset summaries (with patient names) at INFO
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom narrates every module it copies from the source at INFO: noise for operators
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def redact(value: str | None) -> str:
    """A stable, non-identifying token for a patient identifier (for INFO-level logs)."""
    if not value:
        return "-"
    import hashlib

    return "pt:" + hashlib.sha256(value.encode()).hexdigest()[:8]
