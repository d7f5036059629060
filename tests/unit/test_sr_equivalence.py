"""The SR built with plain pydicom equals the one highdicom's SR classes built, element for
element and byte for byte.

``highdicom_sr`` below is the SR as ``screener/reports/sr.py`` built it before the plain
pydicom builders replaced it (highdicom's TID 1500 templates and ``ComprehensiveSR``),
kept here verbatim so the comparison stays real. The only differences allowed are the three
values that both paths take from the clock when they run: Instance Creation Date and Time,
and the Contribution DateTime of highdicom's Contributing Equipment item. The test checks
they are well formed and close, then sets them equal before comparing.
"""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime, timedelta
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DT
from pynetdicom.dsutils import encode

from screener.identity import PRODUCT_NAME
from screener.imaging.views import view_label
from screener.reports import sr as sr_module
from screener.reports.common import (
    SR_SERIES_NUMBER,
    PredecessorRef,
    clip_lo,
    common_attributes,
    device_observer_uid,
    disclaimer_of,
    output_character_set,
    pneumonia_present,
    processing_equipment,
    read_source_header,
)
from screener.reports.operating_point import OperatingPointStatement, statement_for
from screener.reports.output_uids import OutputUids
from screener.reports.sr import (
    SERIES_DESCRIPTION,
    algorithm_parameters,
    build_sr,
    ignored_line,
    image_line,
    operating_point_text,
    summary_text,
)
from screener.reports.sr_document import Concept
from screener.reports.writer import build_image_objects
from screener.results import ImageResult, SourceImageRef, StudyResult
from screener.settings import Settings
from tests.dicom_validation import assert_valid
from tests.report_results import MODEL, concept_meaning, content_items, make_result

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def _coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


COVID_19 = _coded(sr_module.COVID_19)
PNEUMONIA = _coded(sr_module.PNEUMONIA)
LUNG = _coded(sr_module.LUNG)
PRESENT = _coded(sr_module.PRESENT)
ABSENT = _coded(sr_module.ABSENT)
PROBABILITY = _coded(sr_module.PROBABILITY)
NO_UNITS = _coded(sr_module.NO_UNITS)
IMAGING_PROCEDURE = _coded(sr_module.IMAGING_PROCEDURE)
QUALITATIVE_EVALUATIONS = _coded(sr_module.QUALITATIVE_EVALUATIONS)
SUMMARY = _coded(sr_module.SUMMARY)
COMMENT = _coded(sr_module.COMMENT)
BEST_ILLUSTRATION = _coded(sr_module.BEST_ILLUSTRATION)
SOURCE_OF_MEASUREMENT = _coded(sr_module.SOURCE_OF_MEASUREMENT)


# ---- the highdicom-built SR, as screener/reports/sr.py built it before (reference) ------


def _algorithm(
    result: StudyResult, settings: Settings, parameters: list[str] | None
) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=parameters or None,
        manufacturer=settings.reports.manufacturer,
    )


