"""The prepared-image file between the CPU stages: a JSON header, then raw array bytes.

``np.savez`` cost ~2 ms per study to write and ~0.3-0.5 ms per image to read (zip
directory, per-member headers, copies), and the infer consumer reads every image on its
CPU-bound loader (issue 11). This format is read with one open and one ``readinto`` per
wanted member straight into the array's own memory, and written with one ``writev`` of the
parts, without joining them.

Layout (little-endian)::

    MAGIC (8 bytes) | u32 version | u32 header length | header (UTF-8 JSON)
    | zero padding to a multiple of ALIGN | array bytes, each at a multiple of ALIGN

The header is the caller's dict plus ``"arrays"``: per array its name, dtype (``<f4`` or
``|u1``), shape, and its offset (from the end of the padded header) and length in bytes.
Reading trusts nothing in the file: magic, version, the header length against a cap and
the file size, each member's name, dtype, shape and extent are checked, and any failure is a
ValueError naming the file. A file that begins like a zip archive is the previous version's
``np.savez`` file (:class:`NpzFile`); :func:`read` reads it through ``np.load`` (no pickle),
so jobs prepared before an upgrade are still read after it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"PSPREP\r\n"  # \r\n: a text-mode or newline-mangling copy fails the magic check
VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # np.savez: the previous version's prepared files
ALIGN = 64
MAX_HEADER = 1 << 20  # a real header is a few hundred bytes (source UIDs, path, meta)
MAX_NDIM = 8
_PREFIX = struct.Struct("<8sII")
# the only dtypes prepared files hold, spelled with their byte order
DTYPES: dict[str, np.dtype[Any]] = {"<f4": np.dtype("<f4"), "|u1": np.dtype("|u1")}
NAMES = ("network_input", "work_image", "display_image")  # also the order in the file
_FIRST_READ = 4096  # prefix and header in one read (a longer header takes a second)


class NpzFile(ValueError):
    """The file is an ``np.savez`` archive (the previous format), not this one."""


@dataclass(frozen=True)
class Contents:
    header: dict[str, Any]  # the writer's header dict, without "arrays"
    arrays: dict[str, np.ndarray]  # the members read (writeable, owning their memory)
    stored: frozenset[str]  # every member the file holds, read or not


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """The file as buffers: prefix and header, then each array's own bytes (no copy of a
    C-contiguous little-endian array; others are converted once)."""
    if "arrays" in header:
        raise ValueError('"arrays" is the format\'s own header key')
    entries: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    offset = 0
    unknown = set(arrays) - set(NAMES)
    if unknown:
        raise ValueError(f"prepared arrays {sorted(unknown)} are not part of the format")
    for name in [n for n in NAMES if n in arrays]:  # display last: a skipped read ends early
        array = arrays[name]
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder != "|" else array.dtype
        if dtype.str not in DTYPES:
            raise TypeError(f"prepared array {name!r}: dtype {array.dtype} is not stored")
        array = np.require(array, dtype=dtype, requirements="C")
        entries.append(
            {
                "name": name,
                "dtype": dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
            }
        )
        blobs.append(array.reshape(-1).view(np.uint8).data)
        offset = _aligned(offset + array.nbytes)
    # ASCII JSON (non-ASCII as \u escapes): valid UTF-8 whatever the strings hold, lone
    # surrogates from a badly encoded DICOM value included
    text = json.dumps({**header, "arrays": entries}).encode("ascii")
    if len(text) > MAX_HEADER:
        raise ValueError(f"prepared-file header of {len(text)} bytes is over {MAX_HEADER}")
    head = _PREFIX.pack(MAGIC, VERSION, len(text)) + text
    parts: list[bytes | memoryview] = [head, bytes(_aligned(len(head)) - len(head))]
    for blob, entry in zip(blobs, entries, strict=True):
        parts.append(blob)
        parts.append(bytes(_aligned(entry["nbytes"]) - entry["nbytes"]))
    parts[-1] = b""  # no padding after the last part (or after the header alone)
    return [p for p in parts if len(p)]


def write(path: Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Create or replace ``path`` in place with one ``writev`` of the parts. Not atomic and
    not fsynced, as ``np.savez`` into ``open(path, "wb")`` was: prepare rewrites every
    file of a job when it runs again, and a torn file is refused by :func:`read`."""
    parts = encode(header, arrays)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            written = os.writev(fd, views)
            if not written:
                raise OSError(f"{path}: write made no progress")
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
    finally:
        os.close(fd)


