"""The listener's receive path: memory bounded by construction, and still few copies.

Hostile peers (issue 9) could kill the old path with eight bytes: it allocated whatever PDU
length a peer claimed before anything was checked. Here:

* **Before association** a connection is held by one selector thread (:class:`_Gate`),
  not by pynetdicom threads: it must deliver a complete A-ASSOCIATE-RQ (type 0x01, at most
  :data:`MAX_ASSOCIATION_PDU` bytes) within ``association_request_timeout_seconds`` from
  the TCP accept (ARTIM-style: a trickle of bytes does not reset it; a TLS handshake counts
  too). Such connections are capped in total and per source address and never count
  against ``max_associations``. The AE titles and the association caps are checked on the
  request bytes; a refusal is an A-ASSOCIATE-RJ written by the gate. Only then does
  pynetdicom create the association, with the request already read (prefetched).
* **After association** every PDU's length is checked against its type before any byte of
  the body is buffered: release and abort PDUs are 4 bytes, association PDUs at most
  64 KiB, P-DATA-TF at most the maximum PDU size we announced (``listener.max_pdu``, or
  :data:`HARD_MAX_PDU` when that is 0). The body is read into an anonymous ``mmap`` whose
  pages only become memory as bytes arrive, so a claimed length costs nothing until it is
  sent. Data set bytes held per message are capped per association (``max_dataset_mb``)
  and across the process (``receive_budget_mb``): a message's bytes are charged as they
  arrive and stay charged while its data set is held (queued for the handler, or being
  handled) until it is released, closed or dropped (:class:`ChargedDataSet`). A command
  set is a few hundred bytes; one past :data:`MAX_COMMAND_BYTES` aborts the association.
  A PDU must complete within ``idle_timeout_seconds`` of the previous one, and no
  association outlives ``association_max_seconds``; a violation aborts the association
  (A-ABORT, then close).

A message's data set is received into pooled, page-aligned memory laid out as the spool
file (:mod:`screener.dicom.dataset_buffers`). Once its command set is decoded, each data set
PDU is read with one scatter read: the PDV item header into a small buffer, the fragment
straight to where the data set's next bytes go, so the kernel's copy is the only one and
the DIMSE layer is called only for the last fragment. Other PDUs, and a data set PDU laid
out otherwise (several items, a command item, another context), are read whole and their
PDV items handed on as ``memoryview`` slices (the DIMSE layer's write is then the copy).
While the association is established (Sta6) and nothing waits in the state machine's
queues, a P-DATA-TF is served inline: handed straight to the DIMSE layer, which is all
pynetdicom's DT-2 action does, without the event queue, the PDU queue and a turn of the
state machine. The next PDU is read in the same turn while the socket already holds it and
no primitive waits to be sent (a C-STORE response goes out first); anything else (a
release, an abort, a queued event) takes pynetdicom's path.

**Quiet reactors.** pynetdicom's two threads per association poll: the DUL every 1 ms for
socket data, the association every 1 ms for a decoded message — about 2.5% of a core per
open association, transferring or idle. Here both block until there is something to do:
the DUL in ``select`` on the peer socket and a wake-up socket that every primitive queued
for it rings, the association on an event that every decoded message and every ACSE
primitive (release, abort) sets; both still look at their timers at least every
:data:`REACTOR_WAIT_S`.
The classes replace pynetdicom internals by subclassing, so they are tied to the pynetdicom
version they were written against; :func:`supported` says whether it is that version.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import queue
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from screener.dicom import dataset_buffers
from screener.dicom.dataset_buffers import (
    PooledDIMSEServiceProvider,
    ReceivedDataSet,
)

log = logging.getLogger(__name__)

_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
_TESTED_VERSIONS = ("3.0.",)

MAX_ASSOCIATION_PDU = 64 * 1024  # an A-ASSOCIATE-RQ/AC is a few hundred bytes per context
HARD_MAX_PDU = 16 * 1024 * 1024  # P-DATA-TF length cap (and what we announce) for max_pdu 0
_MIN_ASSOCIATE_RQ = 68  # protocol version, reserved, two AE titles, 32 reserved bytes
_FIXED_LENGTH = {0x03: 4, 0x05: 4, 0x06: 4, 0x07: 4}  # RJ, RELEASE-RQ/RP, ABORT: 4 bytes
MAX_COMMAND_BYTES = 64 * 1024  # a C-STORE-RQ command set is a few hundred bytes
_SMALL_BODY = 1024 * 1024  # bodies up to this size go into a bytearray, larger: mmap
_POLL = 0.5  # longest blocking wait, so a killed DUL thread notices quickly
GC_INTERVAL_S = 5.0  # shortest time between the accept loop's garbage collections
REACTOR_WAIT_S = 0.05  # longest a reactor sleeps without a wake-up (timers, kill flags)
_ABORT_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])  # A-ABORT, source: provider


def supported() -> bool:
    """True for the pynetdicom versions whose internals these classes were checked against."""
    return str(pynetdicom.__version__).startswith(_TESTED_VERSIONS)


def effective_max_pdu(max_pdu: int) -> int:
    """The P-DATA-TF length we announce and enforce (0 in the settings: :data:`HARD_MAX_PDU`)."""
    return max_pdu if max_pdu > 0 else HARD_MAX_PDU


def allowed_length(pdu_type: int, max_pdu: int) -> tuple[int, int] | None:
    """(min, max) PDU length allowed for ``pdu_type``, or None for an unknown type."""
    if pdu_type == _P_DATA_TF:
        return 6, effective_max_pdu(max_pdu)  # at least one PDV item header
    if pdu_type in (0x01, 0x02):
        return _MIN_ASSOCIATE_RQ, MAX_ASSOCIATION_PDU
    if pdu_type in _FIXED_LENGTH:
        size = _FIXED_LENGTH[pdu_type]
        return size, size
    return None


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An encoded A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


def ae_title_of(raw: bytes) -> str:
    """An AE title field as DICOM reads it: leading and trailing spaces are not significant."""
    return raw.decode("latin-1").strip(" \x00")


def same_ae_title(received: str, configured: str) -> bool:
    """AE titles compared as DICOM pads them: spaces around them ignored, case significant."""
    return received.strip(" \x00") == configured.strip(" \x00")


def printable(value: str) -> str:
    """A peer-chosen string made safe for one log line (control characters escaped)."""
    return value[:64].encode("unicode_escape").decode("ascii")


@dataclass
class ReceiveBudget:
    """Data set bytes buffered across all associations of this process, with a ceiling."""

    limit: int
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, n: int) -> bool:
        with self.lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.used = max(0, self.used - n)


@dataclass(frozen=True)
class Limits:
    """The bounds a listener process enforces (see ``ListenerSettings``)."""

    max_pdu: int = 0
    association_request_timeout: float = 10.0
    idle_timeout: float = 60.0
    association_max_seconds: float = 3600.0
    max_associations: int = 64
    max_associations_per_address: int = 16
    max_pending: int = 256
    max_pending_per_address: int = 32
    max_dataset_bytes: int = 1024 * 1024 * 1024
    budget: ReceiveBudget = field(default_factory=lambda: ReceiveBudget(4 * 1024**3))


@dataclass(frozen=True)
class AssociationRequest:
    """What the gate read from an A-ASSOCIATE-RQ: enough to accept or refuse it."""

    called_ae_title: str
    calling_ae_title: str
    address: str
    port: int


class AssociationRefused(Exception):
    """Raised by a gate policy: answer A-ASSOCIATE-RJ (result, source, reason) and close."""

    def __init__(self, result: int, source: int, reason: int, why: str) -> None:
        super().__init__(why)
        self.rj = (result, source, reason)
        self.why = why


class _Deadline(Exception):
    """A receive deadline passed."""


class _PDataPDU:
    """A decoded P-DATA-TF PDU whose PDV values are views into the received buffer."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[int, memoryview]]) -> None:
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # like pynetdicom's own P_DATA_TF.to_primitive: fill the list after the setter
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(self.items)  # type: ignore[arg-type]
        return primitive


