"""SR content items and the Comprehensive SR document around them, as plain pydicom datasets.

Why not highdicom's SR classes: ``ComprehensiveSR.__init__`` deep-copies the whole content
tree, re-parses the copy into typed items and searches the tree three times (referenced
images, composites, SCOORD3D), and the typed templates build every coded concept through
validating setters: about 33 ms of CPU for a one-image study, against ~4.5 ms for the same
elements built here (``benchmarks/reports.py``, table 3). The output does not change: the
element-for-element comparison with the highdicom-built document is
``tests/unit/test_sr_equivalence.py``. Coded concepts are still checked by highdicom
(:class:`Concept` builds each one through ``hd.sr.CodedConcept``, once, at import).

What the document level copies from highdicom's ``_SR``/``SOPClass`` constructors, so that
a later highdicom release changing them shows up in that test rather than silently: the
file meta (highdicom's implementation UID and version name), the Patient and Study IE
modules of the first source's IOD, the contributing equipment (the source's acquisition
equipment, ours, highdicom's), the evidence grouped by study and series.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from typing import Final

import highdicom as hd
from highdicom._standard_utils import (
    does_iod_have_pixel_data,
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from highdicom.enum import SpecificCharacterSetValues
from highdicom.sr.templates import _get_coded_modality
from highdicom.version import __version__ as HIGHDICOM_VERSION
from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ComprehensiveSRStorage
from pydicom.valuerep import DA, DS, TM

# Relationship types (PS3.3 C.17.3.2.4), spelled as highdicom's enum spells them
CONTAINS: Final = hd.sr.RelationshipTypeValues.CONTAINS.value
HAS_CONCEPT_MOD: Final = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD.value
HAS_OBS_CONTEXT: Final = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT.value
HAS_ACQ_CONTEXT: Final = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT.value

_VALUE_TYPE = Tag(0x0040A040)
_CONCEPT_NAME = Tag(0x0040A043)
_CONCEPT_CODE = Tag(0x0040A168)
_RELATIONSHIP = Tag(0x0040A010)
_TEXT_VALUE = Tag(0x0040A160)
_UID = Tag(0x0040A124)
_CONTINUITY = Tag(0x0040A050)
_TEMPLATE_SEQ = Tag(0x0040A504)
_MAPPING_RESOURCE = Tag(0x00080105)
_TEMPLATE_ID = Tag(0x0040DB00)
_CONTENT_SEQ = Tag(0x0040A730)
_MEASURED_VALUE = Tag(0x0040A300)
_NUMERIC_VALUE = Tag(0x0040A30A)
_FLOAT_VALUE = Tag(0x0040A161)
_UNITS = Tag(0x004008EA)
_REF_SOP_SEQ = Tag(0x00081199)
_REF_SOP_CLASS = Tag(0x00081150)
_REF_SOP_INSTANCE = Tag(0x00081155)

_ACQUISITION_EQUIPMENT: Final = codes.DCM.AcquisitionEquipment

# highdicom's own file meta identity (base.SOPClass), kept so the output stays the same
IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.9.7433.1.1"
IMPLEMENTATION_VERSION_NAME: Final = f"highdicom{HIGHDICOM_VERSION}"


def new_item() -> Dataset:
    """A new sequence item, declared as already in the output encoding (explicit VR little
    endian; its character set the one it inherits).

    Why: for a dataset that was not read from a file, pydicom's writer first runs its
    ambiguous-VR pass over the item's whole subtree, at every level of the tree again:
    ~20% of the SR's encoding time. Items made here hold neither ambiguous VRs (US/SS,
    OB/OW) nor raw elements, so there is nothing for it to do; written with another
    transfer syntax (say implicit VR for a C-STORE), they still get the full pass.
    """
    ds = Dataset()
    ds.set_original_encoding(False, True, default_encoding)
    return ds


@dataclass(frozen=True)
class Concept:
    """A coded concept, checked once by highdicom's ``CodedConcept`` (meaning length, long
    and URN code values) and kept as the elements of its code sequence item."""

    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str | None = None
    elements: tuple[tuple[BaseTag, str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        coded = hd.sr.CodedConcept(
            self.value, self.scheme_designator, self.meaning, self.scheme_version
        )
        triples = tuple((elem.tag, str(elem.VR), str(elem.value)) for elem in coded)
        object.__setattr__(self, "elements", triples)

    @classmethod
    def of(cls, code: Code) -> Concept:
        """A pydicom ``Code`` (e.g. ``codes.DCM.ImageLibrary``) as a concept."""
        return cls(code.value, code.scheme_designator, code.meaning, code.scheme_version)

    def dataset(self) -> Dataset:
        """A new code sequence item (a fresh one each time: items are never shared); its
        values were validated when the concept was made, so they are not again."""
        ds = new_item()
        for tag, vr, value in self.elements:
            ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
        return ds


def _item(value_type: str, name: Concept, relationship: str | None) -> Dataset:
    ds = new_item()
    ds.add(DataElement(_VALUE_TYPE, "CS", value_type))
    ds.add(DataElement(_CONCEPT_NAME, "SQ", [name.dataset()]))
    if relationship is not None:
        ds.add(DataElement(_RELATIONSHIP, "CS", relationship))
    return ds


def code_item(name: Concept, value: Concept, relationship: str) -> Dataset:
    """A CODE content item."""
    ds = _item("CODE", name, relationship)
    ds.add(DataElement(_CONCEPT_CODE, "SQ", [value.dataset()]))
    return ds


def text_item(name: Concept, value: str, relationship: str) -> Dataset:
    """A TEXT content item."""
    ds = _item("TEXT", name, relationship)
    ds.add(DataElement(_TEXT_VALUE, "UT", str(value)))
    return ds


def uidref_item(name: Concept, uid: str, relationship: str) -> Dataset:
    """A UIDREF content item."""
    ds = _item("UIDREF", name, relationship)
    ds.add(DataElement(_UID, "UI", uid))
    return ds


def num_item(name: Concept, value: float, unit: Concept, relationship: str) -> Dataset:
    """A NUM content item: Numeric Value as highdicom formats it, and the Floating Point
    Value as well when ``value`` is a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a NUM content item needs an int or a float, not {value!r}")
    measured = new_item()
    measured.add(DataElement(_NUMERIC_VALUE, "DS", DS(value, auto_format=True)))
    if isinstance(value, float):
        measured.add(DataElement(_FLOAT_VALUE, "FD", value))
    measured.add(DataElement(_UNITS, "SQ", [unit.dataset()]))
    ds = _item("NUM", name, relationship)
    ds.add(DataElement(_MEASURED_VALUE, "SQ", [measured]))
    return ds


