"""Strict structural check of a received data set, and the header fields ingest needs.

pydicom is deliberately lenient when reading (a truncated value or an unknown VR is read
without complaint), which is right for viewing but wrong for a receiver that promises the
sender its object was kept intact. :func:`check_structure` walks every data element of the
encoded data set (nested sequences and encapsulated pixel data included) and raises
:class:`MalformedDatasetError` on a truncated element, an unknown VR or a broken delimiter.
:func:`check_pixel_encoding` refuses Pixel Data that does not match the transfer syntax
(native pixels labelled JPEG, fragments under an uncompressed syntax, a length that is not
Rows x Columns x Samples x Bits Allocated x Frames), from the header alone: nothing is decoded.
Error messages name tags and reasons, never a received value (it can be PHI).

A deflated data set (a few bytes on the wire can inflate to gigabytes) is never inflated
whole in memory: :func:`check_structure` inflates it a step at a time, keeping nothing, and
refuses it when it inflates past ``max_inflated`` bytes; its header is parsed from a stream
inflated only as far as it is read, at most :data:`MAX_INFLATED_HEADER` bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID

from screener.dicom.uid_validation import require_uid

KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
_MAX_DEPTH = 32
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
MAX_INFLATED = 1024 * 1024 * 1024  # a deflated data set's inflated size (max_dataset_mb's default)
MAX_INFLATED_HEADER = 64 * 1024 * 1024  # what is inflated to parse its header (before pixels)
_INFLATE_STEP = 1024 * 1024
# C0 controls no header value keeps: all but TAB, LF, FF, CR and ESC (ISO 2022 escapes),
# the ones DICOM text may hold; NUL in particular is refused by PostgreSQL in text
_CONTROLS = dict.fromkeys(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0C, 0x0D, 0x1B))


class MalformedDatasetError(ValueError):
    """The encoded data set cannot be parsed as the transfer syntax says."""


class PixelEncodingError(ValueError):
    """Pixel Data is not encoded as the transfer syntax and the image attributes say."""


@dataclass(frozen=True)
class _Syntax:
    implicit: bool
    little: bool


def syntax_of(transfer_syntax: str) -> _Syntax | None:
    """Encoding of a transfer syntax, or None when the data set is deflated (not walked)."""
    uid = UID(transfer_syntax)
    if uid.is_deflated:  # e.g. Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)
        return None
    return _Syntax(implicit=uid.is_implicit_VR, little=uid.is_little_endian)


def check_structure(
    data: bytes | memoryview, transfer_syntax: str, max_inflated: int = MAX_INFLATED
) -> int:
    """Raise :class:`MalformedDatasetError` unless ``data`` is a well-formed data set.

    Returns the length of the header: the offset of the first top-level element at or
    after Pixel Data (7FE0,0010), so the header can be parsed without copying the pixels.
    A deflated data set is not walked; it must inflate completely to at most
    ``max_inflated`` bytes (inflated a step at a time, nothing kept).
    """
    syntax = syntax_of(transfer_syntax)
    if syntax is None:
        for _ in _inflated(_reader_of(data), max_inflated):
            pass
        return len(data)
    view = memoryview(data)
    marks: list[int] = []
    end = _walk(view, 0, len(view), syntax, depth=0, until=None, pixel_mark=marks)
    if end != len(view):  # pragma: no cover - _walk either consumes all or raises
        raise MalformedDatasetError("trailing bytes after the last data element")
    return marks[0] if marks else len(view)


def _walk(
    buf: memoryview,
    pos: int,
    end: int,
    syntax: _Syntax,
    depth: int,
    until: tuple[int, int] | None,
    pixel_mark: list[int] | None = None,
) -> int:
    """Walk data elements from ``pos``; return the position after the last one consumed."""
    if depth > _MAX_DEPTH:
        raise MalformedDatasetError("sequences nested too deeply")
    order = "<" if syntax.little else ">"
    while pos < end:
        if end - pos < 8:
            raise MalformedDatasetError(f"truncated element header at offset {pos}")
        group, elem = struct.unpack_from(order + "HH", buf, pos)
        tag = (group, elem)
        if pixel_mark is not None and not pixel_mark and tag >= (0x7FE0, 0x0010):
            pixel_mark.append(pos)
        if group == 0xFFFE:
            # item/delimiter tags are always implicit: tag + 4-byte length
            (length,) = struct.unpack_from(order + "L", buf, pos + 4)
            if until is not None and tag == until:
                return pos + 8
            raise MalformedDatasetError(f"unexpected delimiter ({group:04X},{elem:04X}) at {pos}")
        if syntax.implicit:
            vr = b""
            (length,) = struct.unpack_from(order + "L", buf, pos + 4)
            pos += 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr not in KNOWN_VRS:
                raise MalformedDatasetError(
                    f"unknown VR {vr!r} for tag ({group:04X},{elem:04X}) at offset {pos}"
                )
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDatasetError(f"truncated element header at offset {pos}")
                (length,) = struct.unpack_from(order + "L", buf, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from(order + "H", buf, pos + 6)
                pos += 8
        if length == _UNDEFINED:
            if syntax.implicit or vr in (b"SQ", b"UN"):
                pos = _walk_sequence(buf, pos, end, syntax, depth + 1)
            elif vr in (b"OB", b"OW") and tag == (0x7FE0, 0x0010):
                pos = _walk_fragments(buf, pos, end, order)
            else:
                raise MalformedDatasetError(f"undefined length for VR {vr!r} at {pos}")
            continue
        if pos + length > end:
            raise MalformedDatasetError(
                f"element ({group:04X},{elem:04X}) needs {length} bytes, "
                f"only {end - pos} remain (truncated data set)"
            )
        if vr == b"SQ":
            _walk_items(buf, pos, pos + length, syntax, depth + 1)
        pos += length
    if until is not None:
        raise MalformedDatasetError("missing delimiter: data set truncated")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, syntax: _Syntax, depth: int) -> None:
    """Items of a defined-length sequence."""
    order = "<" if syntax.little else ">"
    while pos < end:
        if end - pos < 8:
            raise MalformedDatasetError("truncated item header")
        group, elem, length = struct.unpack_from(order + "HHL", buf, pos)
        if (group, elem) != _ITEM:
            raise MalformedDatasetError(f"expected an item tag at offset {pos}")
        pos += 8
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, syntax, depth, until=_ITEM_END)
        else:
            if pos + length > end:
                raise MalformedDatasetError("item longer than its sequence")
            _walk(buf, pos, pos + length, syntax, depth, until=None)
            pos += length


def _walk_sequence(buf: memoryview, pos: int, end: int, syntax: _Syntax, depth: int) -> int:
    """Items of an undefined-length sequence, up to and including its delimiter."""
    order = "<" if syntax.little else ">"
    while True:
        if end - pos < 8:
            raise MalformedDatasetError("sequence not terminated: data set truncated")
        group, elem, length = struct.unpack_from(order + "HHL", buf, pos)
        pos += 8
        if (group, elem) == _SEQ_END:
            return pos
        if (group, elem) != _ITEM:
            raise MalformedDatasetError(f"expected an item tag at offset {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, syntax, depth, until=_ITEM_END)
        else:
            if pos + length > end:
                raise MalformedDatasetError("item runs past the end of the data set")
            _walk(buf, pos, pos + length, syntax, depth, until=None)
            pos += length


def _walk_fragments(buf: memoryview, pos: int, end: int, order: str) -> int:
    """Encapsulated pixel data: offset table and fragments, then the sequence delimiter."""
    while True:
        if end - pos < 8:
            raise MalformedDatasetError("encapsulated pixel data truncated")
        group, elem, length = struct.unpack_from(order + "HHL", buf, pos)
        pos += 8
        if (group, elem) == _SEQ_END:
            return pos
        if (group, elem) != _ITEM or length == _UNDEFINED or pos + length > end:
            raise MalformedDatasetError("broken pixel data fragment (truncated data set)")
        pos += length


@dataclass(frozen=True)
class InstanceHeader:
    """What ingest records about an instance (no patient name: never needed here)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    view_position: str | None
    image_laterality: str | None
    body_part_examined: str | None
    photometric_interpretation: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    series_description: str | None
    manufacturer_model_name: str | None
    # image pixel module (None when absent): for check_pixel_encoding
    rows: int | None = None
    columns: int | None = None
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """A text value as recorded: control characters DICOM text never holds are dropped
    (a NUL would make every database insert fail, and the sender retry for ever)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).translate(_CONTROLS).strip()[:limit] or None


def read_header(
    data: bytes | memoryview, transfer_syntax: str, header_length: int | None = None
) -> InstanceHeader:
    """Parse the header fields of an encoded data set (no file meta), pixel data skipped.

    ``header_length`` (from :func:`check_structure`) limits parsing, and copying, to the
    bytes before Pixel Data.

    Raises :class:`MalformedDatasetError` when it cannot be decoded and
    :class:`~screener.dicom.uid_validation.InvalidUIDError` when a UID is missing or invalid.
    """
    return instance_header(read_header_dataset(data, transfer_syntax, header_length))


def read_header_dataset(
    data: bytes | memoryview, transfer_syntax: str, header_length: int | None = None
) -> Dataset:
    """The encoded data set (no file meta) parsed up to Pixel Data (7FE0,0010), from memory.

    ``header_length`` as for :func:`read_header`. Values are decoded lazily, on access
    (:func:`instance_header`, the screenability gate). Raises :class:`MalformedDatasetError`.
    """
    try:
        if header_length is not None:
            data = memoryview(data)[:header_length]
        return _read_raw(data, UID(transfer_syntax))
    except Exception as exc:  # pydicom raises many exception types on garbage
        # the type only: pydicom's messages can quote the offending (PHI) value
        raise MalformedDatasetError(f"cannot decode data set ({type(exc).__name__})") from exc


def instance_header(ds: Dataset) -> InstanceHeader:
    """The :class:`InstanceHeader` of a data set from :func:`read_header_dataset`.

    Raises as :func:`read_header` does.
    """
    try:
        fields = {
            "modality": _text(ds, "Modality", 16),
            "view_position": _text(ds, "ViewPosition", 16),
            "image_laterality": _text(ds, "ImageLaterality", 16),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
            "photometric_interpretation": _text(ds, "PhotometricInterpretation", 16),
            "patient_id": _text(ds, "PatientID", 64),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_date": _text(ds, "StudyDate", 8),
            "series_description": _text(ds, "SeriesDescription", 64),
            "manufacturer_model_name": _text(ds, "ManufacturerModelName", 64),
        }
        uids = {kw: ds.get(kw) for kw in _UID_KEYWORDS}
        numbers: dict[str, int | None] = {
            name: _number(ds, kw) for name, kw in _PIXEL_KEYWORDS.items()
        }
    except Exception as exc:  # pydicom raises many exception types on garbage
        # the type only: pydicom's messages can quote the offending (PHI) value
        raise MalformedDatasetError(f"cannot decode data set ({type(exc).__name__})") from exc
    return InstanceHeader(
        sop_class_uid=require_uid(uids["SOPClassUID"], "SOPClassUID"),
        sop_instance_uid=require_uid(uids["SOPInstanceUID"], "SOPInstanceUID"),
        study_instance_uid=require_uid(uids["StudyInstanceUID"], "StudyInstanceUID"),
        series_instance_uid=require_uid(uids["SeriesInstanceUID"], "SeriesInstanceUID"),
        **fields,  # type: ignore[arg-type]
        **numbers,  # type: ignore[arg-type]
    )


_PIXEL_KEYWORDS = {
    "rows": "Rows",
    "columns": "Columns",
    "samples_per_pixel": "SamplesPerPixel",
    "bits_allocated": "BitsAllocated",
    "number_of_frames": "NumberOfFrames",
}


def _number(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute, None when absent or not a number (checked where it matters)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def tag_at(data: bytes | memoryview, offset: int, transfer_syntax: str) -> int | None:
    """The tag (``group << 16 | element``) of the element at ``offset`` (e.g. the header
    length :func:`check_structure` returned); None past the end or when deflated."""
    syntax = syntax_of(transfer_syntax)
    if syntax is None or offset + 4 > len(data):
        return None
    group, elem = struct.unpack_from("<HH" if syntax.little else ">HH", data, offset)
    return int(group) << 16 | int(elem)


def _pixel_data_length(data: memoryview, offset: int, transfer_syntax: str) -> int | None:
    """The length field of Pixel Data at ``offset``; -1 when undefined, None when absent."""
    syntax = syntax_of(transfer_syntax)
    if syntax is None or offset >= len(data):
        return None
    order = "<" if syntax.little else ">"
    group, elem = struct.unpack_from(order + "HH", data, offset)
    if (group, elem) != (0x7FE0, 0x0010):
        return None  # no Pixel Data; the first element after it is something else
    if syntax.implicit:
        (length,) = struct.unpack_from(order + "L", data, offset + 4)
    elif bytes(data[offset + 4 : offset + 6]) in _LONG_VRS:
        (length,) = struct.unpack_from(order + "L", data, offset + 8)
    else:
        (length,) = struct.unpack_from(order + "H", data, offset + 6)
    return -1 if length == _UNDEFINED else int(length)


def check_pixel_encoding(
    data: bytes | memoryview,
    transfer_syntax: str,
    header_length: int,
    header: InstanceHeader,
) -> None:
    """Raise :class:`PixelEncodingError` unless Pixel Data matches the transfer syntax.

    Encapsulated (compressed) syntaxes need undefined-length Pixel Data made of item
    fragments (:func:`check_structure` walked them); native syntaxes need a defined length of
    Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames (1-bit
    images rounded up to whole bytes, YBR_FULL_422 two samples per pixel), padded to even.
    Deflated data sets are not checked here (their pixels are inside the deflate stream).
    """
    length = _pixel_data_length(memoryview(data), header_length, transfer_syntax)
    if length is None:
        return
    encapsulated = UID(transfer_syntax).is_encapsulated
    if encapsulated:
        if length != -1:
            raise PixelEncodingError(
                "Pixel Data (7FE0,0010) has a defined length (native pixels) under an "
                "encapsulated (compressed) transfer syntax"
            )
        return
    if length == -1:
        raise PixelEncodingError(
            "Pixel Data (7FE0,0010) is encapsulated (undefined length) under a native "
            "transfer syntax"
        )
    rows, columns = header.rows, header.columns
    samples, bits = header.samples_per_pixel or 1, header.bits_allocated
    frames = header.number_of_frames or 1
    if not rows or not columns or not bits or rows < 0 or columns < 0 or frames < 1:
        raise PixelEncodingError(
            "Pixel Data (7FE0,0010) present without valid Rows (0028,0010), "
            "Columns (0028,0011) or Bits Allocated (0028,0100)"
        )
    if header.photometric_interpretation == "YBR_FULL_422" and samples == 3:
        samples = 2  # two luminance samples share one pair of chrominance samples
    expected_bits = rows * columns * samples * frames * bits
    expected = (expected_bits + 7) // 8
    if length not in (expected, expected + (expected % 2)):
        raise PixelEncodingError(
            "Pixel Data (7FE0,0010) length does not match Rows x Columns x Samples per "
            "Pixel x Bits Allocated x Number of Frames"
        )


_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _read_raw(data: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """Read a bare data set (no preamble, no file meta) in the given transfer syntax."""
    from pydicom.filereader import read_dataset

    if transfer_syntax == DEFLATED:
        return read_deflated_header(_reader_of(data))[0]
    return read_dataset(
        BytesIO(data),
        is_implicit_VR=transfer_syntax.is_implicit_VR,
        is_little_endian=transfer_syntax.is_little_endian,
        stop_when=_stop_at_pixels,
    )


def read_deflated_header(
    read: Callable[[int], bytes], stop_at: int = 0x7FE00010, limit: int = MAX_INFLATED_HEADER
) -> tuple[Dataset, int | None]:
    """(data set up to the first top-level tag >= ``stop_at``, that tag or None) of a
    deflated data set whose compressed bytes ``read(n)`` returns; inflated only as far as
    parsed, and :class:`MalformedDatasetError` past ``limit`` inflated bytes."""
    from pydicom.filereader import read_dataset

    stream = _InflatingStream(_inflated(read, limit))
    ds = read_dataset(
        stream,  # type: ignore[arg-type]
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: int(tag) >= stop_at,
    )
    head = stream.read(4)
    if len(head) < 4:
        return ds, None
    group, elem = struct.unpack("<HH", head)
    return ds, group << 16 | elem


def _reader_of(data: bytes | memoryview) -> Callable[[int], bytes]:
    """``read(n)`` over ``data``, each read a copy of at most ``n`` bytes only."""
    view = memoryview(data).cast("B")
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + n])
        position += len(chunk)
        return chunk

    return read


def _inflated(read: Callable[[int], bytes], limit: int) -> Iterator[bytes]:
    """The inflated bytes of a raw deflate stream, :data:`_INFLATE_STEP` at a time;
    :class:`MalformedDatasetError` when it is broken, truncated, or inflates past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = b""
    total = 0
    while not inflater.eof:
        if not pending:
            pending = read(_INFLATE_STEP)
        try:
            out = inflater.decompress(pending, _INFLATE_STEP)
        except zlib.error as exc:
            raise MalformedDatasetError("deflated data set does not inflate") from exc
        if not out and not pending and not inflater.eof:
            raise MalformedDatasetError("deflated data set truncated")
        pending = inflater.unconsumed_tail
        total += len(out)
        if total > limit:
            raise MalformedDatasetError(f"deflated data set inflates to more than {limit} bytes")
        if out:
            yield out


