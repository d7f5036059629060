"""The listener against hostile peers and strict standard answers (issue 9).

Huge PDU claims under a memory limit, slow peers, and refusals a sender must get: SOP Class
mismatch, pixel data that does not match the transfer syntax, a wrong Called AE Title, AE
titles compared as DICOM pads them, and no refused value echoed into logs or the audit log.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import RLELossless
from sqlmodel import select

from screener.db.models import AuditLog, Instance
from screener.db.session import session_scope
from screener.dicom.association_answer import Rejection
from screener.dicom.dataset_check import (
    PixelEncodingError,
    check_pixel_encoding,
    check_structure,
    read_header,
)
from screener.dicom.fast_receive import (
    HARD_MAX_PDU,
    MAX_ASSOCIATION_PDU,
    allowed_length,
    same_ae_title,
)
from screener.dicom.listener import ListenerHandle, start_listener
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity
from tests.listener_support import (
    EXPLICIT_VR_LE,
    ListenerProcess,
    RawSCU,
    associate_rq,
    database_rows,
    encode_body,
    read_pdu,
    rejection,
    scu,
    small_instance,
    spool_files,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE = str(RLELossless)
GIB = 1024**3


@pytest.fixture
def running(sqlite_settings: Settings) -> Iterator[tuple[Settings, ListenerHandle]]:
    sqlite_settings.listener.port = 0
    sqlite_settings.study_quiet_seconds = 3600
    handle = start_listener(sqlite_settings, migrate=False, assemble=False)
    try:
        yield sqlite_settings, handle
    finally:
        handle.stop(drain_seconds=5)


def _rows(settings: Settings) -> list[Instance]:
    with session_scope(settings.database_url) as s:
        return list(s.exec(select(Instance)).all())


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the listener closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


# --- bounds, as units -------------------------------------------------------------------


def test_pdu_lengths_are_bounded_by_type() -> None:
    assert allowed_length(0x01, 0) == (68, MAX_ASSOCIATION_PDU)
    assert allowed_length(0x04, 0) == (6, HARD_MAX_PDU)
    assert allowed_length(0x04, 65536) == (6, 65536)
    assert allowed_length(0x05, 0) == (4, 4) and allowed_length(0x07, 0) == (4, 4)
    assert allowed_length(0x08, 0) is None and allowed_length(0xFF, 0) is None


def test_ae_titles_compare_as_dicom_pads_them() -> None:
    assert same_ae_title("SCREENER", "SCREENER")
    assert same_ae_title(" SCREENER  ", "SCREENER")  # spaces are padding (PS3.5 6.2)
    assert not same_ae_title("screener", "SCREENER")  # case is significant
    assert not same_ae_title("SCREENER2", "SCREENER")


# --- huge PDU claims under a memory limit ---------------------------------------------------


def _claim(port: int, prefix: bytes, claim: bytes, seconds: float = 5.0) -> bool:
    """Send ``prefix`` (e.g. a valid association request) then a PDU header ``claim`` and
    some of its body: True when the listener closes the connection instead of waiting."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if prefix:
            sock.sendall(prefix)
            answer = read_pdu(sock)
            assert answer is not None and answer[0] == 0x02
        try:
            sock.sendall(claim + b"\x00" * 4096)
        except OSError:
            return True
        return _closed_within(sock, seconds)


