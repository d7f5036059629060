"""The DICOM listener: a pynetdicom SCP that keeps every instance before it says Success.

Per C-STORE (see :func:`handle_store`): refuse with Out of Resources when the spool's
filesystem is above ``listener.max_spool_fill``; check the received bytes strictly
(0xC210 when malformed, 0xC211 when a UID is not a UID, 0xA900 when the data set's SOP
Class differs from the command's, 0xC212 when its SOP Instance UID does, 0xC213 when Pixel
Data does not match the transfer syntax); write the bytes exactly as received to the spool
atomically and durably; record the instance in the database; only then answer 0x0000. A
disk failure answers 0xA701 and a database failure 0xA702, so the sender retries. Refusals
are logged and audited by tag and reason, never with the refused value (it can be PHI).

Before any of that, connections pass the gate of :mod:`screener.dicom.fast_receive`
(bounded PDUs, ARTIM-style request deadline, caps per process and per source address, the
Called and Calling AE Title checks). One INFO line per association says who sent how much.
docs/conformance-statement.md is the user-facing description of all of this.

``listener.processes > 1`` runs several listener processes on one port (SO_REUSEPORT: the
kernel spreads associations over them), because one Python process is bound by the GIL.

The data set is taken from pynetdicom's receive buffer without a copy and written once.
pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) was considered and not used:
it writes every fragment to a NamedTemporaryFile in the system temp directory (a process-
wide setting, usually another filesystem than the spool, so no atomic rename) with a flush
per fragment; for radiographs of 10 to 50 MB per association memory is not the constraint.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import pydicom.config
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

from screener.db.models import AuditLog
from screener.db.session import session_scope
from screener.dicom import dataset_buffers, spool
from screener.dicom.dataset_check import (
    MalformedDatasetError,
    PixelEncodingError,
    check_pixel_encoding,
    check_structure,
    instance_header,
    read_header_dataset,
    syntax_of,
    tag_at,
)
from screener.dicom.fast_receive import (
    AssociationRefused,
    AssociationRequest,
    BoundedAssociationServer,
    BoundedRequestHandler,
    Limits,
    ReceiveBudget,
    effective_max_pdu,
    printable,
    same_ae_title,
)
from screener.dicom.sop_classes import accepted_transfer_syntaxes, supported_contexts
from screener.dicom.tls import server_context
from screener.dicom.uid_validation import InvalidUIDError
from screener.ingest import (
    Gate,
    IngestOutcome,
    ReceivedFile,
    content_digest,
    digest_of,
    record_instance,
)
from screener.ingest import warm_up as record_warm_up
from screener.screenability import pixel_data_follows, screenability
from screener.settings import ListenerSettings, Settings, mask_url

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool filesystem above max_spool_fill
STATUS_DISK_FAILURE = 0xA701  # writing the spool failed
STATUS_DB_FAILURE = 0xA702  # recording in the database failed
STATUS_INTERNAL_ERROR = 0xA7FF  # unexpected error: retry later rather than give up
STATUS_MALFORMED = 0xC210  # cannot understand: the data set does not parse
STATUS_INVALID_UID = 0xC211  # cannot understand: a required UID is missing or not a UID
STATUS_UID_MISMATCH = 0xC212  # cannot understand: data set and command disagree
STATUS_PIXEL_MISMATCH = 0xC213  # cannot understand: Pixel Data does not fit the syntax
STATUS_SOP_CLASS_MISMATCH = 0xA900  # Error: data set does not match SOP Class (PS3.4 B.2.3)
MAX_ASSOCIATIONS = 64  # the default of listener.max_associations


@dataclass
class StoreContext:
    """What the C-STORE handler needs; built once per listener process."""

    settings: Settings
    spool_dir: Path
    database_url: str
    max_spool_fill: float
    single_image_modalities: tuple[str, ...]
    counters: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    job_sender: BoundedWorker[int] | None = None  # jobs the ingest completed, to the workers

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreContext:
        return cls(
            settings=settings,
            spool_dir=settings.spool_dir,
            database_url=settings.database_url,
            max_spool_fill=settings.listener.max_spool_fill,
            single_image_modalities=tuple(settings.listener.single_image_complete_modalities),
        )

    def count(self, key: str) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + 1


def _peer(event: Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return printable(str(requestor.ae_title).strip()), f"{requestor.address}:{requestor.port}"


@dataclass
class AssociationStats:
    """Per-association counters for the one INFO line logged when it ends."""

    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    refused: int = 0
    bytes: int = 0
    outcome: str = "closed"
    logged: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _stats(event: Event) -> AssociationStats:
    assoc = event.assoc
    stats = getattr(assoc, "_screener_stats", None)
    if stats is None:
        stats = AssociationStats()
        assoc._screener_stats = stats  # type: ignore[attr-defined]
    return stats


def handle_association_end(event: Event, outcome: str) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: one INFO line per association.

    Calling AE title, peer address, instances stored and refused, bytes, duration: no
    patient data. The first of the events that fires for an association writes the line.
    """
    stats = _stats(event)
    if outcome == "closed" and getattr(event.assoc, "is_released", False):
        outcome = "released"  # the peer closed on reading our A-RELEASE-RP before EVT_RELEASED
    with stats.lock:
        if outcome != "closed":
            stats.outcome = outcome
        if stats.logged:
            return
        stats.logged = True
    calling_ae, source = _peer(event)
    log.info(
        "association from %s at %s %s: %d instance(s) stored, %d refused, %d bytes, %.1f s",
        calling_ae or "(no AE title)",
        source,
        stats.outcome,
        stats.stored,
        stats.refused,
        stats.bytes,
        time.monotonic() - stats.started,
    )


