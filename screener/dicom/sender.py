"""C-STORE SCU: send the screener's output files to one PACS destination.

Associations are kept open per destination (``send_files(..., idle_seconds=...)``): the
objects of several studies and several delivery passes travel over one association, which
is released after it was idle that long, at process exit and when a worker
shuts down (:func:`close_pooled_associations`). An association proposes every SOP class
the screener writes (SR, Secondary Capture, Parametric Map) in the usual transfer syntaxes,
so the next study fits it; a file that does not fit gets a fresh association that proposes
it too. An association the peer closed while it was idle (PACS restart, its idle timeout)
is noticed and opened again, once per call; when that fails too, the files fail with the
association error and the destination's circuit breaker counts it.

A file whose own transfer syntax the peer accepted is streamed from disk as it is (the PACS
gets the bytes we wrote, nothing is decoded); for a peer that accepts only other syntaxes
(e.g. only Implicit VR Little Endian) the file is decoded and sent in one it accepted.

The outcome is reported per file so the delivery bookkeeping (``screener.delivery``) can
retry exactly what failed. Optional TLS (``destination.tls``, see
``screener.dicom.tls.client_context``): ``client_ca`` is the CA that must have signed the
PACS certificate (empty: the system trust store), and ``certificate``/``private_key`` are
offered to PACS that require mutual TLS.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from screener.dicom.association_answer import AssociationAnswer
from screener.dicom.low_latency import LowLatencyAE
from screener.dicom.tls import TlsConfigError, client_context
from screener.settings import Destination

log = logging.getLogger(__name__)


def stored(status: int) -> bool:
    """Whether a C-STORE status means the object was stored: Success, or a Warning
    (PS3.7 C.1.5: 0001 or Bxxx; PS3.4 B.2.3 names B000, B006 and B007, and PACS vendors
    use other Bxxx codes of their own). A stored object must never be sent again."""
    return status in (0x0000, 0x0001) or status & 0xF000 == 0xB000


def out_of_resources(status: int) -> bool:
    """Refused: Out of Resources (PS3.4 B.2.3: A7xx), about the PACS, not the object."""
    return status & 0xFF00 == 0xA700


# What the screener writes (screener.reports): proposed on every association so that the
# next study's objects fit the one that is open. Basic Text/Enhanced SR for older writers.
OUTPUT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR (TID 1500)
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (heatmap)
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
)
BASE_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255

Pair = tuple[str, str]  # (SOP Class UID, Transfer Syntax UID)


@dataclass
class SendOutcome:
    """What happened to each file on one attempt: None = stored, else the error text."""

    destination: str
    per_file: dict[Path, str | None] = field(default_factory=dict)
    association_error: str | None = None
    associations_opened: int = 0  # 0: everything went over an association already open
    out_of_resources: bool = False  # a C-STORE was refused for lack of resources (A7xx)

    @property
    def stored(self) -> list[Path]:
        return [p for p, err in self.per_file.items() if err is None]

    @property
    def failed(self) -> dict[Path, str]:
        return {p: err for p, err in self.per_file.items() if err is not None}


def _contexts_for(pairs: Iterable[Pair]) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax): a file is streamed from
    disk as it is when a context in its own syntax is accepted (:func:`_store_one`), and the
    base syntaxes let a peer that takes only those still get every object."""
    wanted = {(sop, ts) for sop in OUTPUT_SOP_CLASSES for ts in BASE_SYNTAXES}
    for sop, ts in pairs:
        wanted.update({(sop, ts), *((sop, base) for base in BASE_SYNTAXES)})
    ordered = sorted(wanted)[:MAX_CONTEXTS]
    return [build_context(sop, [ts]) for sop, ts in ordered]


# --------------------------------------------------------------------------- the pool


@dataclass
class _Open:
    """One established association and what it proposed."""

    assoc: Association
    proposed: frozenset[Pair]
    idle_since: float = 0.0
    idle_seconds: float = 0.0
    active_poll: float | None = None  # the DUL loop delay while parked was changed from this


