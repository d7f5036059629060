"""C-STORE data sets received into reused, page-aligned memory, laid out as the spool file.

Why: pynetdicom gathers every data set in a new ``BytesIO``. A 10 MB instance faulted in
2,560 fresh zeroed pages (the kernel's ``clear_page`` and page faults: ~8% of the
listener's CPU in ``perf``), and the spool write then copied the bytes once more, into an
aligned staging buffer, because ``O_DIRECT`` needs aligned memory. Here a data set goes
into an anonymous private mapping from a small per-process pool, whose pages stay mapped
from one instance to the next, right after the bytes the spool file starts with (the
preamble and the File Meta Information), predicted from the command set and the
presentation context exactly as pynetdicom's ``Event.file_meta`` builds them. The whole
file then lies contiguous from the mapping's first, page-aligned byte, and
:func:`screener.direct_io.write_image` writes it with ``O_DIRECT`` where it is.

Nothing depends on the prediction being right: the handler compares the predicted bytes
with the ones it encodes itself (:meth:`ReceivedDataSet.file_image`) and copies through the
staging buffer when they differ.

:class:`ReceivedDataSet` is a ``BytesIO`` only because pynetdicom's primitives accept
nothing else; it overrides every method, so the empty ``BytesIO`` underneath stays unused.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blake3 import blake3
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA

from screener.direct_io import ALIGN
from screener.ingest import content_hasher

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

Hasher = blake3  # what :func:`screener.ingest.content_hasher` makes

PREAMBLE = b"\x00" * 128 + b"DICM"
INITIAL_BYTES = 16 * 1024 * 1024  # a new mapping; it grows (mremap) for larger data sets
KEEP_MAX_BYTES = 64 * 1024 * 1024  # larger mappings are unmapped after use, not pooled
POOL_SIZE = 4  # idle mappings kept per process
HASH_STEP = 1024 * 1024  # received bytes hashed at a time (fits a core's L2 cache)

_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def spool_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The bytes a spool file starts with: preamble, ``DICM`` and the File Meta Information
    pynetdicom's ``Event.file_meta`` gives an instance, encoded as pydicom encodes it.

    Encoded here because pydicom's writer took ~0.4 ms, and ``Event.file_meta`` as long
    again, of a ~5 ms C-STORE handler; a test holds the bytes equal to pydicom's.
    """

    def uid(value: str) -> bytes:
        raw = value.strip("\x00 ").encode("ascii")
        return raw + b"\x00" * (len(raw) % 2)

    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", uid(sop_class_uid)),
            _meta_element(0x0003, b"UI", uid(sop_instance_uid)),
            _meta_element(0x0010, b"UI", uid(transfer_syntax)),
            _meta_element(0x0012, b"UI", uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
        )
    )
    return PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _take(need: int) -> mmap.mmap:
    """An idle pooled mapping (grown to ``need``), else a new one."""
    with _pool_lock:
        mapping = _pool.pop() if _pool else None
    if mapping is not None and len(mapping) < need:
        try:
            mapping.resize(_padded(need))
        except OSError:  # mremap failed (a mapping with views never reaches the pool)
            _unmap(mapping)
            mapping = None
    if mapping is None:
        return mmap.mmap(
            -1, max(INITIAL_BYTES, _padded(need)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
    return mapping


def _has_views(mapping: mmap.mmap) -> bool:
    """Whether a view of ``mapping`` is still alive (a ``memoryview`` a caller kept, or
    one a reference cycle holds until the next collection): mmap then refuses to resize."""
    try:
        mapping.resize(len(mapping))  # the same size: mremap returns at once
    except BufferError:
        return True
    except OSError:
        return False
    return False


def _give(mapping: mmap.mmap) -> None:
    """Back to the pool; its pages stay mapped (``MADV_FREE``: the kernel may still take
    them back under memory pressure). Oversized mappings, or one too many, are unmapped; one
    with a view still alive is left to that view (reused, the view would see the next data
    set, and it could not grow)."""
    if _has_views(mapping):
        return
    with _pool_lock:
        keep = len(mapping) <= KEEP_MAX_BYTES and len(_pool) < POOL_SIZE
        if keep:
            _pool.append(mapping)
    if keep:
        if hasattr(mmap, "MADV_FREE"):
            mapping.madvise(mmap.MADV_FREE)
        return
    _unmap(mapping)


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view is still alive: the mapping goes when the view does
        pass


class ReceivedDataSet(io.BytesIO):
    """A data set being received: file-like like ``BytesIO``, stored after its spool prefix.

    ``prefix_of`` is called at the first write (the command set is decoded by then) and
    returns the predicted spool prefix, or ``b""`` where there is none (not a C-STORE).
    The memory goes back to the pool at :meth:`release` (or :meth:`close`); until then
    :meth:`getbuffer` views stay valid.
    """

    def __init__(self, prefix_of: Callable[[], bytes], hasher: Hasher | None = None) -> None:
        super().__init__()
        self._prefix_of = prefix_of
        self._hasher = hasher
        self._hashed = 0  # data set bytes given to the hasher
        self._map: mmap.mmap | None = None
        self._prefix = b""
        self._size = 0  # data set bytes held
        self._position = 0  # read/write position in the data set

    # -- writing (pynetdicom's DIMSE layer) ------------------------------------------------

    def _open(self, need: int) -> mmap.mmap:
        try:
            prefix = self._prefix_of()
        except Exception:  # noqa: BLE001 - no prediction: the spool write copies instead
            log.debug("no spool prefix predicted for a received data set", exc_info=True)
            prefix = b""
        mapping = _take(_padded(len(prefix) + need) + ALIGN)
        mapping[: len(prefix)] = prefix
        self._prefix, self._map = prefix, mapping
        return mapping

    def _room(self, end: int) -> mmap.mmap:
        """The mapping, grown so that ``end`` data set bytes and the file's padding fit."""
        mapping = self._map if self._map is not None else self._open(end)
        need = _padded(len(self._prefix) + end) + ALIGN
        if len(mapping) < need:
            new_size = max(need, 2 * len(mapping))
            try:
                mapping.resize(new_size)
            except (BufferError, OSError):  # a view is alive, or mremap failed: copy
                bigger = mmap.mmap(-1, new_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                bigger[: len(self._prefix) + self._size] = mapping[: len(self._prefix) + self._size]
                _unmap(mapping)  # not pooled: the live view still reads it
                self._map = mapping = bigger
        return mapping

    def write(self, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        end = self._position + n
        mapping = self._room(end)
        start = len(self._prefix)
        mapping[start + self._position : start + end] = view
        self._appended(n)
        return n

    def tail(self, n: int) -> memoryview:
        """Writable view of the next ``n`` data set bytes' place, for a socket to read
        fragment bytes into (the receive path's only copy is then the kernel's). They count
        only after :meth:`advance`; release the view before the next call (the mapping
        cannot grow, nor go back to the pool, while a view is alive)."""
        mapping = self._room(self._position + n)
        start = len(self._prefix) + self._position
        return memoryview(mapping)[start : start + n]

    def advance(self, n: int) -> None:
        """The ``n`` bytes a :meth:`tail` view received are data set bytes now."""
        self._appended(n)

    def _appended(self, n: int) -> None:
        """``n`` bytes were written at the position. Appended bytes are hashed every
        :data:`HASH_STEP` (still in the CPU's cache; a step per fragment would hand the GIL
        over, as blake3 releases it, for every PDU); anything but an append ends the hash."""
        if self._position != self._size:
            self._hasher = None
        self._position += n
        self._size = max(self._size, self._position)
        if self._hasher is not None and self._size - self._hashed >= HASH_STEP:
            self._hash_to_end()

    def _hash_to_end(self) -> None:
        if self._hasher is None or self._map is None or self._hashed == self._size:
            return
        start = len(self._prefix)
        with memoryview(self._map) as whole:
            self._hasher.update(whole[start + self._hashed : start + self._size])
        self._hashed = self._size

    def hasher(self) -> Hasher | None:
        """The hasher given every data set byte in order, or None (none was given, or the
        bytes were not all appended: a seek back, a truncation)."""
        self._hash_to_end()
        return self._hasher

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if size < 0:
            raise ValueError(f"negative size value {size}")
        if size < self._size:
            self._size = size
            self._hasher = None
        return size

    # -- reading -------------------------------------------------------------------------

    def getbuffer(self) -> memoryview:
        """The data set bytes, without a copy (valid until :meth:`release`)."""
        if self._map is None:
            return memoryview(b"")
        start = len(self._prefix)
        return memoryview(self._map)[start : start + self._size]

    def getvalue(self) -> bytes:
        return bytes(self.getbuffer())

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = self._size if size is None or size < 0 else min(self._size, start + size)
        if end <= start:
            return b""
        self._position = end
        assert self._map is not None
        return self._map[len(self._prefix) + start : len(self._prefix) + end]

    def read1(self, size: int | None = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Buffer) -> int:
        target = memoryview(buffer).cast("B")
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        rest = self.getbuffer()[self._position : self._size]
        limit = len(rest) if size is None or size < 0 else min(size, len(rest))
        found = bytes(rest[:limit]).find(b"\n")
        return self.read(limit if found < 0 else found + 1)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek value {position}")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def __len__(self) -> int:
        return self._size

    # -- the spool file --------------------------------------------------------------------

    def file_image(self, prefix: bytes) -> tuple[memoryview, int] | None:
        """(page-aligned view, file size) of ``prefix`` + the data set, zero-padded to a
        whole block, if this buffer holds exactly that ``prefix`` in front; else None."""
        if self._map is None or not self._prefix or prefix != self._prefix:
            return None
        size = len(prefix) + self._size
        padded = _padded(size)
        self._map[size:padded] = bytes(padded - size)
        return memoryview(self._map)[:padded], size

    def release(self) -> None:
        """Hand the memory back to the pool (kept out of it while a view is still alive)."""
        mapping, self._map = self._map, None
        self._prefix, self._size, self._position = b"", 0, 0
        self._hasher, self._hashed = None, 0
        if mapping is not None:
            _give(mapping)

    def close(self) -> None:
        self.release()
        super().close()


def predicted_prefix(message: DIMSEMessage, assoc: Any) -> bytes:
    """The spool prefix of ``message``'s data set, as ``Event.file_meta`` will build it:
    from the command's Affected SOP Class/Instance UIDs and the context's transfer syntax."""
    if not isinstance(message, C_STORE_RQ):
        return b""
    command = message.command_set
    context = next(cx for cx in assoc.accepted_contexts if cx.context_id == message.context_id)
    return spool_prefix(
        str(command.AffectedSOPClassUID),
        str(command.AffectedSOPInstanceUID),
        str(context.transfer_syntax[0]),
    )


class PooledDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with each new message's data set a
    :class:`ReceivedDataSet` (of ``data_set_type``, which a subclass may narrow)."""

    data_set_type: type[ReceivedDataSet] = ReceivedDataSet

    def start_message(self) -> DIMSEMessage:
        """The message being received; a new one, with its data set, at its first P-DATA."""
        if self.message is None:
            message = DIMSEMessage()
            message.data_set = self.data_set_type(
                lambda: predicted_prefix(message, self.assoc), hasher=content_hasher()
            )
            self.message = message
        return self.message

    def receive_primitive(self, primitive: P_DATA) -> None:
        self.start_message()
        super().receive_primitive(primitive)


def file_image_of(request: Any, prefix: bytes) -> tuple[memoryview, int] | None:
    """:meth:`ReceivedDataSet.file_image` of a request's data set (any other: None)."""
    stream = getattr(request, "DataSet", None)
    return stream.file_image(prefix) if isinstance(stream, ReceivedDataSet) else None


def hasher_of(request: Any) -> Hasher | None:
    """:meth:`ReceivedDataSet.hasher` of a request's data set (any other: None)."""
    stream = getattr(request, "DataSet", None)
    return stream.hasher() if isinstance(stream, ReceivedDataSet) else None


def release(request: Any) -> None:
    """Return the pooled memory of a served request's data set (any other: nothing)."""
    stream = getattr(request, "DataSet", None)
    if isinstance(stream, ReceivedDataSet):
        stream.release()