def _audit_error(ctx: StoreContext, action: str, detail: dict[str, Any]) -> None:
    """Best effort: rejections go to the audit log for `screener status` (never raises)."""
    try:
        with session_scope(ctx.database_url) as session:
            session.add(AuditLog(actor="listener", action=action, detail=detail))
    except Exception:  # noqa: BLE001 - the DB may be the thing that failed
        log.debug("could not write audit entry %s", action, exc_info=True)


def _received_bytes(event: Event) -> memoryview:
    """The data set bytes as received, without the copy ``event.encoded_dataset()`` makes.

    A view of pynetdicom's receive buffer (10 MB copies cost real CPU at hundreds of MB/s);
    it lives only while the handler runs.
    """
    stream = getattr(event.request, "DataSet", None)
    if isinstance(stream, BytesIO):
        return stream.getbuffer()
    return memoryview(event.encoded_dataset(include_meta=False))


# The content digest of a data set that was not hashed as it arrived (BLAKE3, which
# releases the GIL on large inputs, as os.write does) runs here while the handler thread
# writes and fsyncs the same bytes.
_HASHERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="digest")


def _digest(event: Event, body: memoryview) -> Future[str]:
    """The content digest: hashed already where the data set was received into pooled
    memory (fragment by fragment, as they arrived); else computed by a hasher thread while
    the handler writes and fsyncs the same bytes."""
    hasher = dataset_buffers.hasher_of(event.request)
    if hasher is None:
        return _HASHERS.submit(content_digest, body)
    done: Future[str] = Future()
    done.set_result(digest_of(hasher))
    return done


def _gate_reason(
    ds: Dataset, body: memoryview, transfer_syntax: str, header_length: int, ctx: StoreContext
) -> str | None | Literal[Gate.READ_FILE]:
    """The screenability gate decided on the header parsed in memory (no file re-read).

    Gate.READ_FILE where it is not decided here: a deflated data set (the element after the
    header is inside the deflate stream), or a header the gate could not evaluate.
    """
    if syntax_of(transfer_syntax) is None:
        return Gate.READ_FILE
    try:
        has_pixels = pixel_data_follows(ds, tag_at(body, header_length, transfer_syntax))
        refusal = screenability(ds, ctx.settings.screening, has_pixel_data=has_pixels)
    except Exception as exc:  # noqa: BLE001 - never fail a C-STORE over the gate
        log.debug("screenability not decided from memory: %s", type(exc).__name__)
        return Gate.READ_FILE
    return None if refusal is None else refusal.reason


