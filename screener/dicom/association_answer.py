"""What a peer answered to our A-ASSOCIATE-RQ, read from the PDU it sent.

pynetdicom 3.0's requestor reports a *rejected* association as *aborted* when the peer's
A-ASSOCIATE-RJ and its closing of the connection both arrive before the ACSE thread looks
at the socket: it finds the socket closed and takes that for a failed connect
(``ACSE._negotiate_as_requestor``). On a loaded host this happens to about one rejection
in ten, and an administrator told "aborted" looks for a network fault instead of the AE
title the PACS did not recognise. An ``EVT_PDU_RECV`` handler sees the RJ on the reader
thread before that thread closes the socket, so the rejection, with its reason, is known
whichever thread wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RJ

# PS3.8 9.3.4: Result, Source and Reason/Diag. of an A-ASSOCIATE-RJ
_RESULTS = {1: "rejected (permanent)", 2: "rejected (transient)"}
_SOURCES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}
_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Rejection:
    """The three fields of an A-ASSOCIATE-RJ, as the peer sent them."""

    result: int
    source: int
    reason: int

    def describe(self) -> str:
        """For example ``rejected (permanent) by the service user: calling AE title not
        recognised``; values outside PS3.8 are shown as numbers, never trusted."""
        result = _RESULTS.get(self.result, f"rejected (result {self.result})")
        source = _SOURCES.get(self.source, f"source {self.source}")
        reason = _REASONS.get((self.source, self.reason), f"reason {self.reason}")
        return f"{result} by the {source}: {reason}"


@dataclass
class AssociationAnswer:
    """Pass :attr:`handlers` to ``AE.associate``; read :meth:`outcome` once it returns."""

    rejection: Rejection | None = field(default=None)
    connected: bool = False  # a TCP (and TLS) connection was opened

    def _on_open(self, event: Any) -> None:
        self.connected = True

    def _on_pdu(self, event: Any) -> None:
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.rejection = Rejection(
                int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0)
            )

    @property
    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_PDU_RECV, self._on_pdu)]

    def outcome(self, assoc: Association) -> str:
        """Why ``assoc`` is not established, in the peer's words where it gave any."""
        if self.rejection is not None:
            return f"association {self.rejection.describe()}"
        if assoc.is_rejected:
            return "association rejected"
        if not self.connected:
            # pynetdicom calls a failed connect an abort: the admin should look at the
            # host, the port, the network or TLS, not at the peer's AE configuration
            return "no connection (refused, unreachable, timed out or TLS handshake failed)"
        if assoc.is_aborted:
            return "association aborted"
        return "no association"
