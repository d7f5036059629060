"""Helpers shared by the listener tests: small instances and a raw pynetdicom SCU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

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


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(p for p in spool_dir.rglob("*.dcm"))