def _fail(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid prepared file ({why})")


def _read_exact(fh: io.FileIO, view: memoryview, path: Path) -> None:
    """Fill ``view`` from the current position; a short file is corrupt, not a short read."""
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise _fail(path, "truncated")
        done += got


def _entry(raw: Any, data_size: int, path: Path) -> tuple[str, np.dtype[Any], tuple[int, ...], int]:
    """One array entry of the header, checked against the allow-lists and the file size."""
    if not isinstance(raw, dict):
        raise _fail(path, "array entry is not an object")
    name, dtype_name, shape = raw.get("name"), raw.get("dtype"), raw.get("shape")
    offset, nbytes = raw.get("offset"), raw.get("nbytes")
    if name not in NAMES:
        raise _fail(path, f"unknown array {name!r}")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(path, f"array {name}: dtype {dtype_name!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise _fail(path, f"array {name}: bad shape {shape!r}")
    if not (type(offset) is int and type(nbytes) is int and offset >= 0 and nbytes >= 0):
        raise _fail(path, f"array {name}: bad offset/length")
    dtype = DTYPES[dtype_name]
    if int(np.prod(shape, dtype=object)) * dtype.itemsize != nbytes:
        raise _fail(path, f"array {name}: shape {shape} does not match {nbytes} bytes")
    if offset + nbytes > data_size:
        raise _fail(path, f"array {name}: bytes {offset}+{nbytes} past the end of the file")
    return name, dtype, tuple(shape), offset


def _read_npz(path: Path, skip: Collection[str]) -> Contents:
    """The previous format (``np.savez``, no pickle), for files written before an upgrade.

    A torn or corrupt archive is this module's ValueError, as for the current format: zip,
    zlib, npy and JSON errors are not what the callers (the report stage) catch."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = frozenset(data.files) - {"header"}
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in stored if name not in skip}
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        RecursionError,
        struct.error,
    ) as exc:
        raise _fail(path, f"np.savez file: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise _fail(path, "np.savez file: header is not an object")
    return Contents(header=header, arrays=arrays, stored=stored)


def read(path: Path, *, skip: Collection[str] = ()) -> Contents:
    """The header and every member not in ``skip`` (whose bytes are never read), from a
    file of this format or an ``np.savez`` file of the previous one."""
    try:
        return _read(path, skip)
    except NpzFile:
        return _read_npz(path, skip)


def _read(path: Path, skip: Collection[str]) -> Contents:
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        first = fh.read(min(size, _FIRST_READ))
        if first[: len(ZIP_MAGIC)] == ZIP_MAGIC:
            raise NpzFile(f"{path}: an np.savez file")
        if len(first) < _PREFIX.size:
            raise _fail(path, "truncated")
        magic, version, length = _PREFIX.unpack_from(first)
        if magic != MAGIC:
            raise _fail(path, "bad magic")
        if version != VERSION:
            raise _fail(path, f"version {version}, this reader knows {VERSION}")
        if length > MAX_HEADER or _PREFIX.size + length > size:
            raise _fail(path, f"header length {length} for a file of {size} bytes")
        text = bytearray(first[_PREFIX.size : _PREFIX.size + length])
        if len(text) < length:  # a header longer than the first read
            more = bytearray(length - len(text))
            fh.seek(len(first))
            _read_exact(fh, memoryview(more), path)
            text += more
        try:
            header = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise _fail(path, f"header is not JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
            raise _fail(path, "header is not an object with an array list")
        start = _aligned(_PREFIX.size + length)
        data_size = max(0, size - start)
        entries = [_entry(raw, data_size, path) for raw in header.pop("arrays")]
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            raise _fail(path, "an array is listed twice")
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset in entries:
            if name in skip:
                continue
            array = np.empty(shape, dtype=dtype)
            if array.nbytes:
                fh.seek(start + offset)
                _read_exact(fh, array.reshape(-1).view(np.uint8).data, path)
            arrays[name] = array
    return Contents(header=header, arrays=arrays, stored=frozenset(names))


def read_array(path: Path, name: str) -> np.ndarray | None:
    """One member of a prepared file (either format), None when the file has none."""
    skip = [n for n in NAMES if n != name]
    return read(path, skip=skip).arrays.get(name)
