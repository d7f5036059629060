"""What the screener calls itself, in DICOM and in logs.

Objects the screener writes carry ``ManufacturerModelName == PRODUCT_NAME``; the listener
uses that marker (and the database of outputs) to accept but never screen its own output.
"""

from functools import cache
from importlib.metadata import PackageNotFoundError, version

PRODUCT_NAME = "pacs-screener"


@cache
def software_version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a bare tree); read
    once per process (a metadata lookup costs ~0.2 ms, and every SR and SC asks)."""
    try:
        return version(PRODUCT_NAME)
    except PackageNotFoundError:  # pragma: no cover - only without installation
        return "0+unknown"
