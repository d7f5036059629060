"""A leaner receive path for pynetdicom acceptors: the same PDUs, fewer copies of the data.

pynetdicom 3.0 reads a PDU in 4 KiB ``recv`` calls and then copies each P-DATA fragment
five more times (bytearray growth, ``bytes()``, item slicing, ``data[1:]``, ``BytesIO``)
before a C-STORE handler sees it. At hundreds of MB/s those copies, not DICOM, are most
of the listener's CPU. Here a P-DATA-TF PDU is read with ``recv_into`` into one buffer
and its PDV items are handed on as ``memoryview`` slices of it, so the only copy left is
the DIMSE layer's write into its data set buffer. Every other PDU type (association
negotiation, release, abort) goes through pynetdicom's own decoder unchanged.

The classes replace pynetdicom internals by subclassing, so they are tied to the pynetdicom
version they were written against; :func:`supported` turns them off for any other version.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pynetdicom
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

_P_DATA_TF = 0x04
_TESTED_VERSIONS = ("3.0.",)


def supported() -> bool:
    """True for the pynetdicom versions whose internals these classes were checked against."""
    return str(pynetdicom.__version__).startswith(_TESTED_VERSIONS)


class BulkReadAssociationSocket(AssociationSocket):
    """``recv`` with few large ``recv_into`` calls: ``nr_bytes`` bytes, or fewer on close."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            n = self.socket.recv_into(view[received:], nr_bytes - received)
            if not n:
                view.release()
                return buffer[:received]
            received += n
        view.release()
        return buffer


class _PDataPDU:
    """A decoded P-DATA-TF PDU whose PDV values are views into the received buffer."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[int, memoryview]]) -> None:
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # like pynetdicom's own P_DATA_TF.to_primitive: fill the list after the setter
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(self.items)  # type: ignore[arg-type]
        return primitive


def split_pdv_items(body: bytearray | bytes) -> list[tuple[int, memoryview]]:
    """PDV items of a P-DATA-TF PDU body (after the 6-byte PDU header), zero-copy.

    Each item is (presentation context ID, message control header + fragment).
    """
    view = memoryview(body)
    items: list[tuple[int, memoryview]] = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 6:
            raise ValueError("truncated PDV item header")
        (length,) = struct.unpack_from(">L", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV item length outside the PDU")
        items.append((view[offset + 4], view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return items


class LeanDULServiceProvider(DULServiceProvider):
    """DUL whose P-DATA-TF receive path skips pynetdicom's redundant copies."""

    def _read_pdu_data(self) -> None:
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.error("the received PDU is shorter than its header says")
            self.event_queue.put("Evt17")
            return
        if pdu_type != _P_DATA_TF:
            self._decode_generic(header + body)
            return
        try:
            items = split_pdv_items(body)
        except ValueError as exc:
            log.error("invalid P-DATA-TF PDU: %s", exc)
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return
        self.event_queue.put("Evt10")  # P-DATA-TF PDU received
        self._recv_pdu.put(_PDataPDU(items))  # type: ignore[arg-type]

    def _decode_generic(self, bytestream: bytes | bytearray) -> None:
        """Any other PDU: pynetdicom's own checks and decoder."""
        if bytestream[0] not in (0x01, 0x02, 0x03, 0x05, 0x06, 0x07):
            log.error("unknown PDU type 0x%02X received", bytestream[0])
            self.event_queue.put("Evt19")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(bytestream))
        except Exception:  # noqa: BLE001 - pynetdicom answers any decode error with Evt19
            log.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


class LeanRequestHandler(RequestHandler):
    """Gives each accepted association the lean socket and DUL (when supported)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        if supported():
            if type(assoc.dul.socket) is AssociationSocket:
                assoc.dul.socket.__class__ = BulkReadAssociationSocket
            if type(assoc.dul) is DULServiceProvider:
                assoc.dul.__class__ = LeanDULServiceProvider
        return assoc