def _measurement_group(
    *,
    finding: hd.sr.CodedConcept,
    probability: float,
    present: bool,
    image: ImageResult,
    index: int,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    heatmap: Dataset | None,
    pmap: Dataset | None = None,
    parameters: list[str] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop = image.source.sop_instance_uid
    view = view_label(image.view, image.view_source, image.view_image)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(sop, finding.value),
            identifier=clip_lo(f"Image {index} ({view}) {finding.meaning}"),
        ),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        algorithm_id=_algorithm(result, settings, parameters),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.source.sop_class_uid,
                referenced_sop_instance_uid=sop,
            )
        ],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(float(probability), 6), unit=NO_UNITS)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=PRESENT if present else ABSENT)
        ],
    )
    if heatmap is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=BEST_ILLUSTRATION,
                referenced_sop_class_uid=heatmap.SOPClassUID,
                referenced_sop_instance_uid=heatmap.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if pmap is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=SOURCE_OF_MEASUREMENT,
                referenced_sop_class_uid=pmap.SOPClassUID,
                referenced_sop_instance_uid=pmap.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _qualitative_container(
    result: StudyResult, settings: Settings, statement: OperatingPointStatement
) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    rel = hd.sr.RelationshipTypeValues.CONTAINS
    summary = summary_text(result, statement)
    items = [hd.sr.TextContentItem(name=SUMMARY, value=summary, relationship_type=rel)]
    items += [
        hd.sr.TextContentItem(name=COMMENT, value=image_line(i, im, result), relationship_type=rel)
        for i, im in enumerate(result.images, start=1)
    ]
    if result.ignored_objects:
        items.append(
            hd.sr.TextContentItem(name=COMMENT, value=ignored_line(result), relationship_type=rel)
        )
    items.append(
        hd.sr.TextContentItem(
            name=COMMENT, value=operating_point_text(statement), relationship_type=rel
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=COMMENT, value=disclaimer_of(result, settings), relationship_type=rel
        )
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _measurement_report(
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    heatmaps: dict[str, Dataset],
    pmaps: dict[str, Dataset],
    library: list[Dataset],
    statement: OperatingPointStatement,
) -> hd.sr.MeasurementReport:
    parameters: list[str] | None = algorithm_parameters(result, statement)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(settings, result.model.ref),
        name=clip_lo(result.model.ref),
        manufacturer_name=clip_lo(settings.reports.manufacturer),
        model_name=clip_lo(result.model.name),
        serial_number=clip_lo(result.model.engine_hash) or None,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for index, image in enumerate(result.images, start=1):
        if not image.screened or image.probabilities is None:
            continue
        probs = image.probabilities
        heatmap = heatmaps.get(image.source.sop_instance_uid)
        pmap = pmaps.get(image.source.sop_instance_uid)
        common = {
            "image": image,
            "index": index,
            "result": result,
            "settings": settings,
            "uids": uids,
            "heatmap": heatmap,
            "pmap": pmap,
        }
        groups.append(
            _measurement_group(
                finding=COVID_19,
                probability=probs["covid"],
                present=bool(image.covid_positive),
                parameters=parameters,
                **common,  # type: ignore[arg-type]
            )
        )
        parameters = None
        groups.append(
            _measurement_group(
                finding=PNEUMONIA,
                probability=probs["pneumonia"],
                present=pneumonia_present(probs),
                **common,  # type: ignore[arg-type]
            )
        )
    placeholder = not groups
    if placeholder:
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.tracking_uid("", "none"), identifier="none"
                )
            )
        ]
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    root = report[0]
    if placeholder:
        root.ContentSequence = hd.sr.ContentSequence(
            [item for item in root.ContentSequence if item.name != codes.DCM.ImagingMeasurements]
        )
    root.ContentSequence.append(_qualitative_container(result, settings, statement))
    return report


def _library_entry(source: Dataset) -> Dataset:
    entry = Dataset()
    entry.SOPClassUID = source.SOPClassUID
    entry.SOPInstanceUID = source.SOPInstanceUID
    entry.Rows = source.Rows
    entry.Columns = source.Columns
    orientation = source.get("PatientOrientation")
    spacing = source.get("ImagerPixelSpacing")
    complete = (
        orientation is not None
        and not isinstance(orientation, str)
        and len(orientation) == 2
        and all(str(v) for v in orientation)
        and spacing is not None
        and len(spacing) == 2
    )
    if complete:
        entry.PatientOrientation = list(orientation)
        entry.ImagerPixelSpacing = list(spacing)
        entry.Modality = source.get("Modality", "")
    else:
        entry.Modality = ""
    return entry


def _failed(image: ImageResult) -> bool:
    return not image.screened and image.view in ("PA", "AP", "UNKNOWN")


def highdicom_sr(
    result: StudyResult,
    sources: list[Dataset],
    heatmaps: dict[str, Dataset],
    settings: Settings,
    uids: OutputUids,
    *,
    created_at: datetime,
    predecessors: list[PredecessorRef] | None = None,
    pmaps: dict[str, Dataset] | None = None,
    statement: OperatingPointStatement | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR as highdicom's ComprehensiveSR built it (the reference for ``build_sr``)."""
    if not sources or "PatientID" not in sources[0]:
        raise ValueError("an SR needs at least one readable source instance")
    pmaps = pmaps or {}
    statement = statement or statement_for(result.threshold, result.model, settings)
    library = [_library_entry(s) for s in sources if "Rows" in s and "Columns" in s]
    content = _measurement_report(result, settings, uids, heatmaps, pmaps, library, statement)
    previous = [
        p.as_dataset() for p in (predecessors or []) if p.sop_instance_uid != uids.sr_instance
    ]
    complete = result.status == "no_frontal_image" or (
        result.status == "screened" and not any(_failed(im) for im in result.images)
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[*sources, *heatmaps.values(), *pmaps.values()],
        content=content,
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=settings.reports.manufacturer,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        previous_versions=previous or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(result, settings)],
        series_description=SERIES_DESCRIPTION,
        specific_character_set=output_character_set(
            sources[0],
            [
                summary_text(result, statement),
                disclaimer_of(result, settings),
                settings.reports.manufacturer,
                settings.reports.institution_name,
                operating_point_text(statement),
            ],
        ),
        content_date=created_at.date(),
        content_time=created_at.time(),
        **common_attributes(result, settings),  # type: ignore[arg-type]
    )
    sr.ManufacturerModelName = PRODUCT_NAME
    return sr


