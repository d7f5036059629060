"""The screenability gate on real objects: what is screened, what is refused and why, and
what that means for the study (offline result, outputs, late arrivals at ingest)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlmodel import col, select

from screener.db.models import AuditLog, Instance, Study
from screener.db.session import session_scope
from screener.dicom.dataset_check import InstanceHeader
from screener.ingest import ReceivedFile, content_digest, record_instance
from screener.reports.writer import write_study_outputs
from screener.screenability import screenability, screenability_of_file
from screener.settings import ScreeningSettings, Settings
from screener.study_assembler import complete_study
from screener.testing.dicom_factory import (
    StudyIdentity,
    make_companion,
    make_instance,
    write_datasets,
)
from tests.dicom_validation import assert_valid, dciodvfy
from tests.report_results import synthetic_pixels

GATE = ScreeningSettings()


def _cr(**kw: object) -> Dataset:
    return make_instance(synthetic_pixels(320, 288), study=StudyIdentity.new(), **kw)  # type: ignore[arg-type]


def _code(ds: Dataset) -> str | None:
    refusal = screenability(ds, GATE)
    return None if refusal is None else refusal.code


def test_chest_radiographs_pass() -> None:
    assert _code(_cr()) is None
    assert _code(_cr(modality="DX")) is None
    assert _code(_cr(view_position="LATERAL")) is None  # laterals: the view filter's job
    assert _code(_cr(body_part_examined=None)) is None  # no body part at all: accepted


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda ds: setattr(ds, "BodyPartExamined", "HAND"), "not_chest"),
        (lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]), "derived"),
        (lambda ds: setattr(ds, "NumberOfFrames", 3), "multi_frame"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), "colour"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "colour"),
        (lambda ds: setattr(ds, "Modality", "CT"), "not_projection"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"), "secondary_capture"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), "not_projection"),
        (lambda ds: setattr(ds, "PresentationIntentType", "FOR PROCESSING"), "for_processing"),
        (lambda ds: delattr(ds, "PixelData"), "not_image"),
    ],
)
def test_refusals(change, code: str) -> None:  # type: ignore[no-untyped-def]
    ds = _cr()
    change(ds)
    assert _code(ds) == code


def test_dx_for_processing_too_small_and_anatomic_region() -> None:
    assert _code(_cr(modality="DX", for_processing=True)) == "for_processing"
    assert _code(_cr(target_size=(200, 180))) == "too_small"
    dx = _cr(modality="DX", body_part_examined=None)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "85562004", "SCT", "Hand"
    dx.AnatomicRegionSequence = [region]
    assert _code(dx) == "not_chest"
    region.CodeValue = "43799004"
    assert _code(dx) is None


def test_configurable() -> None:
    assert screenability(_cr(target_size=(200, 180)), ScreeningSettings(min_size=128)) is None
    derived = _cr()
    derived.ImageType = ["DERIVED", "SECONDARY"]
    assert screenability(derived, ScreeningSettings(accept_derived=True)) is None
    assert screenability(_cr(), ScreeningSettings(modalities=["DX"])) is not None


def test_pydicom_test_objects(tmp_path: Path) -> None:
    """Real objects from other modalities, judged from the file header alone."""
    expected = {
        "CT_small.dcm": "not_projection",
        "MR_small.dcm": "not_projection",
        "JPEG-lossy.dcm": "secondary_capture",  # NM whole body as secondary capture
        "SC_rgb.dcm": "secondary_capture",
    }
    for name, code in expected.items():
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        refusal = screenability_of_file(str(path), GATE)
        assert refusal is not None and refusal.code == code, (name, refusal)


@pytest.mark.parametrize("kind", ["dose_sr", "kos", "gsps"])
def test_non_images_are_refused_from_their_file(tmp_path: Path, kind: str) -> None:
    (path,) = write_datasets([make_companion(kind, study=StudyIdentity.new())], tmp_path)
    refusal = screenability_of_file(path, GATE)
    assert refusal is not None and refusal.code == "not_image"
    assert "not an image" in refusal.reason


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_factory_instances_are_valid(tmp_path: Path, modality: str) -> None:
    """dciodvfy: 0 errors for the factory's CR and DX (the DX had 6)."""
    for view in ("PA", "LATERAL"):
        (path,) = write_datasets([_cr(modality=modality, view_position=view)], tmp_path / view)
        result = dciodvfy(path)
        assert not result.errors, result.output


def test_reasons_do_not_echo_free_text() -> None:
    ds = _cr()
    ds.BodyPartExamined = "Mr Smith's left hand"  # not a defined term: never echoed
    refusal = screenability(ds, GATE)
    assert refusal is not None and "Smith" not in refusal.reason


# ------------------------------------------------------------------ the study


def _study_files(tmp_path: Path) -> tuple[StudyIdentity, list[Path]]:
    study = StudyIdentity.new()
    images = [make_instance(synthetic_pixels(320, 288), study=study)]
    companions = [
        make_companion(k, study=study, instance_number=i)
        for i, k in enumerate(["dose_sr", "kos", "gsps"], start=1)
    ]
    return study, write_datasets(images + companions, tmp_path / "study")


