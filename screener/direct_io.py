"""Files written durably, and read back, past the page cache (``O_DIRECT``).

Why: the listener writes every received instance once, fsyncs it, and answers the C-STORE;
prepare reads it later. Written through the page cache, each file first costs the kernel
fresh cache pages (allocated, zeroed, copied into), then a writeback of all of them at the
fsync: measured here 3-14.5 ms of system CPU per 10 MB, the most expensive part of a
receive, and more than dcmtk's ``storescp`` spends on a whole instance. The same bytes
written with ``O_DIRECT`` from a page-aligned buffer, then ``fdatasync``, cost 0.5-1.0 ms:
the device reads them from our buffer, and nothing is left in the cache to write back.
The guarantee is the same: when :func:`write_new_file` returns, the bytes and the file's
size are on stable storage (the caller still renames and fsyncs the directory).

The data is copied into a page-aligned staging buffer (``O_DIRECT`` needs aligned memory,
offsets and lengths); the last block is padded and the file truncated to its true size.
Staging buffers come from a small process-wide pool, so memory stays bounded however many
associations write at once; a writer that finds none free, or a filesystem that refuses
``O_DIRECT`` (``EINVAL``: some network and FUSE filesystems), gets ``None`` and writes
through the page cache as before. Bytes that already lie in page-aligned memory, laid out
as the file (the listener's received data sets, :mod:`screener.dicom.dataset_buffers`), are
written from there by :func:`write_image`, without the staging copy.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

ALIGN = 4096  # memory, offset and length alignment: a multiple of every logical block size
STAGING_BYTES = 4 * 1024 * 1024  # copied and written per O_DIRECT write
POOL_SIZE = 8  # staging buffers per process (32 MiB at most)
IMAGE_WRITE_BYTES = 64 * 1024 * 1024  # per write from an aligned image (a multiple of ALIGN)

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0: not Linux; every call falls back

_pool: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
_pool_made = 0
_pool_lock = threading.Lock()
_refused_devices: set[int] = set()  # st_dev of filesystems that refused O_DIRECT


def _anonymous(size: int) -> mmap.mmap:
    """Page-aligned memory of this process only: private, so a forked child that reads or
    writes into its copy never changes the parent's (a shared mapping would be shared)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _take_staging() -> mmap.mmap | None:
    """A free staging buffer, a new one while the pool is below its size, else None."""
    global _pool_made
    try:
        return _pool.get_nowait()
    except queue.Empty:
        pass
    with _pool_lock:
        if _pool_made >= POOL_SIZE:
            return None
        _pool_made += 1
    return _anonymous(STAGING_BYTES)


def _write_block(fd: int, view: memoryview) -> None:
    n = os.write(fd, view)
    if n != len(view):  # a short O_DIRECT write would leave the next offset unaligned
        raise OSError(errno.EIO, f"short direct write ({n} of {len(view)} bytes)")


