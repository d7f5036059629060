"""Received data sets in pooled, page-aligned memory laid out as the spool file
(``screener.dicom.dataset_buffers``) and written from there (``direct_io.write_image``).

The end-to-end path (storescu and pynetdicom senders into the listener, the spool file
compared with what was sent) is covered by ``tests/integration/test_listener*.py``; here
the pieces, with real ``O_DIRECT`` on this machine's filesystem.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from screener import direct_io
from screener.dicom import dataset_buffers, spool
from screener.dicom.dataset_buffers import PREAMBLE, ReceivedDataSet, spool_prefix
from screener.ingest import content_digest, content_hasher, digest_of

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
PREFIX = spool_prefix(DX, "1.2.3.4.5", ExplicitVRLittleEndian)


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    dataset_buffers._pool.clear()
    yield
    dataset_buffers._pool.clear()
    direct_io._refused_devices.clear()


def _received(data: bytes, prefix: bytes = PREFIX, piece: int = 100_003) -> ReceivedDataSet:
    """``data`` written as the DIMSE layer writes it: fragment by fragment (memoryviews)."""
    stream = ReceivedDataSet(lambda: prefix)
    view = memoryview(data)
    for start in range(0, len(data), piece):
        assert stream.write(view[start : start + piece]) == len(view[start : start + piece])
    return stream


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (DX, "1.2.3.4.5", ExplicitVRLittleEndian),  # odd, odd, odd lengths
        (CT, "1.2.3.4", ImplicitVRLittleEndian),  # even lengths
        ("1.2", "1.23", JPEG2000Lossless),
        (DX, "1.2.826.0.1.3680043.8.498." + "1" * 38, ExplicitVRLittleEndian),  # 64 chars
    ],
)
def test_the_spool_prefix_is_the_bytes_pydicom_writes_for_event_file_meta(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    meta = create_file_meta(
        sop_class_uid=sop_class,  # type: ignore[arg-type]
        sop_instance_uid=sop_instance,  # type: ignore[arg-type]
        transfer_syntax=syntax,  # type: ignore[arg-type]
    )
    assert spool_prefix(sop_class, sop_instance, syntax) == PREAMBLE + encode_file_meta(meta)
    # as read from a command set: trailing padding is not part of the UID
    assert spool_prefix(sop_class + "\x00", sop_instance + " ", syntax) == spool_prefix(
        sop_class, sop_instance, syntax
    )


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 1024 * 1024 + 11])
def test_a_received_data_set_reads_back_like_bytesio(size: int) -> None:
    data = os.urandom(size)
    stream = _received(data)
    assert isinstance(stream, io.BytesIO)  # pynetdicom's primitives accept nothing else
    assert len(stream) == size and stream.tell() == size
    assert stream.getvalue() == data and bytes(stream.getbuffer()) == data
    assert stream.seek(0) == 0
    assert stream.read(5) == data[:5] and stream.tell() == min(5, size)
    assert stream.read() == data[5:] and stream.read() == b""
    stream.seek(-min(3, size), os.SEEK_END)
    target = bytearray(10)
    assert stream.readinto(target) == min(3, size)
    assert bytes(target[: min(3, size)]) == data[size - min(3, size) :]


def test_pydicom_decodes_a_received_data_set_as_pynetdicom_does() -> None:
    encoded = bytes.fromhex("08001800") + b"UI" + (8).to_bytes(2, "little") + b"1.2.3.4\x00"
    stream = _received(encoded, piece=5)
    stream.seek(0)
    ds = read_dataset(stream, is_implicit_VR=False, is_little_endian=True)
    assert ds.SOPInstanceUID == "1.2.3.4"


def test_the_file_image_is_prefix_then_data_on_a_page_then_zeros() -> None:
    data = os.urandom(2 * direct_io.ALIGN + 77)
    stream = _received(data)
    image = stream.file_image(PREFIX)
    assert image is not None
    view, size = image
    assert size == len(PREFIX) + len(data)
    assert bytes(view[:size]) == PREFIX + data
    assert len(view) % direct_io.ALIGN == 0 and len(view) - size < direct_io.ALIGN
    assert not any(view[size:])  # the padding is zeros, never an earlier instance's bytes


def test_no_file_image_without_the_same_prefix() -> None:
    stream = _received(b"data")
    assert stream.file_image(spool_prefix(DX, "1.2.3.4.6", ExplicitVRLittleEndian)) is None
    assert _received(b"data", prefix=b"").file_image(b"") is None  # nothing was predicted
    assert _received(b"").file_image(PREFIX) is None  # nothing received: the chunks path

    def broken() -> bytes:
        raise KeyError("no such context")

    unpredicted = ReceivedDataSet(broken)
    unpredicted.write(b"still received")
    assert unpredicted.getvalue() == b"still received"
    assert unpredicted.file_image(PREFIX) is None


def test_growth_keeps_every_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_buffers, "INITIAL_BYTES", 64 * 1024)
    data = os.urandom(1024 * 1024 + 3)  # 16 times the first mapping
    stream = _received(data, piece=10_007)
    assert stream.getvalue() == data
    image = stream.file_image(PREFIX)
    assert image is not None and bytes(image[0][: image[1]]) == PREFIX + data


def test_growth_with_a_view_alive_copies_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_buffers, "INITIAL_BYTES", 64 * 1024)
    stream = _received(b"a" * 60_000)
    early = stream.getbuffer()  # mremap is refused while a view exists
    stream.write(b"b" * 200_000)
    assert stream.getvalue() == b"a" * 60_000 + b"b" * 200_000
    assert bytes(early[:3]) == b"aaa"
    early.release()


def test_bytes_read_into_the_tail_count_only_once_advanced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receive path reads fragments straight into :meth:`ReceivedDataSet.tail`: what it
    read counts after ``advance``, a fragment read but not kept (the PDU was laid out
    otherwise) is overwritten by the next write, and growth keeps every byte."""
    monkeypatch.setattr(dataset_buffers, "INITIAL_BYTES", 64 * 1024)
    stream = _received(b"a" * 1000)
    tail = stream.tail(5)
    tail[:] = b"bbbbb"
    tail.release()
    assert stream.getvalue() == b"a" * 1000  # not advanced: not data set bytes yet
    stream.write(b"c" * 3)  # the whole-PDU path writes the same place
    tail = stream.tail(200_000)  # past the first mapping: it grows
    tail[:] = b"d" * 200_000
    tail.release()
    stream.advance(200_000)
    assert stream.getvalue() == b"a" * 1000 + b"ccc" + b"d" * 200_000
    image = stream.file_image(PREFIX)
    assert image is not None and bytes(image[0][: image[1]]) == PREFIX + stream.getvalue()
    del image
    stream.release()
    assert len(dataset_buffers._pool) == 1  # the tail views were released: pooled


