"""The spool: received instances on disk, written atomically and durably.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<digest[:16]>.dcm``,
``digest`` the hex part of the content digest (BLAKE3; SHA-256 for files spooled before
migration 0005). Every path component is a validated UID or a hex digest, so a hostile
dataset cannot steer a write outside the spool. A file becomes visible under its final name
only after its bytes and its directory entry are on disk (temp file, fsync, rename, fsync of
the directory), so a crash at any point leaves either nothing or a complete file, never a
partial one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from screener import direct_io
from screener.atomic_files import fsync_dir
from screener.dicom.uid_validation import require_uid

TEMP_PREFIX = ".incoming-"


@dataclass(frozen=True)
class SpoolKey:
    """The validated identity of one received instance version."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    content_digest: str  # "<algorithm>:<64 hex>" (or the bare hex)

    def relative_path(self) -> Path:
        study = require_uid(self.study_instance_uid, "StudyInstanceUID")
        series = require_uid(self.series_instance_uid, "SeriesInstanceUID")
        sop = require_uid(self.sop_instance_uid, "SOPInstanceUID")
        digest = self.content_digest.rpartition(":")[2].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("the content digest must end in a 64-character hex digest")
        return Path(study) / series / f"{sop}.{digest[:16]}.dcm"


def _make_dirs_durably(root: Path, relative_dir: Path) -> Path:
    """Create ``root/relative_dir``; fsync the parent of every directory newly created."""
    current = root
    for part in relative_dir.parts:
        child = current / part
        if not child.is_dir():
            try:
                child.mkdir()
            except FileExistsError:
                pass  # another thread or process made it; its creator fsyncs the parent
            else:
                fsync_dir(current)
        current = child
    return current


def _write_synced(
    temp: Path,
    chunks: Iterable[bytes | memoryview],
    direct: bool = False,
    image: tuple[memoryview, int] | None = None,
) -> int:
    """Create ``temp`` exclusively, write ``chunks``, fsync; return the bytes written.

    ``direct``: past the page cache where the filesystem allows it (:mod:`screener.direct_io`);
    ``image``: the same bytes, already page-aligned in memory (view, size), written from there.
    """
    if direct and image is not None:
        image_written = direct_io.write_image(temp, *image)
        if image_written is not None:
            return image_written
    if direct:
        chunks = tuple(chunks)  # iterated again if direct I/O is unavailable
        direct_written = direct_io.write_new_file(temp, chunks)
        if direct_written is not None:
            return direct_written
    written = 0
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                written += n
                view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return written


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview], direct: bool = False) -> int:
    """Write ``chunks`` to ``path`` atomically and durably; return the bytes written."""
    directory = path.parent
    temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    written = _write_synced(temp, chunks, direct)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return written


def store_while_hashing(
    spool_dir: Path,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    chunks: Iterable[bytes | memoryview],
    digest: Future[str],
    direct: bool = False,
    image: tuple[memoryview, int] | None = None,
) -> tuple[Path, int, str]:
    """Like :func:`store`, but the content digest is computed while the bytes are written.

    The temp file is written and fsynced while ``digest`` (the content digest,
    ``"blake3:<hex>"``, computed in another thread: blake3 and os.write both release the
    GIL) completes; the file is then renamed to its digest-derived name. Returns path, size
    and the digest as ``digest`` gave it. ``direct``, ``image``: see :func:`_write_synced`.
    """
    placeholder = SpoolKey(study_instance_uid, series_instance_uid, sop_instance_uid, "0" * 64)
    directory = _make_dirs_durably(spool_dir, placeholder.relative_path().parent)
    temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        size = _write_synced(temp, chunks, direct, image)
        content_digest = digest.result()
        key = SpoolKey(study_instance_uid, series_instance_uid, sop_instance_uid, content_digest)
        path = directory / key.relative_path().name
        if path.is_file():  # identical re-send: the first copy is already durable
            temp.unlink()
            return path, path.stat().st_size, content_digest
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path, size, content_digest


def store(spool_dir: Path, key: SpoolKey, chunks: Iterable[bytes | memoryview]) -> tuple[Path, int]:
    """Store one instance version; an identical file already in place is kept as it is.

    Returns the absolute path and its size in bytes.
    """
    relative = key.relative_path()
    directory = _make_dirs_durably(spool_dir, relative.parent)
    path = directory / relative.name
    if path.is_file():
        # Same UIDs and same digest prefix: the content was already made durable by the
        # first writer (the digest is checked against the database by the caller).
        return path, path.stat().st_size
    return path, write_atomic(path, chunks)


def remove_stale_temp_files(spool_dir: Path) -> int:
    """Delete temp files left by a crash mid-write (never acknowledged); return how many."""
    if not spool_dir.is_dir():
        return 0
    removed = 0
    for temp in spool_dir.rglob(f"{TEMP_PREFIX}*"):
        try:
            temp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def filesystem_fill(path: Path) -> float:
    """Fraction of the filesystem holding ``path`` that the service can no longer write
    (what back-pressure and ``status --check`` look at).

    Counted as ``df`` counts what a non-root user may use: ``1 - f_bavail / f_blocks``. Blocks
    reserved for root (ext4 keeps 5% by default) are full for the service user, so a
    filesystem that refuses our writes reads as 100%, never as 95%.
    """
    usage = os.statvfs(path)
    if not usage.f_blocks:
        return 1.0
    return min(1.0, max(0.0, 1.0 - usage.f_bavail / usage.f_blocks))
