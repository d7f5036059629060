"""C-STORE over TLS (mutual) to dcmtk storescp, with certificates made by openssl here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from screener.dicom.sender import close_pooled_associations, send_files
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings, TlsSettings
from tests.integration.test_delivery import StoreScp
from tests.integration.test_listener_tls import make_pki
from tests.report_results import make_result

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("storescp") is None,
    reason="openssl or dcmtk not installed",
)


def _mutual_tls_scp(tmp_path: Path, pki: dict[str, Path]) -> StoreScp:
    """dcmtk storescp over TLS, requiring a client certificate signed by ``pki``'s CA."""
    return StoreScp(
        tmp_path / "received",
        extra_args=("+tls", str(pki["server.key"]), str(pki["server.pem"]), "-pw")
        + ("+cf", str(pki["ca.pem"]), "-rc"),
    ).start()


def _mutual_tls_destination(scp: StoreScp, pki: dict[str, Path]) -> Destination:
    """``scp`` as a destination that trusts ``pki``'s CA and offers its client certificate."""
    return Destination(
        ae_title=scp.aet,
        host="127.0.0.1",
        port=scp.port,
        tls=TlsSettings(
            enabled=True,
            client_ca=str(pki["ca.pem"]),
            certificate=str(pki["client.pem"]),
            private_key=str(pki["client.key"]),
        ),
    )


def test_mutual_tls_store_and_refusals(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    scp = _mutual_tls_scp(tmp_path, pki)
    source, _ = make_result(tmp_path, ["PA"])
    paths = write_study_outputs(source, tmp_path / "out", Settings(data_dir=tmp_path / "d"))
    try:
        good = _mutual_tls_destination(scp, pki)
        outcome = send_files(good, paths, calling_ae_title="SCREENER")
        assert outcome.failed == {} and len(outcome.stored) == len(paths)
        assert scp.received() == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)

        # no client certificate: the PACS refuses the TLS handshake
        no_cert = good.model_copy(
            update={"tls": TlsSettings(enabled=True, client_ca=str(pki["ca.pem"]))}
        )
        refused = send_files(no_cert, paths, calling_ae_title="SCREENER")
        assert refused.stored == [] and refused.association_error

        # a PACS certificate not signed by the configured CA is not trusted
        other = tmp_path / "other"
        other.mkdir()
        other_pki = make_pki(other)
        untrusted = good.model_copy(
            update={"tls": good.tls.model_copy(update={"client_ca": str(other_pki["ca.pem"])})}
        )
        distrust = send_files(untrusted, paths, calling_ae_title="SCREENER")
        assert distrust.stored == [] and distrust.association_error

        # missing key material: reported, not raised
        broken = good.model_copy(
            update={"tls": good.tls.model_copy(update={"certificate": str(tmp_path / "nope")})}
        )
        failed = send_files(broken, paths[:1], calling_ae_title="SCREENER")
        assert (failed.association_error or "").startswith("TLS setup failed")

        # plain TCP to a TLS port: no association either
        plain = good.model_copy(update={"tls": TlsSettings()})
        assert send_files(plain, paths[:1], calling_ae_title="SCREENER").stored == []
    finally:
        scp.stop()


def test_a_tls_association_is_kept_open_for_the_next_study(tmp_path: Path) -> None:
    """Two calls with ``idle_seconds``: the second goes over the first's TLS association."""
    pki = make_pki(tmp_path)
    scp = _mutual_tls_scp(tmp_path, pki)
    settings = Settings(data_dir=tmp_path / "d")
    first, _ = make_result(tmp_path / "a", ["PA"])
    second, _ = make_result(tmp_path / "b", ["PA"])
    batches = [
        write_study_outputs(r, tmp_path / f"out{i}", settings)
        for i, r in enumerate((first, second))
    ]
    destination = _mutual_tls_destination(scp, pki)
    try:
        outcomes = [
            send_files(destination, paths, calling_ae_title="SCREENER", idle_seconds=30.0)
            for paths in batches
        ]
        assert [o.associations_opened for o in outcomes] == [1, 0]
        assert all(o.failed == {} for o in outcomes)
        sent = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for b in batches for p in b)
        assert scp.received() == sent
        assert close_pooled_associations() == 1
    finally:
        close_pooled_associations()
        scp.stop()