def test_fragments_are_hashed_as_they_arrive_into_the_content_digest() -> None:
    """Appended bytes, written (the DIMSE layer) or read into the tail (the receive path),
    feed the hasher in order: its digest is the content digest of the data set. A write
    that is not an append, or a truncation, ends it (the listener then hashes the whole)."""
    step = dataset_buffers.HASH_STEP
    data = os.urandom(2 * step + 300_001)  # hashed in steps, and a remainder at the end
    stream = ReceivedDataSet(lambda: PREFIX, hasher=content_hasher())
    stream.write(memoryview(data)[:100_000])
    tail = stream.tail(step + 50_000)
    tail[:] = data[100_000 : 150_000 + step]
    tail.release()
    stream.advance(step + 50_000)
    for start in range(150_000 + step, len(data), 100_003):
        stream.write(data[start : start + 100_003])
    hasher = stream.hasher()
    assert hasher is not None and digest_of(hasher) == content_digest(data)
    assert stream.getvalue() == data

    rewritten = ReceivedDataSet(lambda: PREFIX, hasher=content_hasher())
    rewritten.write(data)
    rewritten.seek(10)
    rewritten.write(b"x")
    assert rewritten.hasher() is None
    truncated = ReceivedDataSet(lambda: PREFIX, hasher=content_hasher())
    truncated.write(data)
    truncated.truncate(5)
    assert truncated.hasher() is None
    assert _received(data).hasher() is None  # none given


