"""SR + heatmap delivered to a real Orthanc and read back over its REST API."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from screener.db.models import utcnow
from screener.delivery import deliver_pending, job_delivered, list_deliveries, record_outputs
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings
from tests.orthanc import OrthancServer, orthanc_available
from tests.report_results import content_items, make_job, make_result

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Debian package orthanc missing")


def test_outputs_arrive_in_the_same_orthanc_study_once_even_if_it_was_down(
    tmp_path: Path, sqlite_settings: Settings
) -> None:
    result, sources = make_result(tmp_path, ["PA", "LATERAL"], scores=[0.66, 0.0])
    with OrthancServer(tmp_path) as pacs:
        for path in sources:
            pacs.upload(path)
        [study_id] = pacs.studies()
        dest = Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
        settings = sqlite_settings.model_copy(
            update={
                "delivery": sqlite_settings.delivery.model_copy(
                    update={"destinations": [dest], "backoff_seconds": 5.0}
                )
            }
        )
        paths = write_study_outputs(result, settings.outbox_dir / "job1", settings)
        job_id = make_job(settings, result.study_instance_uid)
        record_outputs(settings, job_id, paths)

        pacs.stop()  # the PACS is down when the delivery runs
        t0 = utcnow()
        down = deliver_pending(settings, now=t0)
        assert down.retrying == len(paths) and down.delivered == 0
        assert job_delivered(settings, job_id) is False

        pacs.start()  # back up, same data and ports
        assert deliver_pending(settings, now=t0 + timedelta(seconds=1)).attempted == 0  # backoff
        up = deliver_pending(settings, now=t0 + timedelta(seconds=5))
        assert up.delivered == len(paths)
        assert deliver_pending(settings, now=t0 + timedelta(hours=1)).attempted == 0
        assert job_delivered(settings, job_id) is True
        assert [r.attempts for r in list_deliveries(settings)] == [2] * len(paths)

        # exactly once, in the source's Orthanc study: 2 sources + SR + 1 SC
        assert pacs.studies() == [study_id]
        study_instances = pacs.get_json(f"studies/{study_id}/instances")
        assert len(study_instances) == 4
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
        for uid in uids:
            assert len(pacs.find_instances(SOPInstanceUID=uid)) == 1

        # read the SR back over REST and check what a radiologist would rely on
        [sr_id] = pacs.find_instances(SOPInstanceUID=uids[0])
        tags = pacs.instance_tags(sr_id)
        assert tags["Modality"] == "SR" and tags["VerificationFlag"] == "UNVERIFIED"
        assert tags["ManufacturerModelName"] == "pacs-screener"
        sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_id)))
        items = content_items(list(sr.ContentSequence))
        probability = [
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "122157"
        ]
        assert 0.66 in probability
        params = [i.TextValue for i in items if i.ValueType == "TEXT"]
        assert "covid_threshold=0.420000" in params
        assert settings.disclaimer in params
        referenced = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in items
            if i.ValueType == "IMAGE"
        }
        source_uid = result.images[0].source.sop_instance_uid
        assert {source_uid, uids[1]} <= referenced  # the screened image and its heatmap
        assert len(pacs.find_instances(SOPInstanceUID=uids[1])) == 1  # the SC is there too
        sc_tags = pacs.instance_tags(pacs.find_instances(SOPInstanceUID=uids[1])[0])
        assert sc_tags["BurnedInAnnotation"] == "YES"
        assert sc_tags["StudyInstanceUID"] == result.study_instance_uid