def image_item(
    name: Concept,
    sop_class_uid: str,
    sop_instance_uid: str,
    relationship: str,
    content: list[Dataset] | None = None,
) -> Dataset:
    """An IMAGE content item referencing one instance (no frames, no segments)."""
    ref = new_item()
    ref.add(DataElement(_REF_SOP_CLASS, "UI", str(sop_class_uid)))
    ref.add(DataElement(_REF_SOP_INSTANCE, "UI", str(sop_instance_uid)))
    ds = _item("IMAGE", name, relationship)
    ds.add(DataElement(_REF_SOP_SEQ, "SQ", [ref]))
    if content is not None:
        ds.add(DataElement(_CONTENT_SEQ, "SQ", content))
    return ds


def container(
    name: Concept,
    content: list[Dataset] | None,
    relationship: str | None = CONTAINS,
    template_id: str | None = None,
) -> Dataset:
    """A CONTAINER content item (continuous), with its children when ``content`` is given
    and the TID it follows when ``template_id`` is."""
    ds = _item("CONTAINER", name, relationship)
    ds.add(DataElement(_CONTINUITY, "CS", "CONTINUOUS"))
    if template_id is not None:
        template = new_item()
        template.add(DataElement(_MAPPING_RESOURCE, "CS", "DCMR"))
        template.add(DataElement(_TEMPLATE_ID, "CS", str(template_id)))
        ds.add(DataElement(_TEMPLATE_SEQ, "SQ", [template]))
    if content is not None:
        ds.add(DataElement(_CONTENT_SEQ, "SQ", content))
    return ds


@lru_cache(maxsize=64)
def coded_modality(sop_class_uid: str) -> Concept:
    """The modality code of an image SOP class, from highdicom's table (TID 1602); raises
    ValueError for a SOP class that is not an image storage class, as highdicom does.
    Cached: building the table costs ~0.2 ms per call."""
    modality = Concept.of(_get_coded_modality(sop_class_uid))
    if not is_image_class(sop_class_uid):
        raise ValueError(f"SOP class {sop_class_uid} is not an image storage class")
    return modality


