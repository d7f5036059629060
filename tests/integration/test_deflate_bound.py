"""Deflated data sets are inflated within a bound: a few bytes on the wire that inflate to
gigabytes are refused (0xC210), never inflated whole in memory, in the listener's check and
in the file-based screenability gate; valid deflated data sets lose nothing."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from screener.dicom import dataset_buffers
from screener.dicom.dataset_check import (
    MalformedDatasetError,
    check_structure,
    read_header,
)
from screener.dicom.listener import ListenerHandle, start_listener
from screener.ingest import gate_reason
from screener.screenability import screenability_of_file
from screener.settings import ScreeningSettings, Settings
from tests.listener_support import RawSCU, encode_body, small_instance, spool_files

DEFLATED = "1.2.840.10008.1.2.1.99"
MIB = 1024 * 1024


def _deflate(body: bytes, zeros: int = 0) -> bytes:
    """``body`` (Explicit VR Little Endian) deflated, with a private OB element of
    ``zeros`` zero bytes after group 0008 when ``zeros`` (inflated, never held here)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    if not zeros:
        return compressor.compress(body) + compressor.flush()
    pos = 0
    while struct.unpack_from("<H", body, pos)[0] < 0x0009:
        vr = body[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
            pos += 12 + struct.unpack_from("<L", body, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", body, pos + 6)[0]
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"BOMB"
    head = creator + struct.pack("<HH2s2xL", 0x0009, 0x1010, b"OB", zeros)
    out = [compressor.compress(body[:pos] + head)]
    block = bytes(16 * MIB)
    for _ in range(zeros // len(block)):
        out.append(compressor.compress(block))
    out.append(compressor.compress(bytes(zeros % len(block))))
    out.append(compressor.compress(body[pos:]))
    out.append(compressor.flush())
    return b"".join(out)


def _file(path: Path, body: bytes, sop_class: str, sop_instance: str) -> Path:
    path.write_bytes(dataset_buffers.spool_prefix(sop_class, sop_instance, DEFLATED) + body)
    return path


def test_a_valid_deflated_data_set_reads_as_its_inflated_form() -> None:
    sop_class, sop_instance, _, body = encode_body(
        small_instance(size=64, transfer_syntax=ExplicitVRLittleEndian)
    )
    deflated = _deflate(body)
    assert check_structure(deflated, DEFLATED) == len(deflated)
    plain = read_header(body, str(ExplicitVRLittleEndian))
    assert read_header(deflated, DEFLATED) == plain
    assert plain.sop_instance_uid == sop_instance


def test_a_deflate_bomb_is_refused_as_malformed() -> None:
    _, _, _, body = encode_body(small_instance(transfer_syntax=ExplicitVRLittleEndian))
    bomb = _deflate(body, zeros=64 * MIB)
    assert len(bomb) < MIB
    tracemalloc.start()
    try:
        with pytest.raises(MalformedDatasetError, match="inflates to more than"):
            check_structure(bomb, DEFLATED, max_inflated=16 * MIB)
        with pytest.raises(MalformedDatasetError):
            read_header(bomb, DEFLATED, len(bomb))  # the header alone is past its bound
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * MIB


def test_a_truncated_deflate_stream_is_malformed() -> None:
    _, _, _, body = encode_body(small_instance(transfer_syntax=ExplicitVRLittleEndian))
    with pytest.raises(MalformedDatasetError):
        check_structure(_deflate(body)[:-20], DEFLATED)


def test_the_file_gate_reads_a_deflated_header_within_a_bound(tmp_path: Path) -> None:
    """The same answer as pydicom's reader for a valid file; a bomb file is never inflated
    whole (pydicom's reader inflates the whole data set in memory)."""
    sop_class, sop_instance, _, body = encode_body(
        small_instance(size=64, transfer_syntax=ExplicitVRLittleEndian)
    )
    settings = ScreeningSettings()
    valid = _file(tmp_path / "valid.dcm", _deflate(body), sop_class, sop_instance)
    expected = screenability_of_file(valid, settings)
    assert gate_reason(str(valid), settings) == (expected.reason if expected else None)
    bomb = _file(tmp_path / "bomb.dcm", _deflate(body, zeros=400 * MIB), sop_class, sop_instance)
    tracemalloc.start()
    try:
        gate_reason(str(bomb), settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * MIB


@pytest.fixture
def running(sqlite_settings: Settings) -> Iterator[tuple[Settings, ListenerHandle]]:
    sqlite_settings.listener.port = 0
    sqlite_settings.listener.max_dataset_mb = 8
    sqlite_settings.study_quiet_seconds = 3600
    handle = start_listener(sqlite_settings, migrate=False, assemble=False)
    try:
        yield sqlite_settings, handle
    finally:
        handle.stop(drain_seconds=5)


def test_the_listener_refuses_a_deflate_bomb_and_keeps_valid_deflated_data_sets(
    running: tuple[Settings, ListenerHandle],
) -> None:
    settings, handle = running
    sop_class, sop_instance, _, body = encode_body(
        small_instance(size=64, transfer_syntax=ExplicitVRLittleEndian)
    )
    scu = RawSCU(handle.port, [(sop_class, [DEFLATED])])
    try:
        assert scu.store(sop_class, sop_instance, DEFLATED, _deflate(body, zeros=32 * MIB)) == (
            0xC210
        )
        assert not spool_files(settings.spool_dir)
        assert scu.store(sop_class, sop_instance, DEFLATED, _deflate(body)) == 0x0000
    finally:
        scu.release()
    (stored,) = spool_files(settings.spool_dir)
    assert stored.read_bytes().endswith(_deflate(body))
