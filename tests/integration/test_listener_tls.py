"""A real TLS association (and mutual TLS) with certificates made by openssl in the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from screener.dicom.echo import EchoOutcome, echo
from screener.dicom.listener import start_listener
from screener.dicom.tls import client_context
from screener.settings import Settings, TlsSettings
from tests.listener_support import scu, small_instance

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all CA-signed."""
    d = directory
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    return make_pki(d)


def test_mutual_tls_store_and_echo(sqlite_settings: Settings, pki: dict[str, Path]) -> None:
    s = sqlite_settings
    s.listener.port = 0
    s.listener.tls = TlsSettings(
        enabled=True,
        certificate=str(pki["server.pem"]),
        private_key=str(pki["server.key"]),
        client_ca=str(pki["ca.pem"]),
    )
    client_tls = TlsSettings(
        enabled=True, certificate=str(pki["client.pem"]), private_key=str(pki["client.key"])
    )
    ds = small_instance()
    with start_listener(s, migrate=False) as handle:
        ctx = client_context(client_tls, server_ca=str(pki["ca.pem"]))
        assert ctx is not None
        with scu(handle.port, [ds], tls_args=(ctx, "127.0.0.1")) as assoc:
            assert assoc.is_established
            assert assoc.send_c_store(ds).Status == 0x0000
        result = echo(
            "127.0.0.1", handle.port, "SCREENER", ssl_context=ctx, server_hostname="127.0.0.1"
        )
        assert result.outcome is EchoOutcome.SUCCESS

        # no client certificate: the handshake fails, nothing is associated
        anonymous = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        refused = echo(
            "127.0.0.1",
            handle.port,
            "SCREENER",
            ssl_context=anonymous,
            server_hostname="127.0.0.1",
            timeout=5,
        )
        assert refused.outcome is EchoOutcome.NO_ASSOCIATION
        # plain TCP to a TLS listener: refused too
        plain = echo("127.0.0.1", handle.port, "SCREENER", timeout=5)
        assert plain.outcome is EchoOutcome.NO_ASSOCIATION
    assert len(list(s.spool_dir.rglob("*.dcm"))) == 1