def test_huge_pdu_claims_under_a_memory_limit(tmp_path: Path) -> None:
    """8 bytes claiming 4 GiB used to allocate 4 GiB. Now: connection closed, memory flat,
    and a valid sender keeps storing throughout."""
    listener = ListenerProcess(tmp_path / "data")
    listener.start(memory_limit_bytes=3 * GIB)  # a 4 GiB allocation cannot even be tried
    try:
        baseline_kb = listener.status_kb("VmRSS")
        study = StudyIdentity.new()
        stored: list[str] = []
        failures: list[object] = []
        stop = threading.Event()

        def valid_sender() -> None:
            i = 0
            while not stop.is_set():
                ds = small_instance(study, seed=i, size=64, instance_number=i + 1)
                sop_class, uid, ts, body = encode_body(ds)
                try:
                    raw = RawSCU(listener.port, [(sop_class, [ts])], calling="VALID")
                    status = raw.store(sop_class, uid, ts, body)
                    raw.release()
                except OSError as exc:
                    failures.append(exc)
                    continue
                if status == 0:
                    stored.append(uid)
                else:
                    failures.append(status)
                i += 1

        sender = threading.Thread(target=valid_sender)
        sender.start()
        rq = associate_rq([(CR, [EXPLICIT_VR_LE])], calling="ATTACKER")
        claims = [
            (b"", b"\x01\x00\xff\xff\xff\xff\x00\x01"),  # the 8 bytes of issue 9
            (b"", b"\x01\x00\x40\x00\x00\x00"),  # an A-ASSOCIATE-RQ of 1 GiB
            (b"", b"\x04\x00\xff\xff\xff\xff"),  # P-DATA before any association
            (rq, b"\x04\x00\xff\xff\xff\xff"),  # 4 GiB P-DATA after association
            (rq, b"\x04\x00\x10\x00\x00\x01"),  # 256 MiB + 1: above the 16 MiB PDU cap
            (rq, b"\x01\x00\x00\x10\x00\x00"),  # a 1 MiB association request mid-association
            (rq, b"\x07\x00\x7f\xff\xff\xff"),  # a 2 GiB A-ABORT
        ]
        closed: list[bool] = []
        attack_until = time.monotonic() + 8  # rounds of all claims at once, for 8 s
        while time.monotonic() < attack_until:
            attackers = []
            for prefix, claim in claims:

                def attack(p: bytes = prefix, c: bytes = claim) -> None:
                    closed.append(_claim(listener.port, p, c))

                thread = threading.Thread(target=attack)
                thread.start()
                attackers.append(thread)
            for thread in attackers:
                thread.join(timeout=30)
        stop.set()
        sender.join(timeout=60)
        peak_kb = listener.status_kb("VmHWM")
        assert listener.alive(), listener.log_text()[-3000:]
        assert closed and all(closed), "every oversized claim is answered by closing"
        assert not failures, failures[:5]
        assert len(stored) >= 3, "the valid sender kept storing during the attack"
        print(
            f"\nhuge claims: {len(closed)} connections, valid stores during the attack "
            f"{len(stored)}, RSS baseline {baseline_kb // 1024} MiB, peak {peak_kb // 1024} MiB"
        )
        assert peak_kb < baseline_kb + 200 * 1024, (baseline_kb, peak_kb)
        after = RawSCU(listener.port, [(CR, [EXPLICIT_VR_LE])], calling="VALID")
        ds = small_instance(study, seed=999, size=64)
        assert after.store(*encode_body(ds)) == 0
        after.release()
        rows = database_rows(listener.data_dir)
        assert {r[0] for r in rows} == {*stored, str(ds.SOPInstanceUID)}
    finally:
        listener.stop()
    assert "aborting association" in listener.log_text()


# --- slow peers ------------------------------------------------------------------------


