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

The tree is encoded here, item by item, into the bytes pydicom writes for it
(``sr_document.ItemEncoder``, in the document's character set, decided first) and the
document around it is a plain pydicom dataset: element for element and byte for byte what
highdicom's templates and ``ComprehensiveSR`` made, at about 1/20 of the CPU with the
encoding (``tests/unit/test_sr_equivalence.py``, ``tests/unit/test_sr_encoding.py``,
``benchmarks/reports.py``).
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

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
from screener.reports.sr_document import (
    CONTAINS,
    HAS_ACQ_CONTEXT,
    HAS_CONCEPT_MOD,
    HAS_OBS_CONTEXT,
    Concept,
    Element,
    Equipment,
    ItemEncoder,
    coded_modality,
    comprehensive_sr,
    document_encoder,
)
from screener.results import ImageResult, StudyResult
from screener.settings import Settings

COVID_19 = Concept("840539006", "SCT", "COVID-19")
PNEUMONIA = Concept("233604007", "SCT", "Pneumonia")
LUNG = Concept("39607008", "SCT", "Lung")
PRESENT = Concept("52101004", "SCT", "Present")
ABSENT = Concept("272519000", "SCT", "Absent")
PROBABILITY = Concept("122157", "DCM", "Probability")
NO_UNITS = Concept("1", "UCUM", "no units")
IMAGING_PROCEDURE = Concept("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Concept("C0034375", "UMLS", "Qualitative Evaluations")
SUMMARY = Concept("121111", "DCM", "Summary")
COMMENT = Concept("121106", "DCM", "Comment")
BEST_ILLUSTRATION = Concept("121080", "DCM", "Best illustration of finding")
SOURCE_OF_MEASUREMENT = Concept("121112", "DCM", "Source of Measurement")

# The concepts of the templates (TID 1500, 1501, 1600-1603, 1002/1004, 4019, 4108), named
# as highdicom names them
IMAGING_MEASUREMENT_REPORT = Concept.of(codes.cid7021.ImagingMeasurementReport)
LANGUAGE = Concept("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH_US = Concept("en-US", "RFC5646", "English (United States)")
OBSERVER_TYPE = Concept("121005", "DCM", "Observer Type")
DEVICE = Concept.of(codes.cid270.Device)
DEVICE_OBSERVER_UID = Concept("121012", "DCM", "Device Observer UID")
DEVICE_OBSERVER_NAME = Concept("121013", "DCM", "Device Observer Name")
DEVICE_OBSERVER_MANUFACTURER = Concept("121014", "DCM", "Device Observer Manufacturer")
DEVICE_OBSERVER_MODEL = Concept("121015", "DCM", "Device Observer Model Name")
DEVICE_OBSERVER_SERIAL = Concept("121016", "DCM", "Device Observer Serial Number")
PROCEDURE_REPORTED = Concept.of(codes.DCM.ProcedureReported)
IMAGE_LIBRARY = Concept.of(codes.DCM.ImageLibrary)
IMAGE_LIBRARY_GROUP = Concept.of(codes.DCM.ImageLibraryGroup)
SOURCE = Concept("260753009", "SCT", "Source")
MODALITY = Concept.of(codes.DCM.Modality)
PIXEL_DATA_ROWS = Concept.of(codes.DCM.PixelDataRows)
PIXEL_DATA_COLUMNS = Concept.of(codes.DCM.PixelDataColumns)
PIXELS = Concept("{pixels}", "UCUM", "Pixels")
PATIENT_ORIENTATION_ROW = Concept.of(codes.DCM.PatientOrientationRow)
PATIENT_ORIENTATION_COLUMN = Concept.of(codes.DCM.PatientOrientationColumn)
HORIZONTAL_PIXEL_SPACING = Concept.of(codes.DCM.HorizontalPixelSpacing)
VERTICAL_PIXEL_SPACING = Concept.of(codes.DCM.VerticalPixelSpacing)
MILLIMETER = Concept.of(codes.UCUM.Millimeter)
IMAGING_MEASUREMENTS = Concept.of(codes.DCM.ImagingMeasurements)
MEASUREMENT_GROUP = Concept("125007", "DCM", "Measurement Group")
TRACKING_IDENTIFIER = Concept("112039", "DCM", "Tracking Identifier")
TRACKING_UID = Concept("112040", "DCM", "Tracking Unique Identifier")
FINDING = Concept("121071", "DCM", "Finding")
FINDING_SITE = Concept("363698007", "SCT", "Finding Site")
ALGORITHM_NAME = Concept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Concept("111003", "DCM", "Algorithm Version")
ALGORITHM_MANUFACTURER = Concept("122405", "DCM", "Algorithm Manufacturer")
ALGORITHM_PARAMETERS = Concept("111002", "DCM", "Algorithm Parameters")

# Modalities whose Image Library entries carry the projection radiography descriptors
# (TID 1603), as highdicom decides
PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})

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


def _algorithm(
    enc: ItemEncoder, result: StudyResult, settings: Settings, parameters: list[str] | None
) -> list[bytes]:
    """TID 4019 Algorithm Identification: name, version, manufacturer, parameters."""
    items = [
        enc.text_item(ALGORITHM_NAME, result.model.name, HAS_CONCEPT_MOD),
        enc.text_item(ALGORITHM_VERSION, result.model.version, HAS_CONCEPT_MOD),
        enc.text_item(ALGORITHM_MANUFACTURER, settings.reports.manufacturer, HAS_CONCEPT_MOD),
    ]
    items += [enc.text_item(ALGORITHM_PARAMETERS, p, HAS_CONCEPT_MOD) for p in parameters or []]
    return items


def _measurement_group(
    enc: ItemEncoder,
    *,
    finding: Concept,
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
) -> bytes:
    """One TID 1501 Measurement Group: one finding of one image."""
    sop = image.source.sop_instance_uid
    view = view_label(image.view, image.view_source, image.view_image)
    identifier = clip_lo(f"Image {index} ({view}) {finding.meaning}")
    items = [
        enc.text_item(TRACKING_IDENTIFIER, identifier, HAS_OBS_CONTEXT),
        enc.uidref_item(TRACKING_UID, uids.tracking_uid(sop, finding.value), HAS_OBS_CONTEXT),
        enc.code_item(FINDING, finding, CONTAINS),
        enc.code_item(FINDING_SITE, LUNG, HAS_CONCEPT_MOD),
        *_algorithm(enc, result, settings, parameters),
        enc.num_item(PROBABILITY, round(float(probability), 6), NO_UNITS, CONTAINS),
        enc.code_item(finding, PRESENT if present else ABSENT, CONTAINS),
        enc.image_item(SOURCE_OF_MEASUREMENT, image.source.sop_class_uid, sop, CONTAINS),
    ]
    if heatmap is not None:
        items.append(
            enc.image_item(BEST_ILLUSTRATION, heatmap.SOPClassUID, heatmap.SOPInstanceUID, CONTAINS)
        )
    if pmap is not None:
        items.append(
            enc.image_item(SOURCE_OF_MEASUREMENT, pmap.SOPClassUID, pmap.SOPInstanceUID, CONTAINS)
        )
    return enc.container(MEASUREMENT_GROUP, items, template_id="1501")


def _qualitative_container(
    enc: ItemEncoder, result: StudyResult, settings: Settings, statement: OperatingPointStatement
) -> bytes:
    """The plain-text evaluations: summary, one comment per image, the operating point and
    the disclaimer."""
    items = [enc.text_item(SUMMARY, summary_text(result, statement), CONTAINS)]
    items += [
        enc.text_item(COMMENT, image_line(i, im, result), CONTAINS)
        for i, im in enumerate(result.images, start=1)
    ]
    if result.ignored_objects:
        items.append(enc.text_item(COMMENT, ignored_line(result), CONTAINS))
    items.append(enc.text_item(COMMENT, operating_point_text(statement), CONTAINS))
    items.append(enc.text_item(COMMENT, disclaimer_of(result, settings), CONTAINS))
    return enc.container(QUALITATIVE_EVALUATIONS, items)


def _observation_context(enc: ItemEncoder, result: StudyResult, settings: Settings) -> list[bytes]:
    """TID 1002/1004: the observer is a device, the model at this installation."""
    items = [
        enc.code_item(OBSERVER_TYPE, DEVICE, HAS_OBS_CONTEXT),
        enc.uidref_item(
            DEVICE_OBSERVER_UID,
            device_observer_uid(settings, result.model.ref),
            HAS_OBS_CONTEXT,
        ),
        enc.text_item(DEVICE_OBSERVER_NAME, clip_lo(result.model.ref), HAS_OBS_CONTEXT),
        enc.text_item(
            DEVICE_OBSERVER_MANUFACTURER, clip_lo(settings.reports.manufacturer), HAS_OBS_CONTEXT
        ),
        enc.text_item(DEVICE_OBSERVER_MODEL, clip_lo(result.model.name), HAS_OBS_CONTEXT),
    ]
    serial = clip_lo(result.model.engine_hash)
    if serial:
        items.append(enc.text_item(DEVICE_OBSERVER_SERIAL, serial, HAS_OBS_CONTEXT))
    return items


def library_descriptors(enc: ItemEncoder, source: Dataset, modality: Concept) -> list[bytes]:
    """TID 1602 Image Library Entry Descriptors of one source image.

    The projection radiography descriptors (TID 1603: patient orientation, imager pixel
    spacing) are written only when the source states both and is a projection modality;
    the coded modality comes from the SOP class. Other modalities get none (highdicom
    wanted cross-sectional ones, pixel spacing and position, for CT/MR/PT, and failed).
    """
    items = [
        enc.code_item(MODALITY, modality, HAS_ACQ_CONTEXT),
        enc.num_item(PIXEL_DATA_ROWS, source.Rows, PIXELS, HAS_ACQ_CONTEXT),
        enc.num_item(PIXEL_DATA_COLUMNS, source.Columns, PIXELS, HAS_ACQ_CONTEXT),
    ]
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
    if complete and source.get("Modality", "") in PROJECTION_MODALITIES:
        items += [
            enc.text_item(PATIENT_ORIENTATION_ROW, orientation[0], HAS_ACQ_CONTEXT),
            enc.text_item(PATIENT_ORIENTATION_COLUMN, orientation[1], HAS_ACQ_CONTEXT),
            enc.num_item(HORIZONTAL_PIXEL_SPACING, spacing[1], MILLIMETER, HAS_ACQ_CONTEXT),
            enc.num_item(VERTICAL_PIXEL_SPACING, spacing[0], MILLIMETER, HAS_ACQ_CONTEXT),
        ]
    return items


def image_library(enc: ItemEncoder, sources: list[Dataset]) -> bytes | None:
    """TID 1600 Image Library: the source images (those with a readable header), grouped by
    modality; None when there is none."""
    groups: dict[Concept, list[bytes]] = {}
    for source in sources:
        if "Rows" not in source or "Columns" not in source:
            continue
        modality = coded_modality(source.SOPClassUID)
        entry = enc.image_item(
            SOURCE,
            source.SOPClassUID,
            source.SOPInstanceUID,
            CONTAINS,
            content=library_descriptors(enc, source, modality),
        )
        groups.setdefault(modality, []).append(entry)
    if not groups:
        return None
    return enc.container(
        IMAGE_LIBRARY, [enc.container(IMAGE_LIBRARY_GROUP, entries) for entries in groups.values()]
    )


def build_measurement_report(
    enc: ItemEncoder,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    heatmaps: dict[str, Dataset],
    pmaps: dict[str, Dataset] | None = None,
    sources: list[Dataset] | None = None,
    statement: OperatingPointStatement | None = None,
) -> list[Element]:
    """The TID 1500 content tree: the elements of its root CONTAINER item, encoded by
    ``enc``; ``heatmaps`` and ``pmaps`` map source SOP Instance UID -> SC / parametric map
    dataset; ``sources``: source headers for the Image Library."""
    pmaps = pmaps or {}
    statement = statement or statement_for(result.threshold, result.model, settings)
    parameters: list[str] | None = algorithm_parameters(result, statement)
    groups: list[bytes] = []
    for index, image in enumerate(result.images, start=1):
        if not image.screened or image.probabilities is None:
            continue
        probs = image.probabilities
        heatmap = heatmaps.get(image.source.sop_instance_uid)
        pmap = pmaps.get(image.source.sop_instance_uid)
        for finding, probability, present in (
            (COVID_19, probs["covid"], bool(image.covid_positive)),
            (PNEUMONIA, probs["pneumonia"], pneumonia_present(probs)),
        ):
            groups.append(
                _measurement_group(
                    enc,
                    finding=finding,
                    probability=probability,
                    present=present,
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
    items = [
        enc.code_item(LANGUAGE, ENGLISH_US, HAS_CONCEPT_MOD),
        *_observation_context(enc, result, settings),
        enc.code_item(PROCEDURE_REPORTED, IMAGING_PROCEDURE, HAS_CONCEPT_MOD),
    ]
    library = image_library(enc, sources or [])
    if library is not None:
        items.append(library)
    if groups:  # TID 1500 needs one of its measurement/evaluation containers, not this one
        items.append(enc.container(IMAGING_MEASUREMENTS, groups))
    items.append(_qualitative_container(enc, result, settings, statement))
    return enc.container_elements(
        IMAGING_MEASUREMENT_REPORT, items, relationship=None, template_id="1500"
    )


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
) -> Dataset:
    """The SR document; ``sources[0]`` must be a full source header (patient/study modules),
    and every screened image must be among ``sources`` (the measurements reference it)."""
    if not sources or "PatientID" not in sources[0]:  # see read_source_header
        raise ValueError("an SR needs at least one readable source instance")
    known = {s.SOPInstanceUID for s in sources}
    missing = [
        im.source.sop_instance_uid
        for im in result.images
        if im.screened and im.probabilities is not None and im.source.sop_instance_uid not in known
    ]
    if missing:
        raise ValueError(f"no source instance for the screened image(s) {', '.join(missing)}")
    pmaps = pmaps or {}
    statement = statement or statement_for(result.threshold, result.model, settings)
    charset = output_character_set(
        sources[0],
        [
            summary_text(result, statement),
            disclaimer_of(result, settings),
            settings.reports.manufacturer,
            settings.reports.institution_name,
            operating_point_text(statement),
        ],
    )
    enc = document_encoder(charset)
    root = build_measurement_report(
        enc, result, settings, uids, heatmaps, pmaps, sources, statement
    )
    previous = [
        p.as_dataset() for p in (predecessors or []) if p.sop_instance_uid != uids.sr_instance
    ]
    complete = result.status == "no_frontal_image" or (
        result.status == "screened" and not any(_failed(im) for im in result.images)
    )
    equipment = Equipment(
        manufacturer=settings.reports.manufacturer,
        contributing=[processing_equipment(result, settings)],
        **common_attributes(result, settings),  # type: ignore[arg-type]
    )
    return comprehensive_sr(
        root=root,
        encoder=enc,
        evidence=[*sources, *heatmaps.values(), *pmaps.values()],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        equipment=equipment,
        is_complete=complete,  # is_final and is_verified: never (research output)
        previous_versions=previous,
        specific_character_set=charset,
        content_datetime=created_at,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def _failed(image: ImageResult) -> bool:
    """An image that should have been screened but could not be (not a view exclusion)."""
    return not image.screened and image.view in ("PA", "AP", "UNKNOWN")