# ---- the inputs, as write_study_outputs gathers them ------------------------------------


@dataclasses.dataclass
class SrInputs:
    """What ``build_sr`` is called with for one study (as the writer gathers it)."""

    result: StudyResult
    sources: list[Dataset]
    heatmaps: dict[str, Dataset]
    pmaps: dict[str, Dataset]
    settings: Settings
    uids: OutputUids
    statement: OperatingPointStatement
    created_at: datetime
    predecessors: list[PredecessorRef]

    def new(self) -> Dataset:
        """The SR as ``build_sr`` builds it."""
        return build_sr(
            self.result,
            self.sources,
            self.heatmaps,
            self.settings,
            self.uids,
            created_at=self.created_at,
            predecessors=self.predecessors,
            pmaps=self.pmaps,
            statement=self.statement,
        )

    def old(self) -> Dataset:
        """The SR as highdicom's ``ComprehensiveSR`` built it."""
        return highdicom_sr(
            self.result,
            self.sources,
            self.heatmaps,
            self.settings,
            self.uids,
            created_at=self.created_at,
            predecessors=self.predecessors,
            pmaps=self.pmaps,
            statement=self.statement,
        )


def sr_inputs(
    result: StudyResult,
    settings: Settings,
    predecessors: list[PredecessorRef] | None = None,
    headers: dict[str, Dataset] | None = None,
) -> SrInputs:
    """Source headers, heatmap SCs (and parametric maps when configured) for ``result``,
    gathered by the writer's own ``build_image_objects``; ``headers`` replaces read ones."""
    objects = build_image_objects(result, settings, headers)
    return SrInputs(
        result,
        objects.sources,
        objects.heatmaps,
        objects.pmaps,
        settings,
        objects.uids,
        objects.statement,
        objects.created_at,
        predecessors or [],
    )


# ---- the comparison ---------------------------------------------------------------------

HIGHDICOM_MANUFACTURER = "Highdicom open-source contributors"


def _clock_values(ds: Dataset) -> list[datetime]:
    """The values taken from the clock, parsed; each must be a valid DA/TM/DT."""
    date = datetime.strptime(str(ds.InstanceCreationDate), "%Y%m%d")
    time = datetime.strptime(str(ds.InstanceCreationTime), "%H%M%S.%f")
    created = date.replace(hour=time.hour, minute=time.minute, second=time.second)
    (highdicom,) = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.Manufacturer == HIGHDICOM_MANUFACTURER
    ]
    contributed = DT(str(highdicom.ContributionDateTime))
    return [created, contributed.replace(tzinfo=None, microsecond=0)]


def _freeze_clock(ds: Dataset) -> None:
    ds.InstanceCreationDate = "20000101"
    ds.InstanceCreationTime = "000000.000000"
    for item in ds.ContributingEquipmentSequence:
        if item.Manufacturer == HIGHDICOM_MANUFACTURER:
            item.ContributionDateTime = "20000101000000.000000"


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def assert_same_sr(inputs: SrInputs) -> Dataset:
    """Build both SRs from the same inputs; equal but for the clock. Returns the new one."""
    old = inputs.old()
    new = inputs.new()
    for when in (*_clock_values(old), *_clock_values(new)):
        assert abs(when - datetime.now()) < timedelta(minutes=1)
    _freeze_clock(old)
    _freeze_clock(new)
    # first as written: the content still the raw elements build_sr encoded, not yet
    # decoded by a reader (to_json_dict below decodes them; the bytes must not change)
    assert _encoded(new) == _encoded(old)
    assert new.to_json_dict() == old.to_json_dict()
    assert new.file_meta.to_json_dict() == old.file_meta.to_json_dict()
    assert _encoded(new) == _encoded(old)
    # as a C-STORE encodes it when the peer accepts only implicit VR (pynetdicom's encoder)
    implicit = encode(new, True, True)
    assert implicit is not None and implicit == encode(old, True, True)
    return new


@pytest.fixture
def settings_(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def test_one_screened_image(tmp_path: Path, settings_: Settings) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.8])
    new = assert_same_sr(sr_inputs(result, settings_))
    path = tmp_path / "sr.dcm"
    new.save_as(path, enforce_file_format=True)
    assert_valid(path)


def test_several_images_one_lateral_one_undecodable(tmp_path: Path, settings_: Settings) -> None:
    result, _ = make_result(
        tmp_path, ["PA", "AP", "LATERAL", "PA"], scores=[0.1, 0.6, 0.0, 0.3], undecodable={3}
    )
    assert len(result.screened_images) == 2
    assert_same_sr(sr_inputs(result, settings_))