def handle_store(event: Event, ctx: StoreContext) -> int:
    """EVT_C_STORE: spool durably, record in the DB, then (and only then) Success.

    An unexpected error answers 0xA7FF (Out of Resources: the sender retries later) rather
    than pynetdicom's default 0xC211, which a PACS treats as final: an instance the listener
    failed to keep because of a bug must not be dropped by the sender too.
    """
    try:
        return _store(event, ctx)
    except Exception:  # noqa: BLE001
        log.exception("unexpected error while storing an instance: answering 0xA7FF")
        ctx.count("internal_error")
        return STATUS_INTERNAL_ERROR
    finally:
        dataset_buffers.release(event.request)  # its bytes are on disk or refused by now


def _store(event: Event, ctx: StoreContext) -> int:
    calling_ae, source = _peer(event)
    command_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        fill = spool.filesystem_fill(ctx.spool_dir)
    except OSError as exc:
        log.error("spool %s unusable (%s): answering Out of Resources", ctx.spool_dir, exc)
        ctx.count("disk_failure")
        return STATUS_DISK_FAILURE
    if fill > ctx.max_spool_fill:
        log.warning(
            "spool filesystem %.1f%% full (limit %.1f%%): refusing instance from %s (%s)",
            fill * 100,
            ctx.max_spool_fill * 100,
            calling_ae,
            source,
        )
        ctx.count("back_pressure")
        return STATUS_OUT_OF_RESOURCES

    transfer_syntax = str(event.context.transfer_syntax)
    body = _received_bytes(event)
    try:
        header_length = check_structure(
            body, transfer_syntax, max_inflated=ctx.settings.listener.max_dataset_mb * 1024 * 1024
        )  # a deflated data set inflating past max_dataset_mb is refused as malformed
        dataset = read_header_dataset(body, transfer_syntax, header_length)
        header = instance_header(dataset)
    except InvalidUIDError as exc:
        return _refuse(ctx, STATUS_INVALID_UID, "instance.invalid_uid", exc, event)
    except MalformedDatasetError as exc:
        return _refuse(ctx, STATUS_MALFORMED, "instance.malformed", exc, event)
    command_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "").strip("\x00 ")
    context_class = str(event.context.abstract_syntax)
    if header.sop_class_uid != command_class or header.sop_class_uid != context_class:
        mismatch = ValueError(
            "SOP Class UID (0008,0016) differs from the command's Affected SOP Class UID "
            "(0000,0002) or the presentation context"
        )
        return _refuse(
            ctx, STATUS_SOP_CLASS_MISMATCH, "instance.sop_class_mismatch", mismatch, event
        )
    if header.sop_instance_uid != command_uid.strip("\x00 "):
        mismatch = ValueError(
            "SOP Instance UID (0008,0018) differs from the command's Affected SOP Instance "
            "UID (0000,1000)"
        )
        return _refuse(ctx, STATUS_UID_MISMATCH, "instance.uid_mismatch", mismatch, event)
    try:
        check_pixel_encoding(body, transfer_syntax, header_length, header)
    except PixelEncodingError as exc:
        return _refuse(ctx, STATUS_PIXEL_MISMATCH, "instance.pixel_mismatch", exc, event)

    digest_future = _digest(event, body)
    skip_reason = _gate_reason(dataset, body, transfer_syntax, header_length, ctx)
    try:
        prefix = dataset_buffers.spool_prefix(
            header.sop_class_uid, header.sop_instance_uid, transfer_syntax
        )  # Event.file_meta's elements: the command's UIDs, checked equal to these above
        image = dataset_buffers.file_image_of(event.request, prefix)
        path, size, digest = spool.store_while_hashing(
            ctx.spool_dir,
            header.study_instance_uid,
            header.series_instance_uid,
            header.sop_instance_uid,
            (prefix, body),
            digest_future,
            direct=ctx.settings.listener.direct_io,
            image=image,  # the same bytes, already laid out as the file: no staging copy
        )
    except OSError as exc:
        wait([digest_future])  # the hasher reads pynetdicom's buffer: let it finish first
        log.error("cannot write instance %s to the spool: %s", header.sop_instance_uid, exc)
        ctx.count("disk_failure")
        _audit_error(ctx, "instance.disk_failure", {"error": str(exc)[:500]})
        return STATUS_DISK_FAILURE

    received = ReceivedFile(
        file_path=str(path),
        size_bytes=size,
        content_digest=digest,
        transfer_syntax_uid=transfer_syntax,
        calling_ae_title=calling_ae,
        source_address=source,
        # only for a version recorded before BLAKE3 (sha256:...); body lives until we return
        rehash=lambda algorithm: content_digest(body, algorithm),
    )
    try:
        result = record_instance(
            ctx.database_url,
            header,
            received,
            ctx.single_image_modalities,
            screening=ctx.settings.screening,
            skip_reason=skip_reason,
        )
    except Exception as exc:  # noqa: BLE001 - any DB failure must become a retryable status
        log.error(
            "cannot record instance %s in the database (%s): answering Out of Resources",
            header.sop_instance_uid,
            exc,
        )
        ctx.count("db_failure")
        return STATUS_DB_FAILURE
    ctx.count(result.outcome.value)
    if result.outcome is IngestOutcome.DUPLICATE and not _same_file(result.file_path, path):
        # identical to a version spooled under its SHA-256 name (before BLAKE3): that
        # file is the recorded one; this copy under the BLAKE3 name is not needed
        Path(path).unlink(missing_ok=True)
    if result.job_id is not None and ctx.job_sender is not None:
        ctx.job_sender.put(result.job_id)  # a single-image study completed at once
    stats = _stats(event)
    stats.stored += 1
    stats.bytes += size
    log.debug(
        "instance %s from %s (%s): %s, %d bytes",
        header.sop_instance_uid,
        calling_ae,
        source,
        result.outcome.value,
        size,
    )
    return STATUS_SUCCESS