# pynetdicom polls an open association every millisecond in two threads, ~60 ms of CPU per
# second while it only waits. A parked association has its reactor paused (as pynetdicom
# itself does around each request) and its DUL thread polling every IDLE_POLL_SECONDS.
IDLE_POLL_SECONDS = 0.05


def _park(item: _Open) -> None:
    assoc: Any = item.assoc
    try:
        assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + 1.0
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0005)
        item.active_poll = float(assoc.dul._run_loop_delay)
        assoc.dul._run_loop_delay = IDLE_POLL_SECONDS
    except AttributeError:  # another pynetdicom: it keeps polling, nothing breaks
        log.debug("cannot park an idle association", exc_info=True)


def _wake(item: _Open) -> bool:
    """Resume a parked association; True when it can carry the next C-STORE.

    A parked association must have received nothing: any data, a closed socket or a
    primitive waiting in the DUL means the peer released, aborted or closed it.
    """
    assoc: Any = item.assoc
    try:
        dul = assoc.dul
        if item.active_poll is not None:
            dul._run_loop_delay = item.active_poll
        transport = dul.socket
        usable = bool(
            assoc.is_established
            and dul.is_alive()
            and dul.event_queue.empty()
            and dul.peek_next_pdu() is None
            and transport is not None
            and transport.socket is not None
            and not transport.ready
        )
    except AttributeError:
        usable = bool(assoc.is_established)
    finally:
        checkpoint = getattr(assoc, "_reactor_checkpoint", None)
        if checkpoint is not None:
            checkpoint.set()
    return usable


class AssociationPool:
    """Idle associations per destination, for this process; released when idle too long.

    A caller takes an association out (nobody else uses it meanwhile) and puts it back
    when done; several threads sending to one destination each get their own.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._idle: dict[str, list[_Open]] = {}
        self._reaper: threading.Thread | None = None
        self._pid = os.getpid()

    def _forked(self) -> None:
        """In a forked child the parent's sockets are not ours: forget them, release nothing."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._idle = {}
            self._reaper = None

    def take(self, key: str) -> _Open | None:
        """An idle association to ``key`` that still works, or None."""
        while True:
            with self._lock:
                self._forked()
                pooled = self._idle.get(key, [])
                if not pooled:
                    return None
                item = pooled.pop()
            usable = _wake(item)
            if usable and time.monotonic() - item.idle_since < item.idle_seconds:
                return item
            if usable:  # due for release (the reaper is late)
                _release(item)
            else:  # the peer released, aborted or closed it while it was idle
                log.info("an idle association to %s is gone; opening a new one", _peer(item))
                _abort(item)

    def put(self, key: str, item: _Open, idle_seconds: float) -> None:
        if idle_seconds <= 0 or not item.assoc.is_established:
            _release(item)
            return
        _park(item)
        item.idle_since, item.idle_seconds = time.monotonic(), idle_seconds
        with self._lock:
            self._forked()
            self._idle.setdefault(key, []).append(item)
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(
                    target=self._reap, name="association-reaper", daemon=True
                )
                self._reaper.start()
            self._lock.notify_all()

    def _reap(self) -> None:
        """Release associations idle for longer than their ``idle_seconds``."""
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    return
                now = time.monotonic()
                expired: list[_Open] = []
                next_due: float | None = None
                for key, items in list(self._idle.items()):
                    keep = []
                    for item in items:
                        due = item.idle_since + item.idle_seconds
                        if due <= now or not item.assoc.is_established:
                            expired.append(item)
                        else:
                            keep.append(item)
                            next_due = due if next_due is None else min(next_due, due)
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                if not expired:
                    if next_due is None:
                        self._reaper = None
                        return
                    self._lock.wait(timeout=max(0.05, next_due - now))
                    continue
            for item in expired:
                _release(item)

    def close_all(self) -> int:
        """Release every idle association (shutdown); returns how many there were."""
        with self._lock:
            self._forked()
            items = [item for pooled in self._idle.values() for item in pooled]
            self._idle = {}
            self._lock.notify_all()
        for item in items:
            _release(item)
        return len(items)

    def __len__(self) -> int:
        with self._lock:
            self._forked()
            return sum(len(items) for items in self._idle.values())


