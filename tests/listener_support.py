"""Helpers shared by the listener tests: small instances and a raw pynetdicom SCU."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from screener.dicom.association_answer import AssociationAnswer, Rejection
from screener.testing.dicom_factory import StudyIdentity, make_instance


def small_instance(
    study: StudyIdentity | None = None,
    *,
    seed: int = 0,
    size: int = 32,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    **kw: object,
) -> Dataset:
    """A tiny CR image (random pixels): ingest tests need headers, not diagnostic content."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size, size), dtype=np.uint8)
    return make_instance(
        pixels,
        study=study or StudyIdentity.new(),
        transfer_syntax=transfer_syntax,
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        **kw,  # type: ignore[arg-type]
    )


@contextmanager
def scu(
    port: int,
    datasets: list[Dataset] | None = None,
    *,
    calling_aet: str = "TESTSCU",
    called_aet: str = "SCREENER",
    contexts: list[tuple[str, str]] | None = None,
    tls_args: tuple[object, str] | None = None,
    timeout: float = 20,
) -> Iterator[Association]:
    """An established association proposing the contexts ``datasets`` need."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    wanted = set(contexts or [])
    for ds in datasets or []:
        wanted.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    if not wanted:
        wanted.add(("1.2.840.10008.1.1", "1.2.840.10008.1.2"))
    for sop_class, ts in sorted(wanted):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet, tls_args=tls_args)  # type: ignore[arg-type]
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def rejection(
    port: int, *, calling_aet: str = "TESTSCU", called_aet: str = "SCREENER"
) -> Rejection | None:
    """The A-ASSOCIATE-RJ the listener answers (None: it did not reject). Read from the PDU:
    pynetdicom's ``is_rejected`` now and then says aborted for a rejection
    (:mod:`screener.dicom.association_answer`)."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context("1.2.840.10008.1.1", "1.2.840.10008.1.2")
    answer = AssociationAnswer()
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet, evt_handlers=answer.handlers)
    if assoc.is_established:
        assoc.release()
    return answer.rejection


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(p for p in spool_dir.rglob("*.dcm"))