def _same_file(recorded: str, path: Path) -> bool:
    """Whether ``recorded`` is ``path`` (True when that cannot be told: keep the file)."""
    if recorded == str(path):
        return True
    try:
        return os.path.samefile(recorded, path)
    except OSError:
        return True


def _refuse(ctx: StoreContext, status: int, action: str, exc: Exception, event: Event) -> int:
    """Answer ``status``; log and audit the reason (``exc`` names tags, never values)."""
    calling_ae, source = _peer(event)
    _stats(event).refused += 1
    log.warning("refused a data set from %s (%s) with 0x%04X: %s", calling_ae, source, status, exc)
    ctx.count(action)
    _audit_error(
        ctx,
        action,
        {"calling_ae_title": calling_ae, "source": source, "status": status, "reason": str(exc)},
    )
    return status


def handle_rejected(event: Event, ctx: StoreContext) -> None:
    """EVT_REJECTED (pynetdicom's own rejections, after the gate): who, from where."""
    requestor = event.assoc.requestor  # raw AE title: _log_refusal makes it printable once
    source = f"{requestor.address}:{requestor.port}"
    _log_refusal(
        ctx, str(requestor.ae_title).strip(), source, "association limit or negotiation failure"
    )


T = TypeVar("T")


class BoundedWorker(threading.Thread, Generic[T]):
    """Hands items from a handler thread to one background thread, boundedly.

    A C-STORE answer or the association gate must not wait for the database or the broker,
    and a flood must not grow a queue without limit: past ``capacity`` waiting items, further
    ones go to ``on_full`` (counted, or left to the reconciler). ``handle`` gets up to
    ``batch`` items at a time; :meth:`close` handles what is queued, then stops.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], object],
        *,
        capacity: int,
        batch: int = 1,
        on_full: Callable[[T], None] | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.handle = handle
        self.batch = batch
        self.on_full = on_full
        self.queue: queue.Queue[T | None] = queue.Queue(capacity)

    def put(self, item: T) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            if self.on_full is not None:
                self.on_full(item)

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            items = [item]
            while len(items) < self.batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.handle(items)
                    return
                items.append(more)
            self.handle(items)

    def close(self) -> None:
        try:
            self.queue.put(None, timeout=5)
        except queue.Full:
            return
        self.join(timeout=10)


def audit_writer(ctx: StoreContext) -> BoundedWorker[tuple[str, dict[str, Any]]]:
    """Association refusals to the audit log, off the gate thread (256 waiting at most)."""

    def write(entries: list[tuple[str, dict[str, Any]]]) -> None:
        for action, detail in entries:
            _audit_error(ctx, action, detail)

    return BoundedWorker("audit-writer", write, capacity=256)


def job_sender(settings: Settings) -> BoundedWorker[int]:
    """Jobs completed during a C-STORE, dispatched off the handler thread in batches of 64.

    A full queue only delays a job until the reconciler's recovery (the database, not the
    broker, is the source of truth)."""

    def full(job_id: int) -> None:
        log.warning("job sender queue full: job %s left to the reconciler", job_id)

    return BoundedWorker(
        "job-sender",
        lambda ids: send_created_jobs(settings, ids),
        capacity=1024,
        batch=64,
        on_full=full,
    )


def _log_refusal(
    ctx: StoreContext,
    calling_ae: str,
    source: str,
    why: str,
    writer: BoundedWorker[tuple[str, dict[str, Any]]] | None = None,
) -> None:
    shown = printable(calling_ae)
    log.warning("association from %r at %s rejected: %s", shown, source, why)
    detail = {"calling_ae_title": shown, "source": source, "reason": why}
    if writer is not None:
        writer.put(("association.rejected", detail))
    else:
        _audit_error(ctx, "association.rejected", detail)


def limits_of(lst: ListenerSettings) -> Limits:
    """The receive bounds of one listener process, from the settings."""
    return Limits(
        max_pdu=lst.max_pdu,
        association_request_timeout=lst.association_request_timeout_seconds,
        idle_timeout=lst.idle_timeout_seconds,
        association_max_seconds=lst.association_max_seconds,
        max_associations=lst.max_associations,
        max_associations_per_address=lst.max_associations_per_address,
        max_pending=lst.max_pending_connections,
        max_pending_per_address=lst.max_pending_per_address,
        max_dataset_bytes=lst.max_dataset_mb * 1024 * 1024,
        budget=ReceiveBudget(lst.receive_budget_mb * 1024 * 1024),
    )


def association_policy(lst: ListenerSettings) -> Callable[[AssociationRequest, Any], None]:
    """The checks on a complete A-ASSOCIATE-RQ, with the A-ASSOCIATE-RJ each one answers.

    AE titles compare as DICOM pads them (PS3.5 6.2: leading and trailing spaces are not
    significant) and case-sensitively: nothing else is loosened.
    """
    allowed = list(lst.allowed_calling_ae_titles)

    def check(request: AssociationRequest, server: BoundedAssociationServer) -> None:
        if lst.require_called_ae_title and not same_ae_title(request.called_ae_title, lst.ae_title):
            raise AssociationRefused(1, 1, 7, "called AE title not recognised")
        if allowed and not any(same_ae_title(request.calling_ae_title, a) for a in allowed):
            raise AssociationRefused(1, 1, 3, "calling AE title not recognised")
        total, from_address = server.live_counts(request.address)
        if total >= lst.max_associations:
            raise AssociationRefused(2, 3, 2, "maximum number of associations reached")
        if from_address >= lst.max_associations_per_address:
            raise AssociationRefused(
                2, 3, 2, "maximum number of associations from this address reached"
            )

    return check


def build_ae(settings: Settings) -> AE:
    """The pynetdicom AE; AE titles and association caps are enforced by the gate."""
    _config.LOG_HANDLER_LEVEL = "none"  # per-PDU logging costs throughput and logs PHI
    # pydicom's read validation logs the offending value ("Invalid value for VR UI: '...'")
    # at WARNING: PHI in the log. The listener checks what it needs itself (no echo).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    lst = settings.listener
    ae = AE(ae_title=lst.ae_title)
    # a backstop only: the gate counts negotiated associations against max_associations
    ae.maximum_associations = lst.max_associations + lst.max_pending_connections
    ae.maximum_pdu_size = effective_max_pdu(lst.max_pdu)
    ae.network_timeout = lst.idle_timeout_seconds
    ae.acse_timeout = lst.association_request_timeout_seconds
    ae.require_called_aet = False  # the gate checks it (AE title rules of PS3.5)
    ae.supported_contexts = supported_contexts(lst.storage_sop_classes)
    return ae


class _ReusePortServer(BoundedAssociationServer):
    """A bounded association server whose socket may share its port with siblings."""

    reuse_port = True


def log_startup(settings: Settings, port: int) -> None:
    lst = settings.listener
    log.info(
        "listener AE title %s on %s:%d (%d process(es))",
        lst.ae_title,
        lst.host,
        port,
        lst.processes,
    )
    if lst.allowed_calling_ae_titles:
        log.info("allowed calling AE titles: %s", ", ".join(lst.allowed_calling_ae_titles))
    else:
        log.warning("allowed_calling_ae_titles is empty: ANY calling AE title is accepted")
    if lst.tls.enabled:
        log.info(
            "TLS on (%s)",
            "mutual: client certificates required"
            if lst.tls.client_ca
            else "server certificate only",
        )
    else:
        log.info("TLS off")
    log.info("data dir %s, spool %s", settings.data_dir, settings.spool_dir)
    log.info("database %s", mask_url(settings.database_url))
    log.info(
        "accepting %d storage SOP classes in %d transfer syntaxes; study quiet period %.0f s",
        len(supported_contexts(lst.storage_sop_classes)) - 1,
        len(accepted_transfer_syntaxes()),
        settings.study_quiet_seconds,
    )
    log.info(
        "called AE title %s; at most %d associations (%d per address), %d connections "
        "awaiting their request (%d per address), request deadline %.0f s, idle %.0f s, "
        "association %.0f s, PDU %d bytes",
        "checked" if lst.require_called_ae_title else "NOT checked",
        lst.max_associations,
        lst.max_associations_per_address,
        lst.max_pending_connections,
        lst.max_pending_per_address,
        lst.association_request_timeout_seconds,
        lst.idle_timeout_seconds,
        lst.association_max_seconds,
        effective_max_pdu(lst.max_pdu),
    )


class _Server:
    """One process's association server (no assembler thread)."""

    def __init__(self, settings: Settings, port: int, reuse_port: bool) -> None:
        self.settings = settings
        self.ctx = StoreContext.from_settings(settings)
        self.ae = build_ae(settings)
        self.audit = audit_writer(self.ctx)
        self.audit.start()
        self.ctx.job_sender = job_sender(settings)
        self.ctx.job_sender.start()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
            (evt.EVT_REJECTED, handle_rejected, [self.ctx]),
            (evt.EVT_RELEASED, handle_association_end, ["released"]),
            (evt.EVT_ABORTED, handle_association_end, ["aborted"]),
            (evt.EVT_CONN_CLOSE, handle_association_end, ["closed"]),
        ]
        server_class = _ReusePortServer if reuse_port else BoundedAssociationServer
        self.server = self.ae.make_server(
            (settings.listener.host, port),
            ssl_context=server_context(settings.listener.tls),
            evt_handlers=handlers,
            server_class=server_class,
            request_handler=BoundedRequestHandler,
        )
        assert isinstance(self.server, BoundedAssociationServer)

        def on_refusal(calling_ae: str, source: str, why: str) -> None:
            _log_refusal(self.ctx, calling_ae, source, why, self.audit)

        self.server.configure(
            limits_of(settings.listener), association_policy(settings.listener), on_refusal
        )
        self.ae._servers.append(self.server)  # so server.shutdown() can unregister it
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, name=f"listener:{self.port}", daemon=True
        )

    def start(self) -> None:
        try:
            record_warm_up(self.settings.database_url)
        except Exception as exc:  # noqa: BLE001 - a DB still starting is not fatal here
            log.warning(
                "database not reachable at start (%s): the first C-STORE connects",
                type(exc).__name__,
            )
        self.thread.start()

    def stop(self, drain_seconds: float) -> None:
        """Stop accepting, let open associations finish (up to ``drain_seconds``), close."""
        self.server.shutdown()  # stops serve_forever and closes the listening socket
        deadline = time.monotonic() + drain_seconds
        # established associations may finish their transfers; connections still
        # negotiating (or idle port probes) are not worth waiting for
        while time.monotonic() < deadline and any(
            assoc.is_established for assoc in self.server.active_associations
        ):
            time.sleep(0.05)
        for assoc in self.server.active_associations:
            if assoc.is_established:
                log.warning("aborting association still open after %.0f s", drain_seconds)
            assoc.abort()
        self.thread.join(timeout=5)
        self.audit.close()
        if self.ctx.job_sender is not None:
            self.ctx.job_sender.close()