class _InflatingStream:
    """A readable, seekable stream of inflated bytes, inflated only as far as it is read
    (what pydicom's ``read_dataset`` needs: read, tell, seek)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._position = 0

    def _fill(self, end: int) -> None:
        while len(self._buffer) < end:
            chunk = next(self._chunks, None)
            if chunk is None:
                return
            self._buffer += chunk

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            self._fill(1 << 62)
            end = len(self._buffer)
        else:
            end = self._position + size
            self._fill(end)
        chunk = bytes(self._buffer[self._position : end])
        self._position += len(chunk)
        return chunk

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position}.get(whence)
        if base is None:  # from the end: inflate it all (within the limit)
            self._fill(1 << 62)
            base = len(self._buffer)
        self._position = max(0, base + offset)
        return self._position


def read_deflated_file_header(
    fh: BinaryIO, stop_at: int = 0x7FE00008
) -> tuple[Dataset, int | None] | None:
    """:func:`read_deflated_header` of a DICOM file open at its start, when it is deflated
    (None otherwise: the caller reads it as usual)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    read_preamble(fh, force=False)
    meta = _read_file_meta_info(fh)
    if str(meta.get("TransferSyntaxUID", "")).strip("\x00 ") != DEFLATED:
        return None
    return read_deflated_header(fh.read, stop_at=stop_at)


def _stop_at_pixels(tag: object, vr: object, length: object) -> bool:
    return int(tag) >= 0x7FE00010  # type: ignore[call-overload]