def test_non_images_never_appear_among_images_nor_make_the_sr_partial(tmp_path: Path) -> None:
    from screener.results import ImageResult, ModelInfo, ThresholdInfo
    from screener.screening.prepare import prepare_instance
    from screener.screening.study_result import assemble_study
    from tests.report_results import cam_blob, display_of, lung_mask

    settings = Settings(data_dir=tmp_path / "data")
    _, files = _study_files(tmp_path)
    prepared = [prepare_instance(f, settings) for f in files]
    assert sum(p.refused for p in prepared) == 3
    results = []
    for p in prepared:
        r = ImageResult(source=p.source, skip_reason=p.skip_reason, refused=p.refused)
        if not p.refused:  # what the models would give: a screened frontal image
            ds = pydicom.dcmread(str(p.source.file_path))
            r.view, r.screened = "PA", True
            r.probabilities = {"covid": 0.7, "pneumonia": 0.2, "normal": 0.1}
            r.covid_positive = True
            r.display_image = display_of(ds)
            r.lung_mask = lung_mask(r.display_image.shape)
            r.cam = cam_blob(r.display_image.shape)
        results.append(r)
    study = assemble_study(
        prepared[0].source.study_instance_uid,
        results,
        ModelInfo("m", "1"),
        ThresholdInfo(0.5),
        "NOT FOR DIAGNOSTIC USE.",
    )
    assert study.status == "screened"
    assert len(study.images) == 1 and len(study.ignored_objects) == 3
    payload = study.to_json()
    assert [o["skip_reason"] for o in payload["ignored_objects"]] == [
        "not an image (X-Ray Radiation Dose SR Storage)",
        "not an image (Key Object Selection Document Storage)",
        "not an image (Grayscale Softcopy Presentation State Storage)",
    ]
    paths = write_study_outputs(study, tmp_path / "out", settings)
    sr = pydicom.dcmread(paths[0])
    assert sr.CompletionFlag == "COMPLETE"  # not PARTIAL
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert {o["sop_instance_uid"] for o in payload["ignored_objects"]}.isdisjoint(evidence)
    assert_valid(paths[0])


def test_nothing_screenable_gives_ignored_and_no_outputs(tmp_path: Path) -> None:
    from screener.results import ImageResult, ModelInfo, ThresholdInfo
    from screener.screening.prepare import prepare_instance
    from screener.screening.study_result import assemble_study

    settings = Settings(data_dir=tmp_path / "data")
    study = StudyIdentity.new()
    pattern = make_instance(synthetic_pixels(320, 288), study=study)
    pattern.SOPClassUID = pattern.file_meta.MediaStorageSOPClassUID = UID(
        "1.2.840.10008.5.1.4.1.1.7"
    )
    pattern.Modality = "OT"
    files = write_datasets([pattern, make_companion("dose_sr", study=study)], tmp_path / "s")
    prepared = [prepare_instance(f, settings) for f in files]
    results = [
        ImageResult(p.source, skip_reason=p.skip_reason, refused=p.refused) for p in prepared
    ]
    result = assemble_study(
        study.study_instance_uid, results, ModelInfo("m", "1"), ThresholdInfo(0.5), "x"
    )
    assert result.status == "ignored"
    assert result.reason is not None and "secondary capture" in result.reason
    assert result.to_json()["status"] == "ignored" and result.to_json()["images"] == []
    assert write_study_outputs(result, tmp_path / "out", settings) == []
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ ingest


def _header(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        modality=ds.get("Modality"),
        view_position=ds.get("ViewPosition"),
        image_laterality=None,
        body_part_examined=ds.get("BodyPartExamined"),
        photometric_interpretation=ds.get("PhotometricInterpretation"),
        patient_id=ds.PatientID,
        accession_number=None,
        study_date=None,
        series_description=None,
        manufacturer_model_name=None,
    )


