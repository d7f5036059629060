"""DICOM UID validation: the only strings allowed to become spool path components.

A UID is 1 to 64 characters of digits and dots, components separated by single dots
(PS3.5 section 9.1). Leading zeros in a component are tolerated (some old modalities emit
them) because they are harmless for paths; anything else, e.g. ``../../etc``, is refused.
A refused value is never put into the error message: a non-UID in a UID attribute can be a
patient name or ID, and these messages reach WARNING logs and the audit log.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64


class InvalidUIDError(ValueError):
    """A value that must be a DICOM UID is not one."""


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (digits and single dots, at most 64 chars)."""
    if not isinstance(value, str):
        return False
    return 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def require_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUIDError` naming ``what``."""
    text = str(value).strip("\x00 ") if value is not None else ""
    if not is_valid_uid(text):
        raise InvalidUIDError(f"{what} is not a valid DICOM UID ({_why_not(text)})")
    return text


def _why_not(text: str) -> str:
    """The reason a value is not a UID, without the value."""
    if not text:
        return "missing or empty"
    if len(text) > MAX_UID_LENGTH:
        return f"{len(text)} characters, more than {MAX_UID_LENGTH}"
    if re.fullmatch(r"[0-9.]+", text):
        return "empty component"
    return "characters other than digits and dots"
