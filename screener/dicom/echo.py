"""C-ECHO a DICOM peer (``screener echo``): is it there, and does it accept our AE title?"""

from __future__ import annotations

import enum
import socket
import ssl
from dataclasses import dataclass

from pynetdicom import AE

from screener.dicom.ae_title import ae_title_problem
from screener.dicom.association_answer import AssociationAnswer
from screener.dicom.sop_classes import VERIFICATION_SOP_CLASS


class EchoOutcome(enum.IntEnum):
    """Also the exit code of ``screener echo``."""

    SUCCESS = 0
    NO_ASSOCIATION = 2  # refused connection, rejected or aborted association
    FAILED_STATUS = 3  # associated, but C-ECHO answered with a non-success status or nothing


@dataclass(frozen=True)
class EchoResult:
    outcome: EchoOutcome
    detail: str


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "SCREENER",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> EchoResult:
    """Associate, send one C-ECHO, release.

    An AE title DICOM does not allow (:func:`~screener.dicom.ae_title.ae_title_problem`)
    raises ValueError with the reason, as pynetdicom would for most of them, without its
    logged error; ``screener echo`` checks the titles first (exit 2).
    """
    for title in (called_aet, calling_aet):
        problem = ae_title_problem(title)
        if problem:
            raise ValueError(problem)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return EchoResult(
            EchoOutcome.NO_ASSOCIATION,
            f"no association: cannot resolve host {host!r}; check the name or use an IP address",
        )
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    tls_args = (ssl_context, server_hostname or "") if ssl_context is not None else None
    answer = AssociationAnswer()
    assoc = ae.associate(
        host, port, ae_title=called_aet, tls_args=tls_args, evt_handlers=answer.handlers
    )
    if not assoc.is_established:
        return EchoResult(
            EchoOutcome.NO_ASSOCIATION, f"{called_aet}@{host}:{port}: {answer.outcome(assoc)}"
        )
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if status and getattr(status, "Status", None) == 0x0000:
        return EchoResult(EchoOutcome.SUCCESS, f"C-ECHO to {called_aet}@{host}:{port}: success")
    code = f"0x{status.Status:04X}" if status and "Status" in status else "no response"
    return EchoResult(EchoOutcome.FAILED_STATUS, f"C-ECHO to {called_aet}@{host}:{port}: {code}")