def _store(settings: Settings, path: Path) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    received = ReceivedFile(
        file_path=str(path),
        size_bytes=len(data),
        content_digest=content_digest(data),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    return record_instance(settings.database_url, _header(ds), received).study_id


def test_late_non_image_is_recorded_and_does_not_reopen(tmp_path: Path, settings: Settings) -> None:
    study = StudyIdentity.new()
    cr, dose, cr2 = write_datasets(
        [
            make_instance(synthetic_pixels(320, 288), study=study),
            make_companion("dose_sr", study=study),
            make_instance(synthetic_pixels(320, 288), study=study, view_position="LATERAL"),
        ],
        tmp_path / "in",
    )
    study_id = _store(settings, cr)
    with session_scope(settings.database_url) as session:
        from screener.db.models import utcnow

        assert complete_study(session, study_id, utcnow()) is not None
    _store(settings, dose)  # after completion: recorded, not re-opened
    with session_scope(settings.database_url) as session:
        row = session.exec(select(Study)).one()
        assert row.is_complete
        instances = session.exec(select(Instance).order_by(col(Instance.id))).all()
        assert [i.skip_reason for i in instances] == [
            None,
            "not an image (X-Ray Radiation Dose SR Storage)",
        ]
        late = session.exec(
            select(AuditLog).where(AuditLog.action == "instance.late_not_screenable")
        ).all()
        assert len(late) == 1
    _store(settings, cr2)  # a new screenable image re-opens the study
    with session_scope(settings.database_url) as session:
        assert not session.exec(select(Study)).one().is_complete


def test_display_pixels_unchanged_by_the_header_first_read(tmp_path: Path) -> None:
    """prepare reads the header first, then the whole file: the image is the same."""
    from screener.screening.prepare import prepare_dataset, prepare_instance

    settings = Settings(data_dir=tmp_path / "data")
    (path,) = write_datasets([_cr()], tmp_path)
    a = prepare_instance(path, settings)
    b = prepare_dataset(pydicom.dcmread(path), path, settings)
    assert a.display_image is not None and b.display_image is not None
    assert np.array_equal(a.display_image, b.display_image)


# ------------------------------------------------------------------ the listener's gate


def _with(ds: Dataset, **attrs: object) -> Dataset:
    for name, value in attrs.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _gate_objects() -> dict[str, tuple[Dataset, str | None]]:
    """name -> (object, the refusal code the gate gives it)."""
    study = StudyIdentity.new()
    private_after_pixels = _with(_cr(), PixelData=None)
    private_after_pixels.add_new(0x7FE10010, "LO", "PRIVATE CREATOR")  # after (7FE0,0010)
    float_pixels = _with(_cr(), PixelData=None)
    float_pixels.add_new(0x7FE00008, "OF", bytes(4 * 320 * 288))  # Float Pixel Data
    implicit = _cr()
    implicit.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2")
    return {
        "CR": (_cr(), None),
        "DX": (_cr(modality="DX"), None),
        "CR implicit VR": (implicit, None),
        "DX for processing": (_cr(modality="DX", for_processing=True), "for_processing"),
        "SC": (
            _with(_cr(), SOPClassUID=UID("1.2.840.10008.5.1.4.1.1.7"), Modality="OT"),
            "secondary_capture",
        ),
        "CT": (
            _with(_cr(), SOPClassUID=UID("1.2.840.10008.5.1.4.1.1.2"), Modality="CT"),
            "not_projection",
        ),
        "dose SR": (make_companion("dose_sr", study=study), "not_image"),
        "KOS": (make_companion("kos", study=study), "not_image"),
        "GSPS": (make_companion("gsps", study=study), "not_image"),
        "multi-frame": (_with(_cr(), NumberOfFrames=3), "multi_frame"),
        "colour": (_with(_cr(), PhotometricInterpretation="RGB"), "colour"),
        "small": (_cr(target_size=(200, 180)), "too_small"),
        "hand": (_with(_cr(), BodyPartExamined="HAND"), "not_chest"),
        "derived": (_with(_cr(), ImageType=["DERIVED", "SECONDARY"]), "derived"),
        "no pixel data": (_with(_cr(), PixelData=None), "not_image"),
        "private element after pixel data": (private_after_pixels, "not_image"),
        "float pixel data": (float_pixels, None),
    }


def _decided_in_memory(path: Path) -> str | None:
    """The listener's decision on the bytes it received (the data set after the file meta)."""
    from screener.dicom.dataset_check import check_structure, read_header_dataset
    from screener.dicom.listener import _gate_reason

    raw = path.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(path)
    body = memoryview(raw)[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
    ts = str(meta.TransferSyntaxUID)
    length = check_structure(body, ts)
    ds = read_header_dataset(body, ts, length)
    ctx = SimpleNamespace(settings=SimpleNamespace(screening=GATE))
    decided = _gate_reason(ds, body, ts, length, ctx)  # type: ignore[arg-type]
    assert isinstance(decided, str | None), f"{path.name}: not decided in memory"
    return decided


def test_the_listeners_in_memory_gate_equals_the_file_gate(tmp_path: Path) -> None:
    from screener.ingest import gate_reason

    objects = _gate_objects()
    paths = write_datasets([ds for ds, _ in objects.values()], tmp_path)
    for (name, (_, code)), path in zip(objects.items(), paths, strict=True):
        from_file = screenability_of_file(path, GATE)
        assert (None if from_file is None else from_file.code) == code, name
        assert _decided_in_memory(path) == gate_reason(str(path), GATE), name
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG-lossy.dcm",
        "SC_rgb.dcm",
        "MR2_J2KR.dcm",
    ):
        found = get_testdata_file(name, download=False)
        if found is not None:
            path = Path(str(found))
            assert _decided_in_memory(path) == gate_reason(str(path), GATE), name


def test_deflated_data_sets_are_left_to_the_file_gate(tmp_path: Path) -> None:
    from screener.dicom.listener import _gate_reason
    from screener.ingest import Gate

    ds = _cr()
    body = memoryview(b"\x08\x00\x16\x00")
    ctx = SimpleNamespace(settings=SimpleNamespace(screening=GATE))
    assert _gate_reason(ds, body, "1.2.840.10008.1.2.1.99", 4, ctx) is Gate.READ_FILE  # type: ignore[arg-type]
