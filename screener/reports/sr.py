"""The screening result as a DICOM Structured Report (TID 1500 in a Comprehensive SR).

Why TID 1500 in a *Comprehensive* SR (1.2.840.10008.5.1.4.1.1.88.33): it is the SR that
the widest range of viewers and PACS render, and it is what the IHE AI Results profile
builds on; nothing here needs 3D coordinates. Content tree (see ``docs`` in the issue note)::

    Imaging Measurement Report (TID 1500)
      Language, Observer Type = Device (TID 1004: Device Observer UID unique per installation
        and model, model, manufacturer, engine hash as serial)
      Procedure reported = Imaging procedure
      Image Library (TID 1600): one entry per source image (TID 1601/1602 descriptors)
      Imaging Measurements
        per screened image, per finding (COVID-19, pneumonia): Measurement Group (TID 1501)
          Tracking identifier / UID, Finding (DCM 121071) = the disease (SCT),
          Finding site = Lung (SCT 39607008), Algorithm identification (TID 4019: name and
          version; the algorithm parameters - threshold, its version and origin, operating
          point, what the probabilities are, scheme, engine, pneumonia rule - are stated
          once, in the first group, since they are the same for every group),
          Source image = the radiograph, Best illustration of finding = the heatmap SC,
          Source of Measurement (DCM 121112) = the parametric map of the CAM, when
          ``reports.parametric_map`` writes one,
          Probability (DCM 122157, UCUM "1") = the model's probability,
          <disease> = Present (SCT 52101004) / Absent (SCT 272519000)
      Qualitative Evaluations (UMLS C0034375, as TID 1500 row 12): Summary (plain text: the
        call, the highest probability and the operating point: threshold with its validation
        sensitivity and specificity), one Comment per image (view, call, or why it was not
        screened), one Comment on objects the screenability gate refused, one on the
        threshold's origin and what the probabilities are, the disclaimer

Coding choice: the probability uses DCM 122157 "Probability" (a value in [0, 1] with UCUM
unit ``1``), not DCM 111012 "Certainty of Finding", which CAD SR uses for a confidence
scale rather than a class probability. COVID-19 is *Present* when its probability reaches
the operating threshold; pneumonia, which has no calibrated threshold, is *Present* when it
is the most probable class (said in the algorithm parameters).
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from screener.identity import PRODUCT_NAME
from screener.imaging.views import view_caption, view_label
from screener.reports.common import (
    PNEUMONIA_RULE,
    SR_SERIES_NUMBER,
    PredecessorRef,
    clip_lo,
    common_attributes,
    device_observer_uid,
    disclaimer_of,
    output_character_set,
    pneumonia_present,
    processing_equipment,
)
from screener.reports.operating_point import OperatingPointStatement, statement_for
from screener.reports.output_uids import OutputUids
from screener.results import ImageResult, StudyResult
from screener.settings import Settings

COVID_19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SUMMARY = hd.sr.CodedConcept("121111", "DCM", "Summary")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
BEST_ILLUSTRATION = hd.sr.CodedConcept("121080", "DCM", "Best illustration of finding")
SOURCE_OF_MEASUREMENT = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")

SERIES_DESCRIPTION = "AI screening report (not for diagnosis)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def operating_point_text(statement: OperatingPointStatement) -> str:
    """The Comment on the threshold: operating point, origin, how it was measured and
    what the probabilities are."""
    text = f"{statement.headline()}; {statement.origin()}"
    if statement.detail:
        text += f"; measured: {statement.detail}"
    if statement.calibration:
        text += f". Probabilities: {statement.calibration}"
    return text


def algorithm_parameters(result: StudyResult, statement: OperatingPointStatement) -> list[str]:
    """TID 4019 Algorithm Parameters, each once per document (first measurement group)."""
    t = result.threshold
    target = "" if t.target_sensitivity is None else f"{t.target_sensitivity:g}"
    return [
        f"covid_threshold={t.value:.6f}",
        f"threshold_version={t.version}",
        f"threshold_origin={statement.origin()}",
        f"target_sensitivity={target}",
        f"operating_point={statement.headline()}",
        f"operating_point_measured={statement.detail or 'not measured'}",
        f"probabilities={statement.calibration or 'as output by the model'}",
        f"preprocessing_scheme={result.model.scheme}",
        f"engine={result.model.engine}",
        f"pneumonia_rule={PNEUMONIA_RULE}",
    ]


def _algorithm(
    result: StudyResult, settings: Settings, parameters: list[str] | None
) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=parameters or None,
        manufacturer=settings.reports.manufacturer,
    )


def image_line(index: int, image: ImageResult, result: StudyResult) -> str:
    """One human-readable line per source image, screened or not."""
    view = view_caption(image.view, image.view_source, image.view_image)
    head = f"Image {index} ({view}) SOP {image.source.sop_instance_uid}"
    if not image.screened:
        return f"{head}: NOT SCREENED - {image.skip_reason or 'no reason given'}"
    call = "POSITIVE" if image.covid_positive else "NEGATIVE"
    probs = image.probabilities or {}
    pneumonia = "PRESENT" if probs and pneumonia_present(probs) else "ABSENT"
    return (
        f"{head}: COVID-19 {call}, probability {_fmt(image.covid_score)} "
        f"(threshold {result.threshold.value:.4f}); pneumonia {pneumonia}, probability "
        f"{_fmt(probs.get('pneumonia'))}; normal {_fmt(probs.get('normal'))}"
    )


def ignored_line(result: StudyResult) -> str:
    """One line on the objects the screenability gate refused (not study images)."""
    counts: dict[str, int] = {}
    for im in result.ignored_objects:
        key = im.skip_reason or "no reason given"
        counts[key] = counts.get(key, 0) + 1
    listed = "; ".join(f"{n} x {why}" for why, n in sorted(counts.items()))
    return f"{len(result.ignored_objects)} other object(s) in the study not screened: {listed}"


def summary_text(result: StudyResult, statement: OperatingPointStatement | None = None) -> str:
    """The plain-text summary a viewer without SR tree support still shows; a screened
    study's states the operating point (threshold, validation sensitivity/specificity)."""
    model = f"model {result.model.ref}"
    if result.status == "screened" and result.study_covid_score is not None:
        statement = statement or statement_for(result.threshold, result.model)
        call = "POSITIVE" if result.study_covid_positive else "NEGATIVE"
        n = len(result.screened_images)
        return (
            f"AI screening for COVID-19: {call}. Highest COVID-19 probability "
            f"{result.study_covid_score:.3f} over {n} screened frontal image(s); "
            f"{statement.headline()}; {model}."
        )
    reason = (result.reason or "").strip().rstrip(".")
    if result.status == "no_frontal_image":
        detail = "" if not reason or "no frontal" in reason else f" Reason: {reason}."
        return (
            "AI screening not performed: no frontal (AP/PA) chest image was screened."
            f"{detail} {len(result.images)} image(s) in the study ({model})."
        )
    detail = f" Reason: {reason}." if reason else ""
    return f"AI screening failed: no image could be screened.{detail} ({model})."


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


