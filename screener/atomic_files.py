"""Atomic, durable file writes: after a crash a reader finds the old file or the new one.

The bytes go to a temporary file in the target folder, which is flushed and fsynced, then
renamed over the target (atomic on POSIX), and the folder is fsynced so the rename itself
survives a power cut. Without the folder fsync a "written" file can vanish on reboot.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_counter = threading.Lock()
_serial = 0


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (new names, renames) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    global _serial
    with _counter:  # unique per thread and process: writers may share a folder
        _serial += 1
        serial = _serial
    return path.with_name(f".{path.name}.{os.getpid()}.{serial}.tmp")


def write_bytes(path: Path, data: bytes | memoryview, *, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically and durably (parents created)."""
    write_parts(path, [data], sync_dir=sync_dir)


def write_parts(path: Path, parts: list[bytes | memoryview], *, sync_dir: bool = True) -> None:
    """As :func:`write_bytes`, for data in several buffers (no joined copy)."""

    def write(fh: BinaryIO) -> None:
        for part in parts:
            fh.write(part)

    write_with(path, write, sync_dir=sync_dir)


def write_with(path: Path, write: Callable[[BinaryIO], object], *, sync_dir: bool = True) -> None:
    """Replace ``path`` atomically and durably by what ``write`` writes to the open binary
    file it is given: for serialisers that want a file (``np.savez``, ``torch.save``) rather
    than one ``bytes``, without a copy in memory. When ``write`` raises, the old ``path`` (or
    none) stays and the temporary file is removed."""

    def produce(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    _replace_with(path, produce, sync_file=False, sync_dir=sync_dir)


def write_text(path: Path, text: str, *, sync_dir: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def copy_file(source: Path, path: Path, *, sync_dir: bool = True) -> None:
    """Replace ``path`` by a copy of ``source``, atomically and durably (contents only)."""

    def write(fh: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)

    write_with(path, write, sync_dir=sync_dir)


def write_by_path(path: Path, produce: Callable[[Path], object], *, sync_dir: bool = True) -> None:
    """As :func:`write_with`, for writers that only take a file name (``torch.onnx.export``):
    ``produce`` writes the temporary path it is given, which is then fsynced and renamed."""
    _replace_with(path, produce, sync_file=True, sync_dir=sync_dir)


def _replace_with(
    path: Path, produce: Callable[[Path], object], *, sync_file: bool, sync_dir: bool
) -> None:
    """``produce`` writes a temporary file beside ``path`` (fsynced here when ``sync_file``),
    which is renamed over ``path``; on any error it is removed and ``path`` left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        produce(tmp)
        if sync_file:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
