"""TLS for DICOM associations: server side (listener) and client side (echo, sender)."""

from __future__ import annotations

import ssl

from screener.settings import TlsSettings


class TlsConfigError(ValueError):
    """TLS is enabled but its certificate, key or CA is missing or unreadable."""


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """An SSL context for the listener, or None when TLS is off.

    With ``client_ca`` set, clients must present a certificate signed by it (mutual TLS).
    """
    if not tls.enabled:
        return None
    if not tls.certificate or not tls.private_key:
        raise TlsConfigError("listener.tls.enabled needs certificate and private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.client_ca:
            context.load_verify_locations(cafile=tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS material: {exc}") from exc
    return context


def client_context(tls: TlsSettings, server_ca: str = "") -> ssl.SSLContext | None:
    """An SSL context for an outgoing association, or None when TLS is off.

    ``server_ca`` (or ``tls.client_ca``) verifies the peer; ``certificate``/``private_key``
    are presented to peers that require mutual TLS.
    """
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=server_ca or tls.client_ca or None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate and tls.private_key:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context