def test_unreadable_source_is_referenced_not_in_the_library(
    tmp_path: Path, settings_: Settings
) -> None:
    result, paths = make_result(tmp_path, ["PA", "LATERAL"], scores=[0.7, 0.0])
    paths[1].unlink()  # its header cannot be read: a UID-only stand-in, no library entry
    inputs = sr_inputs(result, settings_)
    assert "Rows" not in inputs.sources[1]
    assert_same_sr(inputs)


@pytest.mark.parametrize("views", [["LATERAL"], ["PA"]], ids=["no_frontal", "failed"])
def test_no_measurement_group(tmp_path: Path, settings_: Settings, views: list[str | None]) -> None:
    result, _ = make_result(tmp_path, views, undecodable={0} if views == ["PA"] else set())
    assert not result.screened_images
    assert_same_sr(sr_inputs(result, settings_))


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrI2.dcm", "chrX2.dcm", "chrFren.dcm"])
def test_patient_names_in_other_character_sets(
    tmp_path: Path, settings_: Settings, name: str
) -> None:
    (charset_file,) = [
        p for p in pydicom.data.get_charset_files("chr*.dcm") if Path(p).name == name
    ]
    chars = pydicom.dcmread(charset_file, stop_before_pixels=True, force=True)
    result, paths = make_result(tmp_path, ["PA"], scores=[0.5])
    ds = pydicom.dcmread(paths[0])
    ds.SpecificCharacterSet = chars.SpecificCharacterSet
    ds.PatientName = chars.PatientName
    ds.save_as(paths[0], enforce_file_format=True)
    new = assert_same_sr(sr_inputs(result, settings_))
    assert str(new.PatientName) == str(chars.PatientName)


def test_everything_optional_at_once(tmp_path: Path, settings_: Settings) -> None:
    """Parametric maps, predecessors, refused objects, an institution, no engine hash, a
    non-Latin disclaimer (UTF-8), projection descriptors, and CR and DX in one library."""
    settings_.reports.parametric_map = True
    settings_.reports.institution_name = "Hôpital du Test"
    settings_.disclaimer = "研究用 - not for diagnostic use"
    model = dataclasses.replace(MODEL, engine_hash="")
    result, _ = make_result(tmp_path, ["PA", "AP", "PA"], scores=[0.9, 0.2, 0.5], model=model)
    headers: dict[str, Dataset] = {}
    for index, image in enumerate(result.images):
        header = read_source_header(image.source)
        assert header is not None
        header.PatientOrientation = ["L", "F"]
        if index == 1:  # a DX image between two CR ones: two library groups
            header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
            header.Modality = "DX"
            image.source = dataclasses.replace(image.source, sop_class_uid=header.SOPClassUID)
        headers[image.source.sop_instance_uid] = header
    refused = SourceImageRef(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67",
        series_instance_uid="1.2.3",
        study_instance_uid=result.study_instance_uid,
    )
    result.ignored_objects.append(
        ImageResult(source=refused, view="UNKNOWN", refused=True, skip_reason="dose report")
    )
    uids = OutputUids.for_result(result)
    predecessors = [
        PredecessorRef(result.study_instance_uid, "1.2.9", "1.2.9.1", SR_CLASS),
        # the SR itself (a rescreen with the same UIDs): never its own predecessor
        PredecessorRef(result.study_instance_uid, uids.sr_series, uids.sr_instance, SR_CLASS),
    ]
    inputs = sr_inputs(result, settings_, predecessors, headers)
    assert len(inputs.pmaps) == 3
    new = assert_same_sr(inputs)
    assert new.SpecificCharacterSet == "ISO_IR 192"
    assert len(new.PredecessorDocumentsSequence) == 1
    # the paths this test is for were taken: two library groups (CR: 2 images, DX: 1),
    # projection descriptors, an acquisition equipment item
    (library,) = [
        i for i in content_items(new.ContentSequence) if concept_meaning(i) == "Image Library"
    ]
    assert [len(group.ContentSequence) for group in library.ContentSequence] == [2, 1]
    meanings = {concept_meaning(i) for i in content_items(library.ContentSequence)}
    assert {"Patient Orientation Row", "Horizontal Pixel Spacing"} <= meanings
    purposes = [
        i.PurposeOfReferenceCodeSequence[0].CodeMeaning for i in new.ContributingEquipmentSequence
    ]
    assert purposes == ["Acquisition Equipment", "Processing Equipment", "Processing Equipment"]
    path = tmp_path / "sr.dcm"
    new.save_as(path, enforce_file_format=True)
    assert_valid(path)