def test_slow_peers_do_not_lock_out_a_valid_sender(sqlite_settings: Settings) -> None:
    """80 connections trickling an A-ASSOCIATE-RQ byte by byte: the valid sender is served
    at once, the tricklers are closed at the request deadline (a trickle does not reset it),
    and connections beyond the per-address cap are closed immediately."""
    s = sqlite_settings
    s.listener.port = 0
    s.listener.association_request_timeout_seconds = 3
    s.listener.max_pending_per_address = 8
    with start_listener(s, migrate=False, assemble=False) as handle:
        request = associate_rq([(CR, [EXPLICIT_VR_LE])], calling="SLOW")
        tricklers: list[tuple[socket.socket, float]] = []
        for i in range(80):  # 10 source addresses x 8 (at the per-address cap)
            sock = socket.socket()
            sock.bind((f"127.0.0.{10 + i // 8}", 0))
            sock.connect(("127.0.0.1", handle.port))
            tricklers.append((sock, time.monotonic()))
        over_cap = []
        for _ in range(4):  # a 9th connection from a busy address is refused at once
            sock = socket.socket()
            sock.bind(("127.0.0.10", 0))
            sock.connect(("127.0.0.1", handle.port))
            over_cap.append(sock)
        stop = threading.Event()
        closed_after: dict[int, float] = {}

        def trickle() -> None:
            offset = 0
            while not stop.is_set() and len(closed_after) < len(tricklers):
                for n, (sock, opened) in enumerate(tricklers):
                    if n in closed_after:
                        continue
                    try:
                        sock.send(request[offset : offset + 1])
                    except OSError:
                        closed_after[n] = time.monotonic() - opened
                offset = min(offset + 1, len(request) - 2)  # never complete the request
                time.sleep(0.2)

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            study = StudyIdentity.new()
            for i in range(5):
                ds = small_instance(study, seed=i, instance_number=i + 1)
                started = time.monotonic()
                with scu(handle.port, [ds], timeout=10) as assoc:
                    assert assoc.is_established
                    assert assoc.send_c_store(ds).Status == 0
                assert time.monotonic() - started < 5.0, "served at once despite the tricklers"
            assert all(_closed_within(sock, 2.0) for sock in over_cap)
            deadline = time.monotonic() + 15
            while len(closed_after) < len(tricklers) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join(timeout=10)
            for sock, _ in tricklers:
                sock.close()
            for sock in over_cap:
                sock.close()
        assert len(closed_after) == len(tricklers), "every trickler was closed"
        # closed at the deadline: not before it, not long after (the machine is loaded)
        assert min(closed_after.values()) >= 2.5
        assert max(closed_after.values()) < 3 + 6
    assert len(_rows(s)) == 5


# --- strict answers ---------------------------------------------------------------------


def test_sop_class_mismatch_is_refused(running: tuple[Settings, ListenerHandle]) -> None:
    settings, handle = running
    ds = small_instance(seed=1)
    ds.SOPClassUID = DX  # the data set says DX, the command and the context say CR
    _, uid, ts, body = encode_body(ds)
    raw = RawSCU(handle.port, [(CR, [ts]), (DX, [ts])])
    assert raw.store(CR, uid, ts, body) == 0xA900
    raw.release()
    assert _rows(settings) == [] and spool_files(settings.spool_dir) == []


@pytest.mark.parametrize("syntax", [JPEG_BASELINE, RLE], ids=["jpeg-baseline", "rle"])
def test_native_pixels_labelled_compressed_are_refused(
    running: tuple[Settings, ListenerHandle], syntax: str
) -> None:
    settings, handle = running
    ds = small_instance(seed=2, size=64)
    _, uid, _, body = encode_body(ds)  # explicit VR little endian, native pixel data
    raw = RawSCU(handle.port, [(CR, [syntax])])
    assert raw.store(CR, uid, syntax, body) == 0xC213
    raw.release()
    assert _rows(settings) == [] and spool_files(settings.spool_dir) == []


def test_encapsulated_pixels_labelled_native_and_wrong_lengths_are_refused(
    running: tuple[Settings, ListenerHandle],
) -> None:
    settings, handle = running
    rle = small_instance(seed=3, size=64, transfer_syntax=RLELossless)  # type: ignore[arg-type]
    _, uid, _, body = encode_body(rle)
    short = small_instance(seed=4, size=64)
    short.Rows = 65  # Pixel Data now shorter than Rows x Columns x 2
    _, short_uid, _, short_body = encode_body(short)
    raw = RawSCU(handle.port, [(CR, [EXPLICIT_VR_LE, RLE])])
    assert raw.store(CR, uid, EXPLICIT_VR_LE, body) == 0xC213
    assert raw.store(CR, short_uid, EXPLICIT_VR_LE, short_body) == 0xC213
    valid = small_instance(seed=5, size=64)
    assert raw.store(*encode_body(valid)) == 0  # and the association still serves
    raw.release()
    assert [r.sop_instance_uid for r in _rows(settings)] == [str(valid.SOPInstanceUID)]


def test_pixel_check_units() -> None:
    """1-bit images round up to whole bytes; an odd length is padded to even."""
    ds = small_instance(seed=6, size=8)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.Rows, ds.Columns = 3, 5  # 15 bits: 2 bytes
    ds.PixelData = b"\x00\x01"
    _, _, ts, body = encode_body(ds)
    length = check_structure(body, ts)
    check_pixel_encoding(body, ts, length, read_header(body, ts, length))
    ds.PixelData = b"\x00\x01\x02\x03"
    _, _, ts, body = encode_body(ds)
    length = check_structure(body, ts)
    with pytest.raises(PixelEncodingError):
        check_pixel_encoding(body, ts, length, read_header(body, ts, length))