# --- a minimal raw DICOM upper layer, for the hostile and fuzz tests -----------------------
# pynetdicom's SCU checks what it sends; an attacker does not. These helpers write PDUs byte
# by byte, so a test controls every length field, and they are fast (thousands of C-STOREs).

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _uid_item(item_type: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return struct.pack(">BBH", item_type, 0, len(raw)) + raw


def associate_rq(
    contexts: list[tuple[str, list[str]]],
    *,
    called: str = "SCREENER",
    calling: str = "RAWSCU",
    max_pdu: int = 65536,
    raw_called: bytes | None = None,
    raw_calling: bytes | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` [(abstract syntax, [transfer syntaxes])]."""
    called_b = raw_called if raw_called is not None else called.encode().ljust(16)[:16]
    calling_b = raw_calling if raw_calling is not None else calling.encode().ljust(16)[:16]
    body = b"\x00\x01\x00\x00" + called_b + calling_b + b"\x00" * 32
    body += _uid_item(0x10, "1.2.840.10008.3.1.1.1")
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = _uid_item(0x30, abstract) + b"".join(_uid_item(0x40, ts) for ts in syntaxes)
        body += struct.pack(">BBHBBBB", 0x20, 0, 4 + len(sub), 2 * i + 1, 0, 0, 0) + sub
    user = struct.pack(">BBHL", 0x51, 0, 4, max_pdu) + _uid_item(0x52, "1.2.826.0.1.3680043.9.1")
    body += struct.pack(">BBH", 0x50, 0, len(user)) + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket, limit: int = 1 << 24) -> tuple[int, bytes] | None:
    """One PDU (type, body) from ``sock``; None when the peer closed the connection."""
    header = _read_exact(sock, 6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    if length > limit:
        raise ValueError(f"PDU of {length} bytes")
    body = _read_exact(sock, length)
    return None if body is None else (pdu_type, body)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except (ConnectionResetError, TimeoutError, OSError):
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _accepted_contexts(ac_body: bytes) -> tuple[dict[int, str], int]:
    """{context id: transfer syntax} accepted in an A-ASSOCIATE-AC body, and its max PDU."""
    accepted: dict[int, str] = {}
    max_pdu = 0
    pos = 68
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, pos)
        value = ac_body[pos + 4 : pos + 4 + length]
        if item_type == 0x21 and value[2] == 0:
            ts_len = struct.unpack_from(">H", value, 6)[0]
            accepted[value[0]] = value[8 : 8 + ts_len].decode().rstrip("\x00")
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, _, sub_len = struct.unpack_from(">BBH", value, sub)
                if sub_type == 0x51:
                    max_pdu = struct.unpack_from(">L", value, sub + 4)[0]
                sub += 4 + sub_len
        pos += 4 + length
    return accepted, max_pdu


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, elem, len(value)) + value


def c_store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, as PS3.7 requires)."""
    rest = (
        _element(0x0000, 0x0002, sop_class.encode())
        + _element(0x0000, 0x0100, struct.pack("<H", 0x0001))
        + _element(0x0000, 0x0110, struct.pack("<H", message_id & 0xFFFF))
        + _element(0x0000, 0x0700, struct.pack("<H", 0))
        + _element(0x0000, 0x0800, struct.pack("<H", 0x0000))
        + _element(0x0000, 0x1000, sop_instance.encode())
    )
    return _element(0x0000, 0x0000, struct.pack("<L", len(rest))) + rest


def _status_of(command: bytes) -> int | None:
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, pos)
        if (group, elem) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    return None


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    """One PDV item: length, presentation context ID, message control header, fragment."""
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def _pdu(items: list[bytes]) -> bytes:
    """A P-DATA-TF PDU holding ``items``."""
    body = b"".join(items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


class RawSCU:
    """One association over a plain socket: C-STOREs of arbitrary bytes, statuses back."""

    def __init__(
        self,
        port: int,
        contexts: list[tuple[str, list[str]]],
        *,
        calling: str = "RAWSCU",
        called: str = "SCREENER",
        timeout: float = 30.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(associate_rq(contexts, called=called, calling=calling))
        answer = read_pdu(self.sock)
        if answer is None or answer[0] != 0x02:
            self.sock.close()
            raise ConnectionRefusedError(f"association not accepted: {answer and answer[0]}")
        self.accepted, max_pdu = _accepted_contexts(answer[1])
        self.fragment = max(1024, (max_pdu or 1 << 20) - 6)
        self.contexts: dict[str, dict[str, int]] = {}
        for i, (abstract, _) in enumerate(contexts):
            if 2 * i + 1 in self.accepted:
                self.contexts.setdefault(abstract, {})[self.accepted[2 * i + 1]] = 2 * i + 1
        self.message_id = 0

    def store(
        self,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        body: bytes,
        *,
        fragment: int | None = None,
        packing: str = "item-per-pdu",
    ) -> int | None:
        """Send one C-STORE; its status, or None when the listener ended the association.

        ``packing`` lays the PDV items out in PDUs as different senders do: ``item-per-pdu``
        (pynetdicom, dcmtk), ``pairs`` (two data set items per PDU), ``command-with-data``
        (the command and the first data set item in one PDU), ``empty-items`` (an empty
        data set item before each, and an empty last one).
        """
        self.message_id += 1
        cid = self.contexts[sop_class][transfer_syntax]
        size = fragment or self.fragment
        items = [_pdv(cid, 0x03, c_store_command(sop_class, sop_instance, self.message_id))]
        view = memoryview(body)
        starts = range(0, max(len(body), 1), size)
        for start in starts:
            last = start + size >= len(body) and packing != "empty-items"
            if packing == "empty-items":
                items.append(_pdv(cid, 0x00, b""))
            items.append(_pdv(cid, 0x02 if last else 0x00, bytes(view[start : start + size])))
        if packing == "empty-items":
            items.append(_pdv(cid, 0x02, b""))
        groups: list[list[bytes]]
        if packing == "pairs":
            groups = [items[:1]] + [items[i : i + 2] for i in range(1, len(items), 2)]
        elif packing == "command-with-data":
            groups = [items[:2]] + [[item] for item in items[2:]]
        else:
            groups = [[item] for item in items]
        out = [_pdu(group) for group in groups]
        try:
            self.sock.sendall(b"".join(out))
        except OSError:
            return None
        command = bytearray()
        while True:
            pdu = read_pdu(self.sock)
            if pdu is None or pdu[0] != 0x04:
                return None
            pos = 0
            done = False
            while pos < len(pdu[1]):
                (length,) = struct.unpack_from(">L", pdu[1], pos)
                control = pdu[1][pos + 5]
                command += pdu[1][pos + 6 : pos + 4 + length]
                done = done or bool(control & 0x02)
                pos += 4 + length
            if done:
                return _status_of(bytes(command))

    def release(self) -> None:
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            read_pdu(self.sock)
        except OSError:
            pass
        self.sock.close()


def encode_body(ds: Dataset) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, data set bytes without file meta) of ``ds``."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta_length = struct.unpack_from("<L", data, 132 + 8)[0]
    body = data[132 + 12 + meta_length :]
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), body


# --- the listener as a separate process (`screener listen`), for memory and crash tests -----

SCREENER = str(Path(sys.executable).parent / "screener")


class ListenerProcess:
    """``screener listen`` on a free loopback port, optionally under an address-space limit."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra_env = env or {}
        self.log_path = data_dir.parent / f"{data_dir.name}-listener.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, memory_limit_bytes: int | None = None, timeout: float = 60.0) -> None:
        from tests.dcmtk import free_port

        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
        env.update(
            SCREENER_DATA_DIR=str(self.data_dir),
            SCREENER_LISTENER__PORT=str(self.port),
            SCREENER_STUDY_QUIET_SECONDS="3600",  # no assembly work competing with the test
            MALLOC_ARENA_MAX="4",  # a predictable address space under RLIMIT_AS
        )
        env.update(self.extra_env)

        def limit() -> None:
            if memory_limit_bytes:
                resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [SCREENER, "listen"], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"listener exited: {self.log_path.read_text()[-3000:]}")
            if "accepting" in self.log_path.read_text(errors="replace"):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        raise TimeoutError("listener did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status_kb(self, field: str) -> int:
        """A /proc/PID/status field in KiB (VmRSS, VmHWM = peak RSS)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def database_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    """(SOP instance UID, content digest, file path) of every instance the listener recorded."""
    import sqlite3

    with sqlite3.connect(data_dir / "screener.sqlite3") as db:
        return [
            tuple(r)
            for r in db.execute("SELECT sop_instance_uid, content_digest, file_path FROM instances")
        ]


def echo_ok(port: int, calling_ae: str = "ORTHANC", timeout: float = 5) -> bool:
    """Whether a C-ECHO to the screener on ``port`` (loopback) succeeds."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENER")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)