class _Assembler(threading.Thread):
    """Background study assembly in the listener (the workers' loop may run it too)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="study-assembler", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()
        self.interval = max(0.2, min(5.0, settings.study_quiet_seconds / 4))

    def run(self) -> None:
        from screener.study_assembler import assemble_due_studies

        while not self.stopped.wait(self.interval):
            try:
                created = assemble_due_studies(self.settings)
            except Exception:  # noqa: BLE001 - keep assembling after a transient DB error
                log.exception("study assembly failed; retrying in %.1f s", self.interval)
                continue
            if created:
                send_created_jobs(self.settings, created)


def send_created_jobs(settings: Settings, job_ids: list[int]) -> bool:
    """The dispatcher's best-effort send (imported lazily: Celery loads only when needed)."""
    from workers.dispatch import send_created

    return send_created(settings, job_ids)


class ListenerHandle:
    """A running listener (in-process threads, or child processes sharing one port)."""

    def __init__(
        self,
        port: int,
        stop: Callable[[float], None],
        servers: list[_Server] | None = None,
        children: _ListenerProcesses | None = None,
    ) -> None:
        self.port = port
        self.children = children  # child listener processes (listener.processes > 1)
        self._stop = stop
        self._stopping = threading.Lock()
        self._stopped = threading.Event()  # set once stop() has drained and closed
        self.servers = servers or []

    @property
    def pids(self) -> list[int]:
        """The child listener processes (``listener.processes > 1``; else none)."""
        return [] if self.children is None else self.children.pids

    def exited(self) -> list[tuple[int, int | None]]:
        """(slot, exit code) of the child listener processes that exited (killed, a crash);
        ``serve`` starts them again with :meth:`restart`. None in-process or once stopping."""
        return [] if self.children is None else self.children.exited()

    def restart(self, slot: int) -> None:
        """Start child listener process ``slot`` again, on the same port."""
        if self.children is not None:
            self.children.restart(slot)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting, finish open associations (up to ``drain_seconds``), release."""
        if not self._stopping.acquire(blocking=False):
            self._stopped.wait()  # another thread is stopping: wait for it to finish
            return
        try:
            self._stop(drain_seconds)
        finally:
            self._stopped.set()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` has drained and closed (the health check reads this)."""
        return self._stopped.is_set()

    def wait(self) -> None:
        """Block until a :meth:`stop` (e.g. from the SIGTERM handler) has completed."""
        while not self._stopped.wait(0.5):
            pass

    def __enter__(self) -> ListenerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prepare(settings: Settings, migrate: bool = True) -> None:
    """Directories, schema, and the leftovers of a crash (temp files never acknowledged)."""
    settings.ensure_dirs()
    if migrate:
        from screener.db.session import upgrade

        upgrade(settings.database_url)
    removed = spool.remove_stale_temp_files(settings.spool_dir)
    if removed:
        log.warning("removed %d incomplete temp file(s) left in the spool by a crash", removed)


