"""SR content items (encoded) and the Comprehensive SR document around them (pydicom).

Why not highdicom's SR classes: ``ComprehensiveSR.__init__`` deep-copies the whole content
tree, re-parses the copy into typed items and searches the tree three times (referenced
images, composites, SCOORD3D), and the typed templates build every coded concept through
validating setters: about 33 ms of CPU for a one-image study, against ~1.2 ms for the same
elements built here, and ~1 ms instead of ~8 to encode them (``benchmarks/reports.py``,
table 3; the content tree and references are encoded here, see ``ItemEncoder``). The
output does not change: the element-for-element and byte-for-byte comparison with the
highdicom-built document is ``tests/unit/test_sr_equivalence.py``. Coded concepts are
still checked by highdicom (:class:`Concept` builds each one through
``hd.sr.CodedConcept``, once, at import).

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
from struct import Struct
from typing import Final, cast

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
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ComprehensiveSRStorage
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, DA, DS, EXPLICIT_VR_LENGTH_32, TM, DSfloat

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
_SERIES_UID = Tag(0x0020000E)
_STUDY_UID = Tag(0x0020000D)
_REF_SERIES_SEQ = Tag(0x00081115)
_PREDECESSORS = Tag(0x0040A360)
_CURRENT_EVIDENCE = Tag(0x0040A375)
_OTHER_EVIDENCE = Tag(0x0040A385)

_ACQUISITION_EQUIPMENT: Final = codes.DCM.AcquisitionEquipment

# highdicom's own file meta identity (base.SOPClass), kept so the output stays the same
IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.9.7433.1.1"
IMPLEMENTATION_VERSION_NAME: Final = f"highdicom{HIGHDICOM_VERSION}"


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


# ---- content items, encoded as pydicom encodes them ------------------------------------
#
# Why the content tree is written here as bytes rather than as pydicom datasets: building
# ~55 items (~550 elements, ~150 datasets) through pydicom's validating DataElement and
# Dataset setters, then writing them element by element (write_data_element: ~10-30 us
# each), was nearly all of the SR's CPU (~10 ms of 10, one image). The tree is now encoded
# once, in the document's transfer syntax (explicit VR little endian) and character set,
# and handed to the document as raw elements, which pydicom writes as they are
# (``filewriter.write_data_element``: ``if elem.is_raw``) and decodes when read
# (``ds.ContentSequence`` is an ordinary sequence to a reader).
#
# The bytes are pydicom's, rule for rule: elements in tag order; defined lengths for
# sequences and items (no delimiters); 2-byte lengths but for the 4-byte VRs (SQ, UT...);
# CS/DS padded with a space, UI with a NUL; DS as pydicom formats the value it converts;
# text (SH, LO, UT) in the document's character set, padded with a space. Text that is
# not plain ASCII, or a character set whose ASCII is not plain ASCII bytes, is encoded by
# pydicom's own ``write_data_element``. Checked byte for byte against pydicom's writer on
# the decoded document (``tests/unit/test_sr_encoding.py``) and against the highdicom
# build (``tests/unit/test_sr_equivalence.py``).

Element = tuple[int, str, bytes]
"""One encoded element: tag, VR and its value bytes (even length)."""

_LONG_VRS: Final = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_HEADER: Final = Struct("<HH2sH")
_LONG_HEADER: Final = Struct("<HH2sHL")
_ITEM_HEADER: Final = Struct("<HHL")
_FLOAT64: Final = Struct("<d")
# every ASCII character: a character set encodes text "as ASCII" when pydicom turns this
# into these very bytes
_ASCII: Final = "".join(map(chr, range(128)))


def _element_bytes(tag: int, vr: str, value: bytes) -> bytes:
    """The element as pydicom writes it in explicit VR little endian."""
    if vr in _LONG_VRS:
        return _LONG_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:  # pydicom would write it as UN: not a value made here
        raise ValueError(f"a {vr} value of {len(value)} bytes for {Tag(tag)}")
    return _SHORT_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def item_body(elements: Iterable[Element]) -> bytes:
    """A dataset's encoded elements, in tag order (the body of a sequence item)."""
    return b"".join(_element_bytes(*elem) for elem in sorted(elements, key=_tag_of))


def _tag_of(elem: Element) -> int:
    return elem[0]


def sequence(tag: int, items: Iterable[bytes]) -> Element:
    """An SQ element of the given item bodies, with defined lengths (as pydicom writes a
    sequence it did not read)."""
    value = b"".join(_ITEM_HEADER.pack(0xFFFE, 0xE000, len(body)) + body for body in items)
    return (tag, "SQ", value)


def _padded(data: bytes, pad: bytes) -> bytes:
    return data + pad if len(data) % 2 else data


