"""The one rule for an Application Entity title, used wherever one is typed or configured.

DICOM PS3.5 section 6.2, VR AE: "A string of characters that identifies an Application
Entity with leading and trailing spaces (20H) being non-significant. A value consisting
solely of spaces shall not be used." Character repertoire: the Default Character
Repertoire (ISO-IR 6, printable ASCII 20H-7EH) excluding the backslash (5CH) and all
control characters; length: 16 bytes maximum.

A title outside that rule is refused by pynetdicom when an association is built (a
traceback, not a usage error), or by a peer (an association rejected for no visible
reason), so the CLI and the settings check it first, with a reason an operator can act on.
"""

from __future__ import annotations

AE_TITLE_MAX_LENGTH = 16
_PRINTABLE = frozenset(chr(code) for code in range(0x20, 0x7F)) - {"\\"}


def ae_title_problem(value: str, *, quote: bool = True) -> str | None:
    """Why ``value`` is not a valid AE title (PS3.5 VR AE), or None when it is one.

    Checked as the value will be sent: its padding spaces count towards the 16 bytes (a
    peer ignores them, the PDU still carries them). The reason quotes the value with
    ``repr``, so that an invisible character (a tab, a non-breaking space) shows; with
    ``quote=False`` it names only the offending characters (for the settings' error line,
    which never repeats a rejected value).
    """
    title = f"AE title {value!r}" if quote else "the AE title"
    if not value.strip(" "):
        return "an AE title cannot be empty or only spaces"
    if len(value) > AE_TITLE_MAX_LENGTH:
        return f"{title} has {len(value)} characters; at most {AE_TITLE_MAX_LENGTH} are allowed"
    bad = sorted({c for c in value if c not in _PRINTABLE})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return (
            f"{title} contains {shown}; only printable ASCII characters other than a "
            "backslash are allowed (no control or non-ASCII characters)"
        )
    return None