def split_pdv_items(body: bytearray | bytes | mmap.mmap) -> list[tuple[int, memoryview]]:
    """PDV items of a P-DATA-TF PDU body (after the 6-byte PDU header), zero-copy.

    Each item is (presentation context ID, message control header + fragment).
    """
    view = memoryview(body)
    items: list[tuple[int, memoryview]] = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 6:
            raise ValueError("truncated PDV item header")
        (length,) = struct.unpack_from(">L", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV item length outside the PDU")
        items.append((view[offset + 4], view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    if not items:
        raise ValueError("P-DATA-TF PDU without PDV items")
    return items


class WakingQueue(queue.Queue[Any]):
    """A queue whose ``put`` also wakes the reactor that waits for it."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _rewire(old: queue.Queue[Any], wake: Callable[[], None]) -> WakingQueue:
    """A waking replacement of ``old`` holding its items (none, at association start)."""
    new = WakingQueue(wake)
    while True:
        try:
            new.put_nowait(old.get_nowait())
        except queue.Empty:
            return new


def _read_plain(sock: socket.socket, views: list[memoryview], wait: float) -> int | None:
    """One ``readv`` of a plain TCP socket, scattered across ``views``; None after waiting up
    to ``wait`` for bytes.

    ``socket.recv_into`` on a socket with a timeout polls before every read (poll, then
    recvfrom); the descriptor is non-blocking already (CPython implements timeouts so), so
    read it directly and wait in ``select`` only when it has nothing.
    """
    try:
        return os.readv(sock.fileno(), views)
    except BlockingIOError:
        select.select([sock], [], [], wait)
        return None


def _read_tls(sock: socket.socket, views: list[memoryview], wait: float) -> int | None:
    """One ``recv_into`` of a TLS socket into the first of ``views`` (records are decrypted
    there); None on timeout. Its timeout is set (an ioctl) only when it must change: near the
    deadline, and back."""
    timeout = sock.gettimeout()
    if timeout is None or wait < timeout or timeout < _POLL:
        sock.settimeout(wait)
    try:
        return sock.recv_into(views[0], len(views[0]))
    except TimeoutError:
        return None


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` (they were filled)."""
    while n:
        first = views[0]
        if n < len(first):
            views[0] = first[n:]
            return
        n -= len(first)
        del views[0]


def _readable_now(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


class BoundedAssociationSocket(AssociationSocket):
    """An acceptor socket that first yields the A-ASSOCIATE-RQ the gate already read, and
    whose readiness check waits (see "Quiet reactors" above) instead of polling."""

    prefetched: bytearray

    @property
    def ready(self) -> bool:
        if getattr(self, "prefetched", None):
            return True
        polled = bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        dul = getattr(self.assoc, "dul", None)
        if polled or not isinstance(dul, BoundedDULServiceProvider) or dul.has_work():
            return polled
        sock = self.socket
        if sock is None or dul.wake_reader is None:
            return False
        try:
            readable, _, _ = select.select([sock, dul.wake_reader], [], [], REACTOR_WAIT_S)
        except (OSError, ValueError):
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        if dul.wake_reader in readable:
            dul.drain_wakeups()
        return sock in readable


class BoundedDULServiceProvider(DULServiceProvider):
    """DUL whose PDU reads are bounded in size and time (module docstring)."""

    limits: Limits
    started: float
    last_pdu: float
    dataset_bytes: int
    command_bytes: int

    wake_reader: socket.socket | None = None
    wake_writer: socket.socket | None = None

    def setup_limits(self, limits: Limits) -> None:
        self.limits = limits
        self.started = self.last_pdu = time.monotonic()
        self.dataset_bytes = 0  # data set bytes of the message being received
        self.command_bytes = 0  # command set bytes of the message being received
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.to_provider_queue = _rewire(self.to_provider_queue, self.wake)
        self._run_loop_delay = 0.0001  # the wait is in the socket's readiness check

    def wake(self) -> None:
        """Something was queued for this reactor (a primitive to send)."""
        writer = self.wake_writer
        if writer is not None:
            try:
                writer.send(b"\0")
            except OSError:  # full (it is awake already) or closed (it has ended)
                pass

    def drain_wakeups(self) -> None:
        reader = self.wake_reader
        if reader is not None:
            try:
                while reader.recv(4096):
                    pass
            except OSError:
                pass

    def has_work(self) -> bool:
        """Work this reactor must not wait for: queued events or primitives, or a kill."""
        return bool(self._kill_thread or self.event_queue.queue or self.to_provider_queue.queue)

    def run(self) -> None:
        """The thread's body, with the association's end: not an override of
        ``run_reactor``, because pynetdicom bound the thread's target to the base class's
        ``run_reactor`` in ``__init__``, before the class was swapped."""
        try:
            super().run()
        finally:
            self._end()

    def _end(self) -> None:
        """The association ended: its data set bytes go back to the receive budget (the
        message being received, and messages the association reactor will never serve),
        and the wake-up sockets are closed."""
        self._release_dataset()
        dimse = getattr(self.assoc, "dimse", None)
        waiting = getattr(dimse, "msg_queue", None)
        while waiting is not None:
            try:
                _, primitive = waiting.get_nowait()
            except queue.Empty:
                break
            dataset_buffers.release(primitive)
        for end in (self.wake_reader, self.wake_writer):
            if end is not None:
                end.close()
        self.wake_reader = self.wake_writer = None

    def _release_dataset(self) -> None:
        if getattr(self, "dataset_bytes", 0):
            self.limits.budget.give(self.dataset_bytes)
            self.dataset_bytes = 0

    def charge_message(self, stream: ChargedDataSet) -> None:
        """The bytes counted for the message being received go with its data set, before the
        DIMSE layer may queue it for the handler (which may release it at once)."""
        stream.hold(self.limits.budget, self.dataset_bytes)
        self.dataset_bytes = 0

    def message_done(self, stream: ChargedDataSet, completed: bool) -> None:
        """After the DIMSE layer took a P-DATA: a completed message keeps its charge (given
        back when its data set is released) and the next message's counts start at 0; an
        incomplete one's charge comes back to this count."""
        if completed:
            self.command_bytes = 0
        else:
            self.dataset_bytes += stream.unhold()

    def _deadline(self) -> float:
        return min(
            self.last_pdu + self.limits.idle_timeout,
            self.started + self.limits.association_max_seconds,
        )

    def _fill(self, views: list[memoryview], deadline: float) -> bool:
        """Fill ``views``, in order, from the prefetched bytes, then the socket (one read of
        a plain socket scatters across them); False when the connection closed."""
        wrapper = self.socket
        assert isinstance(wrapper, AssociationSocket)
        views = [view for view in views if len(view)]
        pending = getattr(wrapper, "prefetched", None)
        while pending and views:
            got = min(len(views[0]), len(pending))
            views[0][:got] = pending[:got]
            del pending[:got]
            _consume(views, got)
        if not views:
            return True
        sock = wrapper.socket
        if sock is None:
            return False
        read = _read_tls if isinstance(sock, ssl.SSLSocket) else _read_plain
        if sock.gettimeout() is None:
            sock.settimeout(_POLL)  # plain TCP: its descriptor becomes non-blocking
        while views:
            if self._kill_thread:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
            try:
                n = read(sock, views, min(remaining, _POLL))
            except (OSError, ValueError):
                return False
            if n is None:
                continue  # waited; nothing arrived
            if not n:
                return False
            _consume(views, n)
        return True

    def _violation(self, why: str) -> None:
        """The peer broke a bound: A-ABORT, close the connection (the FSM sees Evt17)."""
        log.warning("aborting association: %s", why)
        wrapper = self.socket
        if wrapper is not None and wrapper.socket is not None:
            try:
                wrapper.socket.settimeout(1.0)
                wrapper.socket.sendall(_ABORT_PDU)
            except (OSError, ValueError):
                pass
            wrapper.close()
        else:
            self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        while self._read_one_pdu():
            self._idle_timer.restart()  # the reactor restarts it once per turn
            if not self._next_pdu_inline():
                return

    def _read_one_pdu(self) -> bool:
        """Read, bound and dispatch one PDU; True for a P-DATA-TF served inline."""
        header = bytearray(6)
        try:
            if not self._fill([memoryview(header)], self._deadline()):
                self.event_queue.put("Evt17")  # transport connection closed
                return False
            pdu_type, _, length = struct.unpack(">BBL", header)
            bounds = allowed_length(pdu_type, self.limits.max_pdu)
            if bounds is None:
                self._violation(f"unknown PDU type 0x{pdu_type:02X}")
                return False
            if not bounds[0] <= length <= bounds[1]:
                self._violation(
                    f"PDU type 0x{pdu_type:02X} claims {length} bytes "
                    f"(allowed {bounds[0]} to {bounds[1]})"
                )
                return False
            if pdu_type == _P_DATA_TF:
                stream = self._data_phase_stream()
                if stream is not None:
                    return self._read_into_data_set(length, *stream)
            body: bytearray | mmap.mmap
            body = bytearray(length) if length <= _SMALL_BODY else mmap.mmap(-1, length)
            if not self._fill([memoryview(body)], self._deadline()):
                log.warning("connection closed in the middle of a PDU")
                self.event_queue.put("Evt17")
                return False
        except _Deadline:
            self._violation("PDU not received within the idle or association deadline")
            return False
        self.last_pdu = time.monotonic()
        if pdu_type != _P_DATA_TF:
            self._decode_generic(header + body)
            return False
        return self._dispatch_pdata(body)

    def _dispatch_pdata(self, body: bytearray | bytes | mmap.mmap) -> bool:
        """A whole P-DATA-TF body: split, count, and served (True: inline) or queued."""
        try:
            items = split_pdv_items(body)
        except ValueError as exc:
            self._violation(f"invalid P-DATA-TF PDU: {exc}")
            return False
        if not self._account(items):
            return False
        return self._serve_pdata(items)

    def _serve_pdata(self, items: list[tuple[int, memoryview]]) -> bool:
        if self._serve_inline():
            # pynetdicom's DT-2 (Sta6 + Evt10 -> Sta6), without its two queues and the
            # state machine's turn: the DIMSE layer copies the fragments out at once
            self.assoc.dimse.receive_primitive(_PDataPDU(items).to_primitive())
            return True
        self.event_queue.put("Evt10")  # P-DATA-TF PDU received
        self._recv_pdu.put(_PDataPDU(items))  # type: ignore[arg-type]
        return False

    def _data_phase_stream(self) -> tuple[ReceivedDataSet, int] | None:
        """(data set, presentation context) of the message being received, when its next
        P-DATA-TF may be read straight into that data set: served inline (nothing queued
        before it) and the message past its command set, so data set fragments come next."""
        if not self._serve_inline():
            return None
        message = self.assoc.dimse.message
        if message is None or message.context_id is None or message._data_set_file:
            return None
        stream = message.data_set
        if not isinstance(stream, ReceivedDataSet):
            return None
        return stream, message.context_id

    def _read_into_data_set(self, length: int, stream: ReceivedDataSet, context_id: int) -> bool:
        """A P-DATA-TF in a message's data phase, read with one scatter read: its PDV item
        header into a small buffer and the rest where the data set's next bytes go.

        A data set PDU is almost always one data set PDV item of the message's context (what
        pynetdicom and dcmtk send); then the kernel's copy is the only one, and the DIMSE
        layer is called only for the last fragment. Anything else (several items, a command
        fragment, another context) is copied out and takes the whole-PDU path.
        """
        n = length - 6  # fragment bytes, if it is one item: PDV header 4 + 1 + 1
        if not self._hold(n):
            return False
        head = bytearray(6)
        tail = stream.tail(n)
        try:
            if not self._fill([memoryview(head), tail], self._deadline()):
                log.warning("connection closed in the middle of a PDU")
                self.event_queue.put("Evt17")
                return False
            item_length, item_context, control = struct.unpack(">LBB", head)
            direct = item_length == length - 4 and item_context == context_id
            direct = direct and not control & 0x01  # one data set item of this message
            body = b"" if direct else bytes(head) + tail.tobytes()
        finally:
            tail.release()
        self.last_pdu = time.monotonic()
        if not direct:
            self._unhold(n)
            return self._dispatch_pdata(body)
        stream.advance(n)
        if not control & 0x02:
            return True  # not the last fragment: nothing for the DIMSE layer to do yet
        # the last fragment: an empty one with the same header completes the message
        return self._serve_pdata([(context_id, memoryview(bytes([control])))])

    def _serve_inline(self) -> bool:
        """Whether a P-DATA-TF may skip the event queue and the state machine: established
        (Sta6) with no event or PDU queued, DT-2 is all they would do, and they would do it
        next."""
        return (
            self.state_machine.current_state == "Sta6"
            and not self.event_queue.queue
            and not self._recv_pdu.queue
        )

    def _next_pdu_inline(self) -> bool:
        """Whether to read the next PDU in this reactor turn: it is here already, nothing
        waits to be sent (a C-STORE response goes out first) and it may be served inline."""
        if self._kill_thread or self.to_provider_queue.queue or not self._serve_inline():
            return False
        wrapper = self.socket
        if wrapper is None:
            return False
        if getattr(wrapper, "prefetched", None):
            return True
        sock = wrapper.socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket):
            return sock.pending() > 0 or _readable_now(sock)
        if not isinstance(wrapper, BoundedAssociationSocket):  # nowhere to keep a header
            return _readable_now(sock)
        # one non-blocking read answers "is it here?" and takes the next PDU's header
        # (what select and a header read took two syscalls for)
        head = bytearray(6)
        try:
            n = os.readv(sock.fileno(), [head])
        except (OSError, ValueError):  # BlockingIOError included: not here yet
            return False
        if n:
            wrapper.prefetched = head[:n]
        return True  # n == 0: closed; the next read sees it and reports Evt17

    def _account(self, items: list[tuple[int, memoryview]]) -> bool:
        """Count the command and data set bytes of the message being received; False
        (aborted) past a ceiling. The counts start again only when the DIMSE layer completes
        the message (:meth:`message_done`), never at a command fragment."""
        for _, value in items:
            if not value[0] & 0x01:
                if not self._hold(len(value) - 1):
                    return False
                continue
            self.command_bytes += len(value) - 1
            if self.command_bytes > MAX_COMMAND_BYTES:
                self._violation(f"command set larger than {MAX_COMMAND_BYTES} bytes")
                return False
        return True

    def _hold(self, n: int) -> bool:
        """Count ``n`` more data set bytes of this message; False (aborted) past a ceiling."""
        if self.dataset_bytes + n > self.limits.max_dataset_bytes:
            self._violation("data set larger than listener.max_dataset_mb")
            return False
        if not self.limits.budget.take(n):
            self._violation("receive memory budget (listener.receive_budget_mb) exhausted")
            return False
        self.dataset_bytes += n
        return True

    def _unhold(self, n: int) -> None:
        self.limits.budget.give(n)
        self.dataset_bytes -= n

    def _decode_generic(self, bytestream: bytearray) -> None:
        """Any other PDU: pynetdicom's own decoder."""
        try:
            pdu, event = self._decode_pdu(bytestream)
        except Exception:  # noqa: BLE001 - pynetdicom answers any decode error with Evt19
            log.warning("unable to decode a received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


class ChargedDataSet(ReceivedDataSet):
    """A received data set that holds its share of the receive budget until it is released,
    closed or dropped (``IOBase.__del__`` closes it), wherever it is then: queued for the
    handler, being handled, or never served."""

    _budget: ReceiveBudget | None = None
    _charged = 0

    def hold(self, budget: ReceiveBudget, n: int) -> None:
        """Take over ``n`` bytes already taken from ``budget``."""
        self._budget = budget
        self._charged += n

    def unhold(self) -> int:
        """Hand the charge back (to the DUL's count, the message being incomplete)."""
        charged, self._charged = self._charged, 0
        return charged

    def release(self) -> None:
        super().release()
        charged, self._charged = self._charged, 0
        if charged and self._budget is not None:
            self._budget.give(charged)


class ChargedDIMSEServiceProvider(PooledDIMSEServiceProvider):
    """Each new message's data set a :class:`ChargedDataSet`; a completed message takes
    the DUL's count with it (:meth:`BoundedDULServiceProvider.charge_message`)."""

    data_set_type = ChargedDataSet

    def receive_primitive(self, primitive: P_DATA) -> None:
        message = self.start_message()
        stream, dul = message.data_set, self.dul
        if not isinstance(stream, ChargedDataSet) or not isinstance(dul, BoundedDULServiceProvider):
            super().receive_primitive(primitive)
            return
        dul.charge_message(stream)
        try:
            super().receive_primitive(primitive)
        finally:
            dul.message_done(stream, self.message is not message)


class QuietAssociation(Association):
    """pynetdicom's acceptor reactor with the 1 ms sleep replaced by a wait on an event
    that decoded DIMSE messages and ACSE primitives set (see "Quiet reactors" above)."""

    wakeup: threading.Event

    def setup_wakeup(self) -> None:
        self.wakeup = threading.Event()
        self.dimse.msg_queue = _rewire(self.dimse.msg_queue, self.wakeup.set)
        self.dul.to_user_queue = _rewire(self.dul.to_user_queue, self.wakeup.set)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0's Association._run_reactor, but for the wait
        self._is_paused = False
        served = False
        while not self._kill:
            # paused while waiting: a thread that pauses the reactor (abort, release) need
            # not wait for the wait; the checkpoint below holds the reactor until resumed
            self._is_paused = True
            if not served:
                self.wakeup.wait(REACTOR_WAIT_S)
            self.wakeup.clear()
            served = False
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                try:
                    self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
                finally:
                    dataset_buffers.release(msg)  # whatever the handler did: budget back
                served = True

            if self.is_established and self.acse.is_release_requested():
                # released before the answer leaves: the peer may close the connection as
                # soon as it reads it, and the close must not be logged as "closed"
                self.is_released = True
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _CheapCopyContext(PresentationContext):
    """A supported context whose ``deepcopy`` copies only what negotiation may change.

    pynetdicom deep-copies the server's supported contexts for every association: 171
    contexts x 38 transfer syntaxes, each UID re-validated, cost 20-45 ms of CPU per
    association (single-study associations are the common case). UIDs are immutable, so a
    copy of the context's own attributes with fresh lists is as safe and ~50x cheaper.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        new = PresentationContext.__new__(PresentationContext)
        new.__dict__.update(
            {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}
        )
        return new


def cheap_to_copy(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """The same contexts, each a :class:`_CheapCopyContext` (for the server's template)."""
    out: list[PresentationContext] = []
    for cx in contexts:
        cheap = _CheapCopyContext.__new__(_CheapCopyContext)
        cheap.__dict__.update(cx.__dict__)
        out.append(cheap)
    return out


class BoundedRequestHandler(RequestHandler):
    """Gives each association the bounded socket and DUL, and its prefetched request."""

    server: BoundedAssociationServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert type(sock) is AssociationSocket and type(assoc.dul) is DULServiceProvider
        sock.__class__ = BoundedAssociationSocket
        assert isinstance(sock, BoundedAssociationSocket)
        sock.prefetched = self.server.take_prefetched(self.request)
        assoc.dul.__class__ = BoundedDULServiceProvider
        assert isinstance(assoc.dul, BoundedDULServiceProvider)
        assoc.dul.setup_limits(self.server.limits)
        assert type(assoc.dimse) is DIMSEServiceProvider
        assoc.dimse.__class__ = ChargedDIMSEServiceProvider  # data sets in pooled memory
        assert type(assoc) is Association
        assoc.__class__ = QuietAssociation
        assert isinstance(assoc, QuietAssociation)
        assoc.setup_wakeup()
        self.server.register(self.client_address[0], assoc)
        return assoc


@dataclass
class _Pending:
    """A connection that has not yet delivered its A-ASSOCIATE-RQ."""

    sock: socket.socket
    address: tuple[Any, ...]
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    need: int = 6  # bytes wanted in total so far (header, then header + body)
    handshaking: bool = False


Policy = Callable[[AssociationRequest, "BoundedAssociationServer"], None]
OnRefusal = Callable[[str, str, str], None]  # (calling AE or "", "host:port", why)


class BoundedAssociationServer(ThreadedAssociationServer):
    """An association server whose connections pass the gate before pynetdicom sees them."""

    limits: Limits
    policy: Policy | None = None
    on_refusal: OnRefusal | None = None
    reuse_port = False
    request_queue_size = 1024  # listen backlog (socketserver's 5 made bursts wait seconds)

    def configure(
        self, limits: Limits, policy: Policy | None, on_refusal: OnRefusal | None
    ) -> None:
        self.limits = limits
        self.policy = policy
        self.on_refusal = on_refusal
        self._prefetched: dict[int, bytearray] = {}
        self._live: list[tuple[str, Any]] = []
        self._live_lock = threading.Lock()
        self._gate = _Gate(self)
        self._gate.start()
        self.contexts = cheap_to_copy(self.contexts)
        self._registered = 0  # associations handed to pynetdicom, ever
        self._ended_at_collect = 0
        self._last_collect = time.monotonic()

    def service_actions(self) -> None:
        """Collect ended associations' reference cycles: at most every
        :data:`GC_INTERVAL_S`, and only when an association ended since the last time.

        pynetdicom runs a full ``gc.collect()`` every 60 turns of the accept loop whatever
        happened; with the listener's heap that is 25-35 ms of CPU each time.
        """
        now = time.monotonic()
        if now - self._last_collect < GC_INTERVAL_S:
            return
        self._last_collect = now
        live, _ = self.live_counts("")
        ended = self._registered - live
        if ended > self._ended_at_collect:
            gc.collect()
            self._ended_at_collect = ended

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: the TLS handshake happens in the gate, not in the accept loop."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._gate.admit(client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._gate.add(request, client_address)

    def take_prefetched(self, sock: Any) -> bytearray:
        return self._prefetched.pop(id(sock), bytearray())

    def register(self, host: str, assoc: Any) -> None:
        with self._live_lock:
            self._live.append((host, assoc))
            self._registered += 1

    def live_counts(self, host: str) -> tuple[int, int]:
        """(associations of this process, of them from ``host``) handed to pynetdicom."""
        with self._live_lock:
            self._live = [(h, a) for h, a in self._live if a.is_alive() or not a._started_dul]
            return len(self._live), sum(1 for h, _ in self._live if h == host)

    def hand_over(self, sock: socket.socket, address: Any, request: bytearray) -> None:
        """A complete request passed the policy: pynetdicom takes the connection over."""
        sock.settimeout(None)
        self._prefetched[id(sock)] = request
        try:
            self.finish_request(sock, address)
        except Exception:  # noqa: BLE001 - one broken connection must not stop the gate
            log.exception("could not start an association")
            self._prefetched.pop(id(sock), None)
            self.shutdown_request(sock)

    def server_close(self) -> None:
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.stop()
        super().server_close()


class _Gate(threading.Thread):
    """One selector thread holding every connection until its A-ASSOCIATE-RQ is complete."""

    def __init__(self, server: BoundedAssociationServer) -> None:
        super().__init__(name="association-gate", daemon=True)
        self.server = server
        self.limits = server.limits
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.incoming: list[_Pending] = []
        self.per_address: dict[str, int] = {}
        self.count = 0
        self.stopped = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.refused_at_capacity = 0
        self._last_capacity_warning = 0.0

    # --- called from the accept loop ---
    def admit(self, address: Any) -> bool:
        host = str(address[0])
        with self.lock:
            if (
                self.count >= self.limits.max_pending
                or self.per_address.get(host, 0) >= self.limits.max_pending_per_address
            ):
                self.refused_at_capacity += 1
                now = time.monotonic()
                if now - self._last_capacity_warning > 10:
                    self._last_capacity_warning = now
                    log.warning(
                        "refusing connections: %d waiting for their association request "
                        "(%d from %s); %d refused so far",
                        self.count,
                        self.per_address.get(host, 0),
                        host,
                        self.refused_at_capacity,
                    )
                return False
            self.count += 1
            self.per_address[host] = self.per_address.get(host, 0) + 1
            return True

    def add(self, sock: socket.socket, address: Any) -> None:
        deadline = time.monotonic() + self.limits.association_request_timeout
        entry = _Pending(sock, address, deadline)
        with self.lock:
            self.incoming.append(entry)
        self._wake()

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()
        self._wake()
        self.join(timeout=5)

    # --- the gate thread ---
    def run(self) -> None:
        entries: dict[int, _Pending] = {}
        while not self.stopped.is_set():
            with self.lock:
                new, self.incoming = self.incoming, []
            for entry in new:
                if self._start(entry):
                    entries[id(entry)] = entry
            timeout = _POLL
            if entries:
                soonest = min(e.deadline for e in entries.values())
                timeout = max(0.0, min(timeout, soonest - time.monotonic()))
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    try:
                        self.wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                entry = key.data
                if id(entry) in entries and self._step(entry):
                    del entries[id(entry)]
            now = time.monotonic()
            for key_id, entry in list(entries.items()):
                if now >= entry.deadline:
                    log.info(
                        "closing a connection from %s: no complete association request "
                        "within %.0f s",
                        entry.address[0],
                        self.limits.association_request_timeout,
                    )
                    self._drop(entry)
                    del entries[key_id]
        for entry in entries.values():
            self._drop(entry)
        with self.lock:
            leftover, self.incoming = self.incoming, []
        for entry in leftover:
            self._drop(entry, registered=False)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()

    def _start(self, entry: _Pending) -> bool:
        try:
            entry.sock.setblocking(False)
            context = self.server.ssl_context
            if context is not None:
                entry.sock = context.wrap_socket(
                    entry.sock, server_side=True, do_handshake_on_connect=False
                )
                entry.handshaking = True
            self.selector.register(entry.sock, selectors.EVENT_READ, entry)
        except (OSError, ValueError):
            self._drop(entry, registered=False)
            return False
        if entry.handshaking:
            return not self._step(entry)
        return True

    def _release(self, entry: _Pending, registered: bool = True) -> None:
        """The connection leaves the gate: unregister it and stop counting it."""
        if registered:
            try:
                self.selector.unregister(entry.sock)
            except (KeyError, ValueError, OSError):
                pass
        host = str(entry.address[0])
        with self.lock:
            self.count -= 1
            left = self.per_address.get(host, 1) - 1
            if left > 0:
                self.per_address[host] = left
            else:
                self.per_address.pop(host, None)

    def _drop(self, entry: _Pending, registered: bool = True) -> None:
        self._release(entry, registered)
        try:
            entry.sock.close()
        except OSError:
            pass

    def _step(self, entry: _Pending) -> bool:
        """Progress one connection; True when it left the gate (handed over or dropped)."""
        sock = entry.sock
        if entry.handshaking:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self.selector.modify(sock, selectors.EVENT_READ, entry)
                return False
            except ssl.SSLWantWriteError:
                self.selector.modify(sock, selectors.EVENT_WRITE, entry)
                return False
            except (OSError, ValueError) as exc:
                log.info("TLS handshake with %s failed: %s", entry.address[0], exc)
                self._drop(entry)
                return True
            entry.handshaking = False
            self.selector.modify(sock, selectors.EVENT_READ, entry)
        while len(entry.buffer) < entry.need:
            try:
                chunk = sock.recv(entry.need - len(entry.buffer))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            except (OSError, ValueError):
                self._drop(entry)
                return True
            if not chunk:
                self._drop(entry)
                return True
            entry.buffer += chunk
            if entry.need == 6 and len(entry.buffer) == 6:
                pdu_type, _, length = struct.unpack(">BBL", entry.buffer)
                if pdu_type != _A_ASSOCIATE_RQ or not (
                    _MIN_ASSOCIATE_RQ <= length <= MAX_ASSOCIATION_PDU
                ):
                    log.info(
                        "closing a connection from %s: first PDU type 0x%02X, %d bytes, "
                        "is not an acceptable A-ASSOCIATE-RQ",
                        entry.address[0],
                        pdu_type,
                        length,
                    )
                    self._send_and_drop(entry, _ABORT_PDU)
                    return True
                entry.need = 6 + length
        self._complete(entry)
        return True

    def _send_and_drop(self, entry: _Pending, pdu: bytes) -> None:
        try:
            entry.sock.setblocking(True)
            entry.sock.settimeout(1.0)
            entry.sock.sendall(pdu)
            entry.sock.shutdown(socket.SHUT_WR)  # FIN after the PDU: the peer reads it, no reset
        except (OSError, ValueError):
            pass
        self._drop(entry)

    def _complete(self, entry: _Pending) -> None:
        data = entry.buffer
        request = AssociationRequest(
            called_ae_title=ae_title_of(bytes(data[10:26])),
            calling_ae_title=ae_title_of(bytes(data[26:42])),
            address=str(entry.address[0]),
            port=int(entry.address[1]),
        )
        try:
            if self.server.policy is not None:
                self.server.policy(request, self.server)
        except AssociationRefused as refusal:
            if self.server.on_refusal is not None:
                try:
                    self.server.on_refusal(
                        request.calling_ae_title,
                        f"{request.address}:{request.port}",
                        refusal.why,
                    )
                except Exception:  # noqa: BLE001 - logging must not stop the gate
                    log.exception("refusal hook failed")
            self._send_and_drop(entry, associate_rj(*refusal.rj))
            return
        self._release(entry)
        self.server.hand_over(entry.sock, entry.address, data)