def _pydicom_element(tag: int, vr: str, value: object, encodings: Sequence[str]) -> Element:
    """The element as pydicom's own writer encodes it (for text the fast path does not
    take)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, DataElement(tag, vr, value), list(encodings))
    encoded = fp.getvalue()
    header = 12 if vr in _LONG_VRS else 8
    return (tag, vr, encoded[header:])


def ds_text(value: float) -> str:
    """A NUM item's Numeric Value (DS) as highdicom sets it and pydicom writes it: the value
    auto-formatted, then converted again by the element (which keeps any original
    string)."""
    number = cast(DSfloat, DS(DS(value, auto_format=True), False))
    return number.original_string if hasattr(number, "original_string") else str(number)


@lru_cache(maxsize=32)
def _ascii_is_ascii(encodings: tuple[str, ...]) -> bool:
    """Whether pydicom writes ASCII text in ``encodings`` as the ASCII bytes themselves (a
    single, stateless character set: every one the SR is written in)."""
    if len(encodings) != 1:
        return False
    try:
        return encode_string(_ASCII, list(encodings)) == _ASCII.encode("ascii")
    except (UnicodeError, LookupError):
        return False


@dataclass(frozen=True)
class ItemEncoder:
    """Encodes content items for a document in one character set (``encodings``: the
    Python encodings of its Specific Character Set, as pydicom converts it)."""

    encodings: tuple[str, ...]

    @classmethod
    def for_charset(cls, charset: str | list[str] | None) -> ItemEncoder:
        """The encoder for a document with this Specific Character Set (None: default)."""
        if charset is None:
            return cls((default_encoding,))
        return cls(tuple(convert_encodings(charset)))

    def text(self, tag: int, vr: str, value: str) -> Element:
        """An SH/LO/ST/LT/UT element (written in the document's character set)."""
        if value.isascii() and _ascii_is_ascii(self.encodings):
            return (tag, vr, _padded(value.encode("ascii"), b" "))
        return _pydicom_element(tag, vr, value, self.encodings)

    def string(self, tag: int, vr: str, value: str) -> Element:
        """A CS/UI/DS element (default repertoire; UI padded with NUL)."""
        if not value.isascii():
            return _pydicom_element(tag, vr, value, self.encodings)
        return (tag, vr, _padded(value.encode("ascii"), b"\0" if vr == "UI" else b" "))

    def element(self, tag: int, vr: str, value: str) -> Element:
        """A string element of any string VR."""
        if vr in CUSTOMIZABLE_CHARSET_VR:
            return self.text(tag, vr, value)
        return self.string(tag, vr, value)

    def code_sequence(self, tag: int, concept: Concept) -> Element:
        """A code sequence (concept name, concept code, units) of one concept; cached, as
        the concepts are the same in every document."""
        return _code_sequence(self, tag, concept)

    def _item(self, value_type: str, name: Concept, relationship: str | None) -> list[Element]:
        elements = [
            _constant(self, _VALUE_TYPE, "CS", value_type),
            self.code_sequence(_CONCEPT_NAME, name),
        ]
        if relationship is not None:
            elements.append(_constant(self, _RELATIONSHIP, "CS", relationship))
        return elements

    def sop_reference(self, sop_class_uid: str, sop_instance_uid: str) -> bytes:
        """A Referenced SOP Class / Instance UID item (of an IMAGE item, of the evidence)."""
        return item_body(
            [
                self.string(_REF_SOP_CLASS, "UI", str(sop_class_uid)),
                self.string(_REF_SOP_INSTANCE, "UI", str(sop_instance_uid)),
            ]
        )

    def code_item(self, name: Concept, value: Concept, relationship: str) -> bytes:
        """A CODE content item."""
        return _code_item(self, name, value, relationship)

    def text_item(self, name: Concept, value: str, relationship: str) -> bytes:
        """A TEXT content item."""
        elements = self._item("TEXT", name, relationship)
        elements.append(self.text(_TEXT_VALUE, "UT", str(value)))
        return item_body(elements)

    def uidref_item(self, name: Concept, uid: str, relationship: str) -> bytes:
        """A UIDREF content item."""
        elements = self._item("UIDREF", name, relationship)
        elements.append(self.string(_UID, "UI", str(uid)))
        return item_body(elements)

    def num_item(self, name: Concept, value: float, unit: Concept, relationship: str) -> bytes:
        """A NUM content item: Numeric Value as highdicom formats it, and the Floating Point
        Value as well when ``value`` is a float."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"a NUM content item needs an int or a float, not {value!r}")
        measured = [
            self.string(_NUMERIC_VALUE, "DS", ds_text(value)),
            self.code_sequence(_UNITS, unit),
        ]
        if isinstance(value, float):
            measured.append((_FLOAT_VALUE, "FD", _FLOAT64.pack(value)))
        elements = self._item("NUM", name, relationship)
        elements.append(sequence(_MEASURED_VALUE, [item_body(measured)]))
        return item_body(elements)

    def image_item(
        self,
        name: Concept,
        sop_class_uid: str,
        sop_instance_uid: str,
        relationship: str,
        content: list[bytes] | None = None,
    ) -> bytes:
        """An IMAGE content item referencing one instance (no frames, no segments)."""
        elements = self._item("IMAGE", name, relationship)
        elements.append(
            sequence(_REF_SOP_SEQ, [self.sop_reference(sop_class_uid, sop_instance_uid)])
        )
        if content is not None:
            elements.append(sequence(_CONTENT_SEQ, content))
        return item_body(elements)

    def container_elements(
        self,
        name: Concept,
        content: list[bytes] | None,
        relationship: str | None = CONTAINS,
        template_id: str | None = None,
    ) -> list[Element]:
        """The elements of a CONTAINER content item (continuous), with its children when
        ``content`` is given and the TID it follows when ``template_id`` is."""
        elements = self._item("CONTAINER", name, relationship)
        elements.append(_constant(self, _CONTINUITY, "CS", "CONTINUOUS"))
        if template_id is not None:
            elements.append(_template(self, str(template_id)))
        if content is not None:
            elements.append(sequence(_CONTENT_SEQ, content))
        return elements

    def container(
        self,
        name: Concept,
        content: list[bytes] | None,
        relationship: str | None = CONTAINS,
        template_id: str | None = None,
    ) -> bytes:
        """A CONTAINER content item (see ``container_elements``)."""
        return item_body(self.container_elements(name, content, relationship, template_id))


# The parts that are the same in every document: a concept's code sequence, a constant CS
# element, a CODE item of two concepts, a template reference. Keyed by everything their
# bytes depend on (the encoder is its character set); the values are immutable bytes,
# shared by the documents without being copied.


@lru_cache(maxsize=1024)
def _code_sequence(encoder: ItemEncoder, tag: int, concept: Concept) -> Element:
    item = item_body(encoder.element(t, vr, value) for t, vr, value in concept.elements)
    return sequence(tag, [item])


@lru_cache(maxsize=256)
def _constant(encoder: ItemEncoder, tag: int, vr: str, value: str) -> Element:
    return encoder.element(tag, vr, value)


@lru_cache(maxsize=256)
def _code_item(encoder: ItemEncoder, name: Concept, value: Concept, relationship: str) -> bytes:
    elements = encoder._item("CODE", name, relationship)
    elements.append(encoder.code_sequence(_CONCEPT_CODE, value))
    return item_body(elements)


@lru_cache(maxsize=64)
def _template(encoder: ItemEncoder, template_id: str) -> Element:
    item = item_body(
        [
            encoder.string(_MAPPING_RESOURCE, "CS", "DCMR"),
            encoder.string(_TEMPLATE_ID, "CS", template_id),
        ]
    )
    return sequence(_TEMPLATE_SEQ, [item])


def document_encoder(specific_character_set: str | list[str] | None) -> ItemEncoder:
    """The encoder of the content of a document with this Specific Character Set (as
    ``comprehensive_sr`` normalises it)."""
    return ItemEncoder.for_charset(highdicom_character_set(specific_character_set))


def raw_elements(elements: Iterable[Element]) -> list[RawDataElement]:
    """Encoded elements as pydicom's raw elements (explicit VR little endian), to be
    written as they are and decoded when read."""
    return [
        RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        for tag, vr, value in elements
    ]


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


def references(encoder: ItemEncoder, groups: dict[tuple[str, str], list[bytes]]) -> list[bytes]:
    """Hierarchical SOP instance references (encoded items): one item per study, one per
    series in it."""
    by_study: dict[str, list[bytes]] = defaultdict(list)
    for (study_uid, series_uid), instances in groups.items():
        series = [
            encoder.string(_SERIES_UID, "UI", str(series_uid)),
            sequence(_REF_SOP_SEQ, instances),
        ]
        by_study[study_uid].append(item_body(series))
    return [
        item_body(
            [
                encoder.string(_STUDY_UID, "UI", str(study_uid)),
                sequence(_REF_SERIES_SEQ, series_items),
            ]
        )
        for study_uid, series_items in by_study.items()
    ]


def evidence_sequences(
    encoder: ItemEncoder, evidence: Iterable[Dataset], study_instance_uid: str
) -> tuple[list[bytes], list[bytes]]:
    """Current Requested Procedure Evidence (this study) and Pertinent Other Evidence (any
    other study) from the instances the document was made from, each listed once (encoded
    items, as the content: the same pydicom bytes at a fraction of the CPU)."""
    seen: set[str] = set()
    same: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    other: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        key = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        (same if ds.StudyInstanceUID == study_instance_uid else other)[key].append(
            encoder.sop_reference(ds.SOPClassUID, ds.SOPInstanceUID)
        )
    return references(encoder, same), references(encoder, other)


def predecessor_sequence(encoder: ItemEncoder, previous: Sequence[Dataset]) -> list[bytes]:
    """Predecessor Documents Sequence items (encoded) for earlier versions of the
    document."""
    groups: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for ds in previous:
        groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(
            encoder.sop_reference(ds.SOPClassUID, ds.SOPInstanceUID)
        )
    return references(encoder, groups)


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> FileMetaDataset:
    """PS3.10 file meta information, as highdicom writes it."""
    meta = _meta_without_length(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
    meta.FileMetaInformationGroupLength = _meta_length(
        str(sop_class_uid), str(transfer_syntax_uid), len(str(sop_instance_uid))
    )
    return meta


def _meta_without_length(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


@lru_cache(maxsize=64)
def _meta_length(sop_class_uid: str, transfer_syntax_uid: str, instance_uid_length: int) -> int:
    """What highdicom sets as File Meta Information Group Length: the length of the file
    meta as written, which only the lengths of its values decide (the others are
    constants); cached by them, as writing it costs ~0.15 ms."""
    meta = _meta_without_length(sop_class_uid, "1" * instance_uid_length, transfer_syntax_uid)
    with BytesIO() as fp:
        write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
        return len(fp.getvalue())


@lru_cache(maxsize=64)
def is_image_class(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` holds pixel data (highdicom's test; cached, as it
    scans the IOD's modules: ~1 ms a call)."""
    return does_iod_have_pixel_data(sop_class_uid)


def acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
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


def highdicom_character_set(value: str | list[str] | None) -> str | list[str] | None:
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

    def apply(self, ds: Dataset) -> None:
        """The General Equipment attributes of a document made by us (SR or SC)."""
        ds.Manufacturer = check_lo(self.manufacturer)
        ds.ManufacturerModelName = check_lo(self.manufacturer_model_name)
        if self.device_serial_number is not None:
            ds.DeviceSerialNumber = check_lo(self.device_serial_number)
        ds.SoftwareVersions = [check_lo(v) for v in self.software_versions]
        if self.institution_name is not None:
            ds.InstitutionName = check_lo(self.institution_name)


def comprehensive_sr(
    *,
    root: list[Element],
    encoder: ItemEncoder,
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
    """A Comprehensive SR document around the content tree ``root`` (the elements of its
    CONTAINER item, encoded by ``encoder``: see ``document_encoder``).

    Patient and study come from ``evidence[0]`` (a full source header); the document is
    PRELIMINARY and UNVERIFIED (research output nobody has verified). Every instance in
    ``evidence`` is listed as evidence, whether the content references it or not.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax.is_implicit_VR or not syntax.is_little_endian:  # the content's encoding
        raise ValueError(f"the content is encoded in explicit VR little endian, not {syntax}")
    source = evidence[0]
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = file_meta(ComprehensiveSRStorage, sop_instance_uid, transfer_syntax_uid)

    charset = highdicom_character_set(specific_character_set)
    if ItemEncoder.for_charset(charset) != encoder:
        raise ValueError(f"the content was encoded for another character set than {charset!r}")
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
    equipment.apply(ds)

    # SR Document General
    ds.CompletionFlag = "COMPLETE" if is_complete else "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.PerformedProcedureCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = []
    if previous_versions:
        items = predecessor_sequence(encoder, previous_versions)
        (raw,) = raw_elements([sequence(_PREDECESSORS, items)])
        ds[raw.tag] = raw

    # SR Document Content: the root container's elements, at the top level, raw (written
    # as encoded, decoded when read)
    for elem in raw_elements(root):
        ds[elem.tag] = elem

    # Patient and study modules: the source's own elements, as highdicom copies them
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    for keyword in _SOURCE_TYPE2:
        setattr(ds, keyword, None)
    for tag in patient_study_tags(source.SOPClassUID):
        if tag in source:
            ds.add(source[tag])

    same, other = evidence_sequences(encoder, evidence, ds.StudyInstanceUID)
    for tag, items in ((_CURRENT_EVIDENCE, same), (_OTHER_EVIDENCE, other)):
        if items:
            (raw,) = raw_elements([sequence(tag, items)])
            ds[raw.tag] = raw

    ds.ContributingEquipmentSequence = [
        *acquisition_equipment(source),
        *equipment.contributing,
        hd.ContributingEquipment.for_highdicom(),
    ]
    # written as built: the top level holds only elements made here, the content and the
    # references encoded here (raw, explicit VR little endian, this character set) or
    # elements decoded from the source's Patient and Study modules; none of ambiguous VR
    # (so pydicom's writer has no ambiguous-VR pass to run over the document)
    ds.set_original_encoding(
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        default_encoding if charset is None else convert_encodings(charset),
    )
    return ds