def _copy_and_write(fd: int, staging: mmap.mmap, chunks: Iterable[bytes | memoryview]) -> int:
    buffer = memoryview(staging)
    try:
        fill = written = 0
        for chunk in chunks:
            source = memoryview(chunk).cast("B")
            while source:
                n = min(len(source), STAGING_BYTES - fill)
                buffer[fill : fill + n] = source[:n]
                fill += n
                source = source[n:]
                if fill == STAGING_BYTES:
                    _write_block(fd, buffer)
                    written += fill
                    fill = 0
        if fill:
            padded = -(-fill // ALIGN) * ALIGN
            buffer[fill:padded] = bytes(padded - fill)
            _write_block(fd, buffer[:padded])
            written += fill
            os.ftruncate(fd, written)  # drop the padding: the file has its true size
        return written
    finally:
        buffer.release()


def _device_for_direct(path: Path) -> int | None:
    """The ``st_dev`` of ``path``'s folder where ``O_DIRECT`` may be tried, else None."""
    if not _O_DIRECT:
        return None
    try:
        device = path.parent.stat().st_dev
    except OSError:
        return None  # the caller's own open reports it
    return None if device in _refused_devices else device


def _write_direct(path: Path, device: int, mode: int, write: Callable[[int], int]) -> int | None:
    """Create ``path`` with ``O_DIRECT``, ``write(fd)``, ``fdatasync``; None if refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, mode)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused(device, path)
        return None
    try:
        written = write(fd)
        os.fdatasync(fd)  # data, and the size it needs to be read back
    except BaseException as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.EINVAL and exc.filename is None:
            _refused(device, path)  # the open passed, the first write was refused
            return None
        raise
    os.close(fd)
    return written


def write_new_file(
    path: Path, chunks: Iterable[bytes | memoryview], mode: int = 0o640
) -> int | None:
    """Create ``path`` (exclusively), write ``chunks`` with ``O_DIRECT``, ``fdatasync``.

    Returns the bytes written, or None when no file is left because direct I/O is not
    available here (no free staging buffer, or the filesystem refuses it): the caller then
    writes the file through the page cache, so ``chunks`` must be iterable twice (a list or
    tuple). On any other error the file is removed and the error raised.
    """
    device = _device_for_direct(path)
    if device is None:
        return None
    staging = _take_staging()
    if staging is None:
        return None
    try:
        return _write_direct(path, device, mode, lambda fd: _copy_and_write(fd, staging, chunks))
    finally:
        _pool.put(staging)


def write_image(path: Path, image: memoryview, size: int, mode: int = 0o640) -> int | None:
    """Like :func:`write_new_file`, for a file already laid out in page-aligned memory:
    ``image`` starts on a page, holds the ``size`` bytes of the file, then zeros up to a
    whole :data:`ALIGN` block. Written from where it is, without the staging copy."""
    padded = -(-size // ALIGN) * ALIGN
    if len(image) < padded:
        raise ValueError(f"image of {len(image)} bytes cannot hold {size} padded to {padded}")
    device = _device_for_direct(path)
    if device is None:
        return None

    def write(fd: int) -> int:
        for offset in range(0, padded, IMAGE_WRITE_BYTES):
            _write_block(fd, image[offset : min(padded, offset + IMAGE_WRITE_BYTES)])
        if padded != size:
            os.ftruncate(fd, size)  # drop the padding: the file has its true size
        return size

    return _write_direct(path, device, mode, write)


def _refused(device: int, path: Path) -> None:
    _refused_devices.add(device)
    log.warning(
        "the filesystem of %s refuses O_DIRECT: files there are written through the page cache",
        path.parent,
    )


READ_BUFFER_MAX = 64 * 1024 * 1024  # larger files are read through the page cache

_reader = threading.local()  # per thread: one aligned read buffer, reused (no fresh pages)


def read_file(path: Path) -> memoryview | None:
    """The whole of ``path`` read with ``O_DIRECT`` into this thread's reused buffer.

    The counterpart of :func:`write_new_file`: a file written past the page cache is not in
    it, and reading it through the cache would make this process pay for the fresh cache
    pages instead (measured: prepare +7 ms per 8 MB film, what the listener saved). The
    view is valid until this thread's next call. None: read it through the page cache (no
    ``O_DIRECT`` here, a file above :data:`READ_BUFFER_MAX`, or a filesystem refusing it).
    """
    if not _O_DIRECT:
        return None
    try:
        status = path.stat()
    except OSError:
        return None  # the caller's own open reports it
    size = status.st_size
    if size > READ_BUFFER_MAX or status.st_dev in _refused_devices:
        return None
    need = max(ALIGN, -(-size // ALIGN) * ALIGN)
    buffer: mmap.mmap | None = getattr(_reader, "buffer", None)
    if buffer is None or len(buffer) < need:
        buffer = _reader.buffer = _anonymous(need)
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused(status.st_dev, path)
        return None
    view = memoryview(buffer)
    try:
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:need]], got)
            if n <= 0:
                raise OSError(errno.EIO, f"{path} ended at {got} of {size} bytes")
            got += n
    except OSError as exc:
        if exc.errno == errno.EINVAL and got == 0:
            _refused(status.st_dev, path)
            return None
        raise
    finally:
        os.close(fd)
    return view[:size]


class ViewReader:
    """A read-only binary file over bytes in memory, for parsers that take a file object
    (pydicom): each ``read`` copies only what it returns, as reading a file would."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = len(self._data) if size is None or size < 0 else min(len(self._data), start + size)
        self._position = max(start, end)
        return bytes(self._data[start:end])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}
        position = base[whence] + offset
        if position < 0:
            raise ValueError("negative seek position")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position