def build_measurement_report(
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    heatmaps: dict[str, Dataset],
    pmaps: dict[str, Dataset] | None = None,
    library: list[Dataset] | None = None,
    statement: OperatingPointStatement | None = None,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree; ``heatmaps`` and ``pmaps`` map source SOP Instance UID ->
    SC / parametric map dataset; ``library``: full source headers for the Image Library."""
    pmaps = pmaps or {}
    statement = statement or statement_for(result.threshold, result.model, settings)
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
        groups.append(
            _measurement_group(
                finding=COVID_19,
                probability=probs["covid"],
                present=bool(image.covid_positive),
                image=image,
                index=index,
                result=result,
                settings=settings,
                uids=uids,
                heatmap=heatmap,
                pmap=pmap,
                parameters=parameters,
            )
        )
        parameters = None  # stated once: the first group holds them
        groups.append(
            _measurement_group(
                finding=PNEUMONIA,
                probability=probs["pneumonia"],
                present=pneumonia_present(probs),
                image=image,
                index=index,
                result=result,
                settings=settings,
                uids=uids,
                heatmap=heatmap,
                pmap=pmap,
            )
        )
    placeholder = not groups
    if placeholder:
        # highdicom insists on one measurement group; TID 1500 only needs one of its
        # measurement/evaluation containers, so the empty group is removed again below.
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


def build_sr(
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
    """The SR document; ``sources[0]`` must be a full source header (patient/study modules)."""
    if not sources or "PatientID" not in sources[0]:  # see read_source_header
        raise ValueError("an SR needs at least one readable source instance")
    pmaps = pmaps or {}
    statement = statement or statement_for(result.threshold, result.model, settings)
    library = [library_entry(s) for s in sources if "Rows" in s and "Columns" in s]
    content = build_measurement_report(result, settings, uids, heatmaps, pmaps, library, statement)
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
        is_final=False,  # research output, never the definitive report
        is_verified=False,  # nobody has verified it: UNVERIFIED
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


def library_entry(source: Dataset) -> Dataset:
    """What highdicom's Image Library (TID 1601/1602) reads of a source image.

    The projection radiography descriptors (TID 1603: patient orientation, imager pixel
    spacing) are written only when the source states both; highdicom decides on Modality,
    so it is left empty otherwise (the coded modality comes from the SOP class anyway).
    """
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
    """An image that should have been screened but could not be (not a view exclusion)."""
    return not image.screened and image.view in ("PA", "AP", "UNKNOWN")
