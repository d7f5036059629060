"""Which presentation contexts the listener accepts: storage SOP classes x transfer syntaxes.

By default every storage SOP class pynetdicom knows (a PACS pushing a whole study, with its
CT scout, presentation states or reports, is not refused), each with every transfer syntax
the installed pydicom pixel decoders can decode (JPEG lossless, JPEG-LS, JPEG 2000, RLE ...).
``listener.storage_sop_classes`` narrows the SOP classes.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import StoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# The SOP classes a chest radiograph study carries; always accepted.
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
    # uncompressed first: preferred when a requestor proposes several
    native = [u for u in out if not u.is_compressed]
    return tuple(native + [u for u in out if u.is_compressed])


def storage_sop_classes(configured: list[str] | None = None) -> list[str]:
    """SOP classes accepted for C-STORE: the configured list, or every storage class."""
    if configured:
        classes = list(dict.fromkeys([*CHEST_STUDY_SOP_CLASSES, *configured]))
    else:
        known = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        classes = list(dict.fromkeys([*CHEST_STUDY_SOP_CLASSES, *known]))
    return classes


def supported_contexts(configured: list[str] | None = None) -> list[PresentationContext]:
    """Presentation contexts for the SCP: Verification plus the storage SOP classes."""
    syntaxes: list[str | UID] = list(decodable_transfer_syntaxes())
    contexts = [build_context(VERIFICATION_SOP_CLASS)]
    contexts.extend(build_context(uid, syntaxes) for uid in storage_sop_classes(configured))
    return contexts