def test_released_memory_is_reused_and_the_pool_is_bounded() -> None:
    streams = [_received(os.urandom(10_000)) for _ in range(dataset_buffers.POOL_SIZE + 2)]
    mappings = {id(s._map) for s in streams}
    for stream in streams:
        dataset_buffers.release(type("Request", (), {"DataSet": stream})())
        assert stream.getvalue() == b"" and stream.file_image(PREFIX) is None
    assert len(dataset_buffers._pool) == dataset_buffers.POOL_SIZE
    reused = _received(b"next instance")
    assert id(reused._map) in mappings
    image = reused.file_image(PREFIX)
    assert image is not None and bytes(image[0][: image[1]]) == PREFIX + b"next instance"
    assert not any(image[0][image[1] :])


def test_memory_with_a_view_alive_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view kept past release (a caller's, or one in a reference cycle until the next
    collection): the memory is not pooled, so the view never sees the next data set, and a
    larger next one still gets room (found by CI: "mmap can't resize with extant buffers")."""
    monkeypatch.setattr(dataset_buffers, "INITIAL_BYTES", 1024 * 1024)
    stream = _received(b"first" * 1000)
    kept = stream.getbuffer()
    stream.release()
    assert dataset_buffers._pool == []
    bigger = _received(os.urandom(3 * 1024 * 1024))  # more than a pooled mapping holds
    assert bytes(kept[:5]) == b"first"
    assert bigger.getbuffer()[:5] != b"first"
    kept.release()
    bigger.release()
    assert len(dataset_buffers._pool) == 1


def test_oversized_mappings_are_not_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_buffers, "KEEP_MAX_BYTES", 1024 * 1024)
    stream = _received(os.urandom(2 * 1024 * 1024))
    stream.release()
    assert dataset_buffers._pool == []


@pytest.mark.parametrize(
    "size",  # data set bytes: the file ends before, on and after a block boundary
    [1, direct_io.ALIGN - len(PREFIX) - 1, direct_io.ALIGN - len(PREFIX), 70_001],
)
def test_write_image_writes_the_file_from_where_it_lies(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    stream = _received(data)
    image = stream.file_image(PREFIX)
    assert image is not None
    path = tmp_path / "f"
    written = direct_io.write_image(path, *image)
    if written is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    assert written == image[1] == path.stat().st_size  # the padding is truncated away
    assert path.read_bytes() == PREFIX + data


def test_write_image_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_io, "IMAGE_WRITE_BYTES", 2 * direct_io.ALIGN)
    data = os.urandom(5 * direct_io.ALIGN + 9)
    image = _received(data).file_image(PREFIX)
    assert image is not None
    assert direct_io.write_image(tmp_path / "f", *image) == len(PREFIX) + len(data)
    assert (tmp_path / "f").read_bytes() == PREFIX + data


def test_write_image_refuses_an_image_without_room_for_its_padding(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        direct_io.write_image(tmp_path / "f", memoryview(bytearray(4096)), 4097)
    assert not (tmp_path / "f").exists()


def test_the_spool_writes_the_same_file_from_the_image_or_from_chunks(
    tmp_path: Path, refuse_o_direct: Callable[[], None]
) -> None:
    data = os.urandom(direct_io.STAGING_BYTES + 1234)
    stream = _received(data)
    image = stream.file_image(PREFIX)
    assert image is not None
    files = []
    for name, kwargs in (("image", {"image": image}), ("chunks", {})):
        digest: Future[str] = Future()
        digest.set_result(f"blake3:{'cd' * 32}")
        root = tmp_path / name
        root.mkdir()
        path, size, _ = spool.store_while_hashing(
            root, "1.2.3", "1.2.3.4", "1.2.3.4.5", (PREFIX, data), digest, direct=True, **kwargs
        )
        assert size == len(PREFIX) + len(data)
        files.append(path.read_bytes())
    assert files[0] == files[1] == PREFIX + data

    # a filesystem refusing O_DIRECT: the image is not used, the chunks go through the cache
    refuse_o_direct()
    digest = Future()
    digest.set_result(f"blake3:{'ef' * 32}")
    (tmp_path / "refused").mkdir()
    path, size, _ = spool.store_while_hashing(
        tmp_path / "refused",
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
        (PREFIX, data),
        digest,
        direct=True,
        image=image,
    )
    assert path.read_bytes() == PREFIX + data