@lru_cache(maxsize=64)
def patient_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The root attributes of the Patient and Study IE modules of the IOD of
    ``sop_class_uid``: what highdicom's ``copy_patient_and_study_information`` copies."""
    iod = get_sop_class_iod_map()[sop_class_uid]  # KeyError for an unknown class, as before
    attributes = get_module_attribute_map()
    tags: list[BaseTag] = []
    for ie in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] != ie:
                continue
            for attribute in attributes[module["key"]]:
                tag = tag_for_keyword(str(attribute["keyword"]))
                if len(attribute["path"]) == 0 and tag is not None:
                    tags.append(Tag(tag))
    return tuple(tags)


def check_lo(value: str) -> str:
    """An LO value as highdicom checks it (at most 64 characters, no backslash)."""
    if len(value) > 64:
        raise ValueError(f"an LO value has at most 64 characters: {value!r}")
    if "\\" in value:
        raise ValueError(f"an LO value has no backslash: {value!r}")
    return value


def references(groups: dict[tuple[str, str], list[Dataset]]) -> list[Dataset]:
    """Hierarchical SOP instance references: one item per study, one per series in it."""
    by_study: dict[str, list[Dataset]] = defaultdict(list)
    for (study_uid, series_uid), instances in groups.items():
        series = new_item()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = instances
        by_study[study_uid].append(series)
    items = []
    for study_uid, series_items in by_study.items():
        study = new_item()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = series_items
        items.append(study)
    return items


def _instance_reference(ds: Dataset) -> Dataset:
    item = new_item()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def evidence_sequences(
    evidence: Iterable[Dataset], study_instance_uid: str
) -> tuple[list[Dataset], list[Dataset]]:
    """Current Requested Procedure Evidence (this study) and Pertinent Other Evidence (any
    other study) from the instances the document was made from, each listed once."""
    seen: set[str] = set()
    same: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    other: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        key = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        (same if ds.StudyInstanceUID == study_instance_uid else other)[key].append(
            _instance_reference(ds)
        )
    return references(same), references(other)


def predecessor_sequence(previous: Sequence[Dataset]) -> list[Dataset]:
    """Predecessor Documents Sequence items for earlier versions of the document."""
    groups: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for ds in previous:
        groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(_instance_reference(ds))
    return references(groups)


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> FileMetaDataset:
    """PS3.10 file meta information, as highdicom writes it."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    with BytesIO() as fp:
        write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
        meta.FileMetaInformationGroupLength = len(fp.getvalue())
    return meta


@lru_cache(maxsize=64)
def is_image_class(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` holds pixel data (highdicom's test; cached, as it
    scans the IOD's modules: ~1 ms a call)."""
    return does_iod_have_pixel_data(sop_class_uid)


def _acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment, as ``ContributingEquipment.for_image_acquisition``
    makes it, when the source is an image that states a manufacturer (else nothing, as
    highdicom leaves it out). Built here only to cache the image-class test."""
    try:
        if not is_image_class(source.SOPClassUID) or not source.get("Manufacturer"):
            return []
        when = source.get("AcquisitionDateTime")
        if when is None:
            date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
            if isinstance(date, dt.date) and isinstance(time, dt.time):
                when = dt.datetime.combine(date, time)
        return [
            hd.ContributingEquipment(
                manufacturer=source.get("Manufacturer"),
                purpose_of_reference=_ACQUISITION_EQUIPMENT,
                manufacturer_model_name=source.get("ManufacturerModelName"),
                software_versions=source.get("SoftwareVersions"),
                device_serial_number=source.get("DeviceSerialNumber"),
                institution_name=source.get("InstitutionName"),
                institutional_department_name=source.get("InstitutionalDepartmentName"),
                institution_address=source.get("InstitutionAddress"),
                station_name=source.get("StationName"),
                contribution_datetime=when,
                contribution_description="Acquisition equipment of the source image(s)",
            )
        ]
    except Exception:  # an unknown class or a value highdicom refuses: left out, as there
        return []


def _character_set(value: str | list[str] | None) -> str | list[str] | None:
    """Specific Character Set as highdicom accepts it: known terms; code extensions (ISO
    2022) only in a multi-valued set, and there in every value."""
    if value is None:
        return None
    terms = [
        SpecificCharacterSetValues(v).value for v in ([value] if isinstance(value, str) else value)
    ]
    extensions = [t.upper().startswith("ISO 2022") for t in terms]
    if not terms or (len(terms) == 1 and extensions[0]) or (len(terms) > 1 and not all(extensions)):
        raise ValueError(f"not a Specific Character Set highdicom writes: {value!r}")
    return terms[0] if len(terms) == 1 else terms


# the attributes SOPClass sets from the first source before copying its modules: a source
# without one still gets it, empty (Type 2)
_SOURCE_TYPE2: Final = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass
class Equipment:
    """General Equipment and SR series attributes of the document (ours)."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: list[str]
    device_serial_number: str | None = None
    institution_name: str | None = None
    contributing: list[hd.ContributingEquipment] = field(default_factory=list)