def _abort(item: _Open) -> None:
    """A broken association: abort it (a release would wait for an answer that never comes)."""
    try:
        item.assoc.abort()
    except Exception:
        log.debug("aborting an association failed", exc_info=True)


def _release(item: _Open) -> None:
    """Release (A-RELEASE) an association; one the peer already closed is aborted."""
    try:
        if not _wake(item):
            item.assoc.abort()
        elif item.assoc.is_established:
            item.assoc.release()
    except Exception:  # a peer that vanished mid-release: nothing left to close
        log.debug("releasing an association failed", exc_info=True)


def _peer(item: _Open) -> str:
    return str(getattr(item.assoc.acceptor, "ae_title", "peer")).strip()


_POOL = AssociationPool()
# pynetdicom aborts an association once the main thread has ended, before ``atexit`` runs:
# release them earlier, with the hook concurrent.futures uses (runs before threads are
# joined at interpreter exit); plain atexit where it does not exist
_at_exit = getattr(threading, "_register_atexit", atexit.register)
_at_exit(_POOL.close_all)


def close_pooled_associations() -> int:
    """Release this process's idle associations (worker shutdown, tests)."""
    return _POOL.close_all()


def pooled_associations() -> int:
    """How many associations this process holds open while idle."""
    return len(_POOL)


def _pool_key(destination: Destination, calling_ae_title: str, timeout: float) -> str:
    return f"{destination.model_dump_json()}|{calling_ae_title}|{timeout}"


# --------------------------------------------------------------------------- sending


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout: float = 30.0,
    idle_seconds: float = 0.0,
) -> SendOutcome:
    """C-STORE ``paths`` to ``destination``; never raises for I/O.

    ``idle_seconds`` > 0 keeps the association open that long for the next call (to the
    same destination, from this process); 0 releases it at the end of this call.
    """
    outcome = SendOutcome(destination=destination.name)
    datasets: list[tuple[Path, Pair]] = []
    for path in paths:
        try:
            # headers only: a batch of large heatmaps must not sit in memory at once
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            datasets.append((Path(path), pair))
        except Exception as exc:  # a missing/corrupt outbox file fails only itself
            outcome.per_file[Path(path)] = f"cannot read {path}: {exc}"
    if not datasets:
        return outcome

    calling = destination.calling_ae_title or calling_ae_title
    key = _pool_key(destination, calling, timeout)
    needed = frozenset(pair for _, pair in datasets)
    current = _POOL.take(key)
    if current is not None and not needed <= current.proposed:
        _release(current)  # a new kind of object: one association that proposes it too
        current = None
    reopens = 0
    pending = list(datasets)
    while pending:
        if current is None:
            current, error = _open(destination, calling, timeout, needed, idle_seconds)
            if current is None:
                outcome.association_error = error
                break
            outcome.associations_opened += 1
        path, pair = pending[0]
        result, broken, status = _store_one(current.assoc, path, pair)
        if status is not None and out_of_resources(status):
            outcome.out_of_resources = True
        if broken:
            # the association broke under this C-STORE (peer closed it, abort, timeout):
            # open it again once and resend; a second break is the destination's failure
            _abort(current)
            current = None
            if reopens:
                outcome.association_error = f"association lost: {result}"
                break
            reopens += 1
            log.info("association to %s lost during a C-STORE; opening it again", destination.name)
            continue
        outcome.per_file[path] = result
        pending.pop(0)
    if current is not None:
        _POOL.put(key, current, idle_seconds)
    if outcome.association_error is not None:
        for path, _ in datasets:
            outcome.per_file.setdefault(path, f"{destination.name}: {outcome.association_error}")
    log.info(
        "C-STORE to %s: %d stored, %d failed, %d association(s) opened",
        destination.name,
        len(outcome.stored),
        len(outcome.failed),
        outcome.associations_opened,
    )
    return outcome