def test_wrong_called_ae_title_is_rejected(
    sqlite_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s = sqlite_settings
    s.listener.port = 0
    with caplog.at_level(logging.WARNING, logger="screener.dicom.listener"):
        with start_listener(s, migrate=False, assemble=False) as handle:
            for called in ("NOTME", "screener"):  # lower case is another AE title
                # rejected-permanent, service-user, called AE title not recognised
                assert rejection(handle.port, called_aet=called) == Rejection(1, 1, 7)
            with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as sock:
                sock.sendall(  # Called AE Title with leading and trailing spaces: padding
                    associate_rq([(CR, [EXPLICIT_VR_LE])], raw_called=b"  SCREENER      ")
                )
                answer_pdu = read_pdu(sock)
                assert answer_pdu is not None and answer_pdu[0] == 0x02
    assert "called AE title not recognised" in caplog.text
    s.listener.require_called_ae_title = False
    with start_listener(s, migrate=False, assemble=False) as handle:
        with scu(handle.port, called_aet="NOTME") as assoc:
            assert assoc.is_established


def test_calling_ae_titles_match_as_padded_but_case_sensitively(
    sqlite_settings: Settings,
) -> None:
    s = sqlite_settings
    s.listener.port = 0
    s.listener.allowed_calling_ae_titles = ["MODALITY1"]
    with start_listener(s, migrate=False, assemble=False) as handle:

        def answer(raw_calling: bytes) -> int:
            with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as sock:
                sock.sendall(
                    associate_rq([(CR, [EXPLICIT_VR_LE])], raw_calling=raw_calling.ljust(16))
                )
                pdu = read_pdu(sock)
                assert pdu is not None
                return pdu[0]

        assert answer(b"MODALITY1") == 0x02
        assert answer(b"MODALITY1 ") == 0x02  # trailing space: padding
        assert answer(b" MODALITY1") == 0x02  # leading space: not significant either
        assert answer(b"modality1") == 0x03  # case matters: A-ASSOCIATE-RJ
        assert answer(b"MODALITY") == 0x03


def test_refused_values_are_not_echoed(
    running: tuple[Settings, ListenerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """A patient name in a UID attribute: named by tag and reason, never repeated."""
    settings, handle = running
    ds = small_instance(seed=7)
    ds.StudyInstanceUID = "DOE^JOHN^SECRET"
    with caplog.at_level(logging.DEBUG):
        raw = RawSCU(handle.port, [(CR, [EXPLICIT_VR_LE])])
        assert raw.store(*encode_body(ds)) == 0xC211
        raw.release()
    assert "StudyInstanceUID" in caplog.text
    assert "SECRET" not in caplog.text
    with session_scope(settings.database_url) as s:
        entries = s.exec(select(AuditLog).where(AuditLog.action == "instance.invalid_uid")).all()
    assert len(entries) == 1 and "SECRET" not in str(entries[0].detail)
    assert "StudyInstanceUID" in str(entries[0].detail)


def test_one_info_line_per_association(
    running: tuple[Settings, ListenerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    _, handle = running
    study = StudyIdentity.new()
    sent = [small_instance(study, seed=i, instance_number=i + 1) for i in range(2)]
    with caplog.at_level(logging.INFO, logger="screener.dicom.listener"):
        with scu(handle.port, sent, calling_aet="LOGTEST") as assoc:
            assert [assoc.send_c_store(ds).Status for ds in sent] == [0, 0]
        deadline = time.monotonic() + 10
        while "LOGTEST" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "association from LOGTEST" in r.message]
    assert len(lines) == 1, lines
    assert "released: 2 instance(s) stored, 0 refused" in lines[0]
    assert "127.0.0.1:" in lines[0]
    assert str(study.patient_id) not in caplog.text
    size = struct.calcsize("<L")  # the byte count is the sum of both stored files
    assert int(lines[0].split(" refused, ")[1].split(" bytes")[0]) > size
