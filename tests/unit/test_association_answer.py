"""A rejected association is reported as rejected, with the peer's reason, whichever
pynetdicom thread sees the A-ASSOCIATE-RJ first (CI saw "aborted" for a rejection)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.acse import ACSE

from screener.dicom.association_answer import Rejection
from screener.dicom.echo import EchoOutcome, echo
from screener.dicom.sender import send_files
from screener.settings import Destination
from screener.testing.dicom_factory import (
    StudyIdentity,
    make_instance,
    write_datasets,
)
from tests.report_results import synthetic_pixels


def _rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


class RejectingPeer:
    """A raw TCP peer: reads each A-ASSOCIATE-RQ whole, answers one fixed RJ, closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.answered = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                header = self._read(conn, 6)
                if len(header) == 6:
                    self._read(conn, struct.unpack(">L", header[2:])[0])
                    self.answered += 1
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def slow_acse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold pynetdicom's ACSE thread after it queues the A-ASSOCIATE-RQ, so its reader
    thread takes the RJ and closes the socket first: the ordering a loaded host produces
    now and then, made certain. pynetdicom 3.0 then reports the rejection as an abort."""
    original = ACSE.send_request

    def send_then_wait(self: ACSE) -> None:
        original(self)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_request", send_then_wait)


@pytest.fixture
def congested() -> Iterator[RejectingPeer]:
    peer = RejectingPeer(_rj(2, 3, 1))  # transient, presentation: temporary congestion
    yield peer
    peer.close()


def test_echo_reports_the_rejection_and_its_reason(
    slow_acse: None, congested: RejectingPeer
) -> None:
    result = echo("127.0.0.1", congested.port, "PACS", timeout=5)
    assert congested.answered == 1
    assert result.outcome is EchoOutcome.NO_ASSOCIATION
    assert result.detail == (
        f"PACS@127.0.0.1:{congested.port}: association rejected (transient) by the "
        "service provider (presentation): temporary congestion"
    )


def test_delivery_error_names_the_rejection(
    slow_acse: None, congested: RejectingPeer, tmp_path: Path
) -> None:
    [path] = write_datasets(
        [make_instance(synthetic_pixels(64, 64), study=StudyIdentity.new())], tmp_path
    )
    outcome = send_files(
        Destination(ae_title="PACS", host="127.0.0.1", port=congested.port),
        [path],
        calling_ae_title="SCREENER",
        timeout=5,
    )
    assert outcome.association_error == (
        "association rejected (transient) by the service provider (presentation): "
        "temporary congestion"
    )
    assert outcome.failed[path].startswith(f"PACS@127.0.0.1:{congested.port}: association rej")


def test_a_refused_connection_is_not_called_a_rejection() -> None:
    peer = RejectingPeer(b"")
    port = peer.port
    peer.close()  # nothing listens on the port any more
    result = echo("127.0.0.1", port, "PACS", timeout=3)
    assert result.outcome is EchoOutcome.NO_ASSOCIATION
    # pynetdicom says "aborted" for a refused connect: the admin looks in the wrong place
    assert result.detail == (
        f"PACS@127.0.0.1:{port}: no connection "
        "(refused, unreachable, timed out or TLS handshake failed)"
    )


def test_a_peer_that_accepts_then_closes_is_an_abort_not_no_connection() -> None:
    peer = RejectingPeer(b"")  # reads the A-ASSOCIATE-RQ, answers nothing, closes
    try:
        result = echo("127.0.0.1", peer.port, "PACS", timeout=5)
    finally:
        peer.close()
    assert result.outcome is EchoOutcome.NO_ASSOCIATION
    assert result.detail == f"PACS@127.0.0.1:{peer.port}: association aborted"


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ((1, 1, 3), "rejected (permanent) by the service user: calling AE title not recognised"),
        ((1, 1, 7), "rejected (permanent) by the service user: called AE title not recognised"),
        (
            (1, 2, 2),
            "rejected (permanent) by the service provider (ACSE): protocol version not supported",
        ),
        # values outside PS3.8 from a peer are shown, not looked up blindly or raised on
        ((9, 7, 200), "rejected (result 9) by the source 7: reason 200"),
        ((1, 1, 4), "rejected (permanent) by the service user: reason 4"),
    ],
)
def test_rejection_text(fields: tuple[int, int, int], text: str) -> None:
    assert Rejection(*fields).describe() == text