def _open(
    destination: Destination,
    calling: str,
    timeout: float,
    needed: frozenset[Pair],
    idle_seconds: float,
) -> tuple[_Open | None, str]:
    """A new association proposing the screener's outputs and ``needed``; or the error."""
    try:
        context = client_context(destination.tls)
    except (OSError, TlsConfigError, ValueError) as exc:
        return None, f"TLS setup failed: {exc}"
    # the PACS certificate must be valid for the configured host name or address
    tls_args = None if context is None else (context, destination.host)
    ae = LowLatencyAE(ae_title=calling)  # no Nagle or delayed-ACK waits per C-STORE
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    # pynetdicom releases an association silent for network_timeout on its own: not
    # before the pool would (an association is parked for up to idle_seconds)
    ae.network_timeout = timeout + idle_seconds + 5.0
    ae.connection_timeout = timeout
    contexts = _contexts_for(needed)
    ae.requested_contexts = contexts
    try:
        answer = AssociationAnswer()
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=answer.handlers,
        )
    except Exception as exc:  # socket/TLS errors surface here on some platforms
        return None, f"association failed: {exc}"
    if not assoc.is_established:
        return None, answer.outcome(assoc)
    proposed = frozenset((str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in contexts)
    return _Open(assoc=assoc, proposed=proposed), ""


def _accepted_as_is(assoc: Association, pair: Pair) -> bool:
    """Whether the peer accepted the file's SOP class in the file's own transfer syntax."""
    sop_class, syntax = pair
    return any(
        str(cx.abstract_syntax) == sop_class and str(cx.transfer_syntax[0]) == syntax
        for cx in assoc.accepted_contexts
    )


def _store_one(assoc: Association, path: Path, pair: Pair) -> tuple[str | None, bool, int | None]:
    """One C-STORE of the file at ``path`` ((SOP class, transfer syntax) ``pair``): (error or
    None, association broken, the peer's status if it answered).

    Where the peer accepted the file's own syntax, its data set is streamed from disk as it
    is (pynetdicom's chunked send: never decoded or encoded again, the PACS gets the bytes
    we wrote; about 15% less CPU for an SR and a 1024-px heatmap SC). Otherwise it is
    decoded, and pynetdicom encodes it in a syntax the peer accepted (e.g. Implicit VR
    Little Endian).

    No response at all (the peer aborted or closed the connection, or the DIMSE timeout
    ran out and pynetdicom aborted) means the association is gone, even if its reactor
    thread has not said so yet; a status, even an error status, means it still works.
    """
    dataset: Path | pydicom.Dataset = path
    if _accepted_as_is(assoc, pair):
        # read by send_c_store on every call; set here, not once at import, so nothing
        # else in the process can have switched it off in between
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    else:
        try:
            dataset = pydicom.dcmread(path)
        except Exception as exc:  # the outbox file went bad: it fails, the association is fine
            return f"C-STORE failed: cannot read {path}: {exc}", False, None
    try:
        status = assoc.send_c_store(dataset)
    except (ValueError, AttributeError) as exc:  # no context for it, or no file meta
        return f"C-STORE failed: {exc}", False, None
    except Exception as exc:
        return f"C-STORE failed: {exc}", True, None
    if not status or "Status" not in status:
        return "C-STORE: no response (connection lost or timed out)", True, None
    code = int(status.Status)
    comment = status.get("ErrorComment", "")
    if stored(code):
        if code:
            log.warning("C-STORE of %s stored with warning 0x%04X %s", path.name, code, comment)
        return None, False, code
    return f"C-STORE status 0x{code:04X} {comment}".strip(), False, code