def start_listener(
    settings: Settings,
    block: bool = False,
    assemble: bool = True,
    migrate: bool = True,
) -> ListenerHandle:
    """Start the listener; port 0 picks a free port (see ``handle.port``).

    ``block=True`` serves until SIGTERM/SIGINT, then drains open associations and returns.
    """
    prepare(settings, migrate=migrate)
    if settings.listener.processes > 1:
        handle = _start_processes(settings)
    else:
        server = _Server(settings, settings.listener.port, reuse_port=False)
        server.start()
        handle = ListenerHandle(server.port, server.stop, [server])
    log_startup(settings, handle.port)
    assembler: _Assembler | None = None
    if assemble:
        assembler = _Assembler(settings)
        assembler.start()
        inner = handle._stop

        def stop_all(drain: float) -> None:
            inner(drain)
            assert assembler is not None
            assembler.stopped.set()
            assembler.join(timeout=10)

        handle._stop = stop_all
    if block:
        _install_signal_handlers(handle)
        handle.wait()
        log.info("listener stopped")
    return handle


def _install_signal_handlers(handle: ListenerHandle) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing open associations, then exiting", signum)
        threading.Thread(target=handle.stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: fixes the port number for the children."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _child_main(
    settings_data: dict[str, Any],
    port: int,
    ready: multiprocessing.synchronize.Event,
    parent_pid: int | None = None,
) -> None:
    from workers.runner import die_with_parent

    # first: a serve killed with SIGKILL (even while this child started) takes it along,
    # instead of leaving a listener that accepts studies nobody processes
    die_with_parent(parent_pid)
    from screener.logging_setup import configure_logging

    settings = Settings(**settings_data)
    configure_logging(settings.log_level)
    server = _Server(settings, port, reuse_port=True)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; Ctrl-C reaches all
    server.start()
    from screener.startup_heap import freeze_startup_heap

    freeze_startup_heap()
    ready.set()
    done.wait()
    server.stop(drain_seconds=30.0)


