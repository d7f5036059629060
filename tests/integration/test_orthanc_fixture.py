"""The Orthanc test PACS starts, stores over REST and DICOM, and restarts with its data."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_study,
    pick_images,
    write_datasets,
)
from tests.orthanc import OrthancServer, orthanc_available

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Debian package orthanc missing")


def test_orthanc_round_trip_and_restart(cxr_dir: Path, tmp_path: Path) -> None:
    row = pick_images(cxr_dir, 1)[0]
    ds = make_study([(corpus_image(cxr_dir, row["id"])[:64, :64], "PA")], study=StudyIdentity.new())
    (path,) = write_datasets(ds, tmp_path / "in")
    with OrthancServer(tmp_path) as pacs:
        iid = pacs.upload(path)
        assert pacs.instances() == [iid]
        assert pacs.instance_tags(iid)["SOPInstanceUID"] == ds[0].SOPInstanceUID
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        pacs.stop()
        assert not pacs.running
        pacs.start()
        assert pacs.find_instances(SOPInstanceUID=ds[0].SOPInstanceUID) == [iid]
        back = pydicom.dcmread(io.BytesIO(pacs.instance_file(iid)))
        assert back.PixelData == pydicom.dcmread(path).PixelData
