"""Which presentation contexts the listener accepts: storage SOP classes x transfer syntaxes.

Every storage SOP class pynetdicom knows (``pynetdicom.sop_class._STORAGE_CLASSES``, 170 in
pynetdicom 3.0: not the 120-class ``StoragePresentationContexts`` list an SCU proposes),
plus ``listener.storage_sop_classes`` (e.g. vendor-private classes), each in every transfer
syntax pydicom knows except one whose data set encoding pydicom misreads. A PACS pushing a
whole study (dose SRs, KOS, presentation states, video) must not be refused: what happens to
each object is decided after it was stored (the screening gate), not by refusing it. The
bytes are stored as received, so a syntax pydicom cannot decode is still kept intact.
docs/conformance-statement.md lists these tables; tests/integration/test_conformance_statement.py
compares them with :func:`supported_contexts`.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import sop_class
from pynetdicom.presentation import PresentationContext, build_context

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# The SOP classes a chest radiograph study carries (all standard storage classes too).
CHEST_STUDY_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
)

# JPIP HTJ2K Referenced Deflate: a deflated data set that pydicom 3 reads as not deflated
_EXCLUDED_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.205"})


@lru_cache(maxsize=1)
def accepted_transfer_syntaxes() -> tuple[UID, ...]:
    """Every transfer syntax the listener accepts, uncompressed first."""
    out = [uid for uid in AllTransferSyntaxes if str(uid) not in _EXCLUDED_SYNTAXES]
    native = [u for u in out if not u.is_compressed]
    return tuple(native + [u for u in out if u.is_compressed])


@lru_cache(maxsize=1)
def decodable_transfer_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes whose pixel data the installed pydicom decoders can decode."""
    from pydicom.pixels.decoders.base import get_decoder

    out: list[UID] = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            continue
    native = [u for u in out if not u.is_compressed]
    return tuple(native + [u for u in out if u.is_compressed])


def standard_storage_sop_classes() -> dict[str, str]:
    """UID -> keyword of every storage SOP class pynetdicom knows."""
    return {str(uid): name for name, uid in sop_class._STORAGE_CLASSES.items()}


def storage_sop_classes(extra: list[str] | None = None) -> list[str]:
    """SOP classes accepted for C-STORE: every standard storage class plus ``extra``."""
    known = list(standard_storage_sop_classes())
    return list(dict.fromkeys([*CHEST_STUDY_SOP_CLASSES, *known, *(extra or [])]))


def supported_contexts(extra: list[str] | None = None) -> list[PresentationContext]:
    """Presentation contexts for the SCP: Verification plus the storage SOP classes."""
    syntaxes: list[str | UID] = list(accepted_transfer_syntaxes())
    contexts = [build_context(VERIFICATION_SOP_CLASS)]
    contexts.extend(build_context(uid, syntaxes) for uid in storage_sop_classes(extra))
    return contexts