def comprehensive_sr(
    *,
    root: Dataset,
    evidence: Sequence[Dataset],
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    sop_instance_uid: str,
    instance_number: int,
    equipment: Equipment,
    is_complete: bool,
    previous_versions: Sequence[Dataset],
    specific_character_set: str | list[str] | None,
    content_datetime: dt.datetime,
    transfer_syntax_uid: str,
) -> Dataset:
    """A Comprehensive SR document around the content tree ``root`` (a CONTAINER item).

    Patient and study come from ``evidence[0]`` (a full source header); the document is
    PRELIMINARY and UNVERIFIED (research output nobody has verified). Every instance in
    ``evidence`` is listed as evidence, whether the content references it or not.
    """
    source = evidence[0]
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = file_meta(ComprehensiveSRStorage, sop_instance_uid, transfer_syntax_uid)

    charset = _character_set(specific_character_set)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    now = dt.datetime.now()  # highdicom's clock for the instance creation
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    ds.SOPClassUID = str(ComprehensiveSRStorage)
    ds.SOPInstanceUID = str(sop_instance_uid)
    ds.InstanceNumber = instance_number
    ds.ContentDate = DA(content_datetime.date())
    ds.ContentTime = TM(content_datetime.time())

    # General Series (SR Document Series) and General Equipment
    ds.SeriesInstanceUID = str(series_instance_uid)
    ds.SeriesNumber = series_number
    ds.Modality = "SR"
    ds.SeriesDescription = check_lo(series_description)
    ds.Manufacturer = check_lo(equipment.manufacturer)
    ds.ManufacturerModelName = check_lo(equipment.manufacturer_model_name)
    if equipment.device_serial_number is not None:
        ds.DeviceSerialNumber = check_lo(equipment.device_serial_number)
    ds.SoftwareVersions = [check_lo(v) for v in equipment.software_versions]
    if equipment.institution_name is not None:
        ds.InstitutionName = check_lo(equipment.institution_name)

    # SR Document General
    ds.CompletionFlag = "COMPLETE" if is_complete else "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.PerformedProcedureCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = []
    if previous_versions:
        ds.PredecessorDocumentsSequence = predecessor_sequence(previous_versions)

    # SR Document Content: the root container's elements, at the top level
    for elem in root:
        ds.add(elem)

    # Patient and study modules: the source's own elements, as highdicom copies them
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    for keyword in _SOURCE_TYPE2:
        setattr(ds, keyword, None)
    for tag in patient_study_tags(source.SOPClassUID):
        if tag in source:
            ds.add(source[tag])

    same, other = evidence_sequences(evidence, ds.StudyInstanceUID)
    if same:
        ds.CurrentRequestedProcedureEvidenceSequence = same
    if other:
        ds.PertinentOtherEvidenceSequence = other

    ds.ContributingEquipmentSequence = [
        *_acquisition_equipment(source),
        *equipment.contributing,
        hd.ContributingEquipment.for_highdicom(),
    ]
    # written as built (see new_item): the top level holds only elements made here or
    # decoded from the source's Patient and Study modules, none raw, none of ambiguous VR
    syntax = UID(transfer_syntax_uid)
    ds.set_original_encoding(
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        default_encoding if charset is None else convert_encodings(charset),
    )
    return ds