class _ListenerProcesses:
    """The child listener processes of one port (``listener.processes > 1``): started,
    started again one by one when they exit (``serve`` notices through
    :meth:`ListenerHandle.exited`), stopped. The parent holds the port bound (not
    listening) all along, so a restarted child gets the same port."""

    def __init__(self, settings: Settings) -> None:
        self.reservation = _reserve_port(settings.listener.host, settings.listener.port)
        self.port = int(self.reservation.getsockname()[1])
        self._mp = multiprocessing.get_context("spawn")
        self._data = settings.model_dump(mode="json")
        self._data["listener"]["port"] = self.port  # the reserved port, also when 0 was asked
        self.count = settings.listener.processes
        self.children: list[multiprocessing.process.BaseProcess] = []
        # each child's "listening" event: kept, since a child unpickles it only once started
        self._ready: list[multiprocessing.synchronize.Event] = []
        self._lock = threading.Lock()  # restart() and stop() never overlap
        self._stopping = False

    def _spawn(
        self,
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
        ready = self._mp.Event()
        args = (self._data, self.port, ready, os.getpid())
        child = self._mp.Process(target=_child_main, args=args, daemon=False)
        child.start()
        return child, ready

    def start(self) -> None:
        """Start every child and wait until each listens (60 s at most)."""
        started = [self._spawn() for _ in range(self.count)]
        self.children = [child for child, _ in started]
        self._ready = [ready for _, ready in started]
        deadline = time.monotonic() + 60
        for child, ready in started:
            while not ready.wait(0.1):
                if not child.is_alive() or time.monotonic() > deadline:
                    for other in self.children:
                        other.kill()
                    self.reservation.close()
                    raise RuntimeError(f"listener process {child.pid} did not start")

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c.pid is not None]

    def exited(self) -> list[tuple[int, int | None]]:
        """(slot, exit code) of each child that exited, once stopping is not the reason."""
        with self._lock:
            if self._stopping:
                return []
            return [(i, c.exitcode) for i, c in enumerate(self.children) if not c.is_alive()]

    def restart(self, slot: int) -> None:
        """Start a new child in ``slot`` (not waiting for it: one that fails to start is
        seen exited again, and counts against the restart rule)."""
        with self._lock:
            if self._stopping or self.children[slot].is_alive():
                return
            self.children[slot].close()
            self.children[slot], self._ready[slot] = self._spawn()
        log.info("listener process %d started again (pid %s)", slot + 1, self.children[slot].pid)

    def stop(self, drain_seconds: float) -> None:
        with self._lock:
            self._stopping = True
        for child in self.children:
            if child.is_alive() and child.pid is not None:
                child.terminate()  # SIGTERM: graceful drain in the child
        for child in self.children:
            child.join(timeout=drain_seconds + 10)
            if child.is_alive():
                log.error("listener process %s did not stop; killing it", child.pid)
                child.kill()
                child.join(timeout=5)
        self.reservation.close()


def _start_processes(settings: Settings) -> ListenerHandle:
    children = _ListenerProcesses(settings)
    children.start()
    return ListenerHandle(children.port, children.stop, children=children)
