"""Logging to stderr (stdout is reserved for machine-readable output such as --format jsonl),
and, for the service's processes, to ``<logging.directory>/<process>.log`` as well.

``logging.format = "json"`` writes one JSON object per line (for log shippers). Patient
names and IDs are never logged at INFO; use :func:`redact` for anything that may hold them,
and log identifying detail only at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from screener.settings import Settings

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"

# libraries whose INFO lines are noise for operators (or can hold patient data)
_QUIET = {
    "pynetdicom": logging.WARNING,  # every PDU at DEBUG, dataset summaries with names at INFO
    "highdicom": logging.WARNING,  # narrates every module it copies
    "alembic": logging.WARNING,  # nine "Context impl" / "Will assume" lines per migration
    "uvicorn.access": logging.WARNING,  # one line per HTTP request (health checks, scrapes)
    "httpx": logging.WARNING,
    "pydicom": logging.ERROR,  # its read validation logs element values (birth dates, names)
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message (and exc when present)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(_FORMAT)


def configure_logging(
    level: str | int = "INFO", *, fmt: str = "text", log_file: Path | None = None
) -> None:
    """Console handler (once per process), plus a file handler for ``log_file`` if given."""
    root = logging.getLogger()
    console = next((h for h in root.handlers if getattr(h, "_screener", False)), None)
    if console is None:
        console = logging.StreamHandler(sys.stderr)
        console._screener = True  # type: ignore[attr-defined]
        root.addHandler(console)
    console.setFormatter(_formatter(fmt))
    if log_file is not None:
        target = str(log_file.resolve())
        if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
            handler.setFormatter(_formatter(fmt))
            root.addHandler(handler)
    root.setLevel(level)
    for name, quiet_level in _QUIET.items():
        logging.getLogger(name).setLevel(quiet_level)
    quiet_value_echoes()


def quiet_value_echoes() -> None:
    """Stop pydicom and highdicom from echoing element values (a patient's name, birth
    date) in warnings, which reach stderr and the worker logs.

    pydicom's read validation warns with the value of every element its VR does not
    allow (``Invalid value for VR DA: '1971-03-14'``); the values are checked where they
    are used (``conform_type2_values``), so reading is not validated. highdicom's person
    name check warns with the name itself.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", message=r"Invalid value for VR ", category=UserWarning)
    warnings.filterwarnings(
        "ignore", message=r"The string .* is unlikely to represent", category=UserWarning
    )


def configure_from_settings(settings: Settings, process: str | None = None) -> Path | None:
    """Console logging per the settings; with ``logging.directory`` set and a ``process``
    name, also ``<directory>/<process>.log``. Returns the log file, if any."""
    log_file = None
    if process and settings.logging.directory:
        log_file = Path(settings.logging.directory) / f"{process}.log"
    configure_logging(settings.log_level, fmt=settings.logging.format, log_file=log_file)
    return log_file


def redact(value: str | None) -> str:
    """A stable, non-identifying token for a patient identifier (for INFO-level logs)."""
    if not value:
        return "-"
    import hashlib

    return "pt:" + hashlib.sha256(value.encode()).hexdigest()[:8]
