"""C-STORE SCU: send the screener's output files to one PACS destination.

One association per destination and batch; the outcome is reported per file so the
delivery bookkeeping (``screener.delivery``) can retry exactly what failed. Optional TLS
(``destination.tls``, see ``screener.dicom.tls.client_context``): ``client_ca`` is the CA
that must have signed the PACS certificate (empty: the system trust store), and
``certificate``/``private_key`` are offered to PACS that require mutual TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, build_context

from screener.dicom.tls import TlsConfigError, client_context
from screener.settings import Destination

log = logging.getLogger(__name__)

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings
# (coercion of data elements, elements discarded, dataset does not match SOP class).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass
class SendOutcome:
    """What happened to each file on one attempt: None = stored, else the error text."""

    destination: str
    per_file: dict[Path, str | None] = field(default_factory=dict)
    association_error: str | None = None

    @property
    def stored(self) -> list[Path]:
        return [p for p, err in self.per_file.items() if err is None]

    @property
    def failed(self) -> dict[Path, str]:
        return {p: err for p, err in self.per_file.items() if err is not None}


def _contexts_for(datasets: Sequence[pydicom.Dataset]) -> list[PresentationContext]:
    """One presentation context per SOP class, offering the file's own transfer syntax."""
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        syntaxes = wanted.setdefault(str(ds.SOPClassUID), set())
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        syntaxes.update({"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"})
    return [build_context(sop, sorted(ts)) for sop, ts in sorted(wanted.items())]


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout: float = 30.0,
) -> SendOutcome:
    """C-STORE ``paths`` to ``destination`` over one association; never raises for I/O."""
    outcome = SendOutcome(destination=destination.name)
    datasets: list[tuple[Path, pydicom.Dataset]] = []
    for path in paths:
        try:
            # headers only: a batch of large heatmaps must not sit in memory at once
            datasets.append((Path(path), pydicom.dcmread(path, stop_before_pixels=True)))
        except Exception as exc:  # a missing/corrupt outbox file fails only itself
            outcome.per_file[Path(path)] = f"cannot read {path}: {exc}"
    if not datasets:
        return outcome

    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = _contexts_for([ds for _, ds in datasets])
    tls_args = None
    try:
        context = client_context(destination.tls)
    except (OSError, TlsConfigError, ValueError) as exc:
        outcome.association_error = f"TLS setup failed: {exc}"
    else:
        # the PACS certificate must be valid for the configured host name or address
        tls_args = None if context is None else (context, destination.host)
    if outcome.association_error is None:
        try:
            assoc = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                tls_args=tls_args,
            )
        except Exception as exc:  # socket/TLS errors surface here on some platforms
            outcome.association_error = f"association failed: {exc}"
        else:
            if not assoc.is_established:
                reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
                outcome.association_error = f"association {reason}"
            else:
                try:
                    for path, _header in datasets:
                        outcome.per_file[path] = _store_one(assoc, path)
                finally:
                    if assoc.is_established:
                        assoc.release()
    if outcome.association_error is not None:
        for path, _ds in datasets:
            outcome.per_file.setdefault(path, f"{destination.name}: {outcome.association_error}")
    log.info(
        "C-STORE to %s: %d stored, %d failed",
        destination.name,
        len(outcome.stored),
        len(outcome.failed),
    )
    return outcome


def _store_one(assoc: object, path: Path) -> str | None:
    """One C-STORE; pynetdicom streams the file's encoded data set from disk."""
    try:
        status = assoc.send_c_store(path)  # type: ignore[attr-defined]
    except Exception as exc:
        return f"C-STORE failed: {exc}"
    if not status or "Status" not in status:
        return "C-STORE: no response (connection lost or timed out)"
    code = int(status.Status)
    if code in STORED_STATUSES:
        return None
    comment = status.get("ErrorComment", "")
    return f"C-STORE status 0x{code:04X} {comment}".strip()
