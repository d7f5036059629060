"""What every object the screener writes has in common: identity, equipment, sources."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from screener.identity import PRODUCT_NAME, software_version
from screener.reports.output_uids import derive_uid
from screener.results import SourceImageRef, StudyResult
from screener.settings import Settings

# Series numbers of the screener's own series: high, so they sort after the acquisition.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PMAP_SERIES_NUMBER = 9903

LO_MAX = 64  # DICOM LO value length


def clip_lo(text: str) -> str:
    """Fit a string into an LO value (64 characters, no backslash)."""
    return text.replace("\\", "/")[:LO_MAX]


def software_versions(result: StudyResult) -> list[str]:
    """SoftwareVersions: the model version and the screener's own version."""
    return [clip_lo(result.model.ref), clip_lo(f"{PRODUCT_NAME} {software_version()}")]


def disclaimer_of(result: StudyResult, settings: Settings) -> str:
    """The configured disclaimer (the result's own text when none is configured)."""
    return (settings.disclaimer or result.disclaimer).strip()


def processing_equipment(result: StudyResult, settings: Settings) -> hd.ContributingEquipment:
    """Contributing Equipment item (purpose DCM 109102 Processing Equipment): the screener."""
    return hd.ContributingEquipment(
        manufacturer=clip_lo(settings.reports.manufacturer),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=PRODUCT_NAME,
        software_versions=software_versions(result),
        device_serial_number=clip_lo(result.model.engine_hash) or None,
        institution_name=clip_lo(settings.reports.institution_name) or None,
        contribution_description=f"Automated screening by {PRODUCT_NAME} ({result.model.ref})",
    )


def common_attributes(result: StudyResult, settings: Settings) -> dict[str, object]:
    """Keyword arguments of highdicom SOP classes shared by SR, SC and parametric map."""
    kwargs: dict[str, object] = {
        "manufacturer_model_name": PRODUCT_NAME,
        "software_versions": software_versions(result),
    }
    if settings.reports.institution_name:
        kwargs["institution_name"] = clip_lo(settings.reports.institution_name)
    if result.model.engine_hash:
        kwargs["device_serial_number"] = clip_lo(result.model.engine_hash)
    return kwargs


@dataclass(frozen=True)
class PredecessorRef:
    """An SR written by an earlier screening of the same study (Predecessor Documents)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        return ds


UTF8 = "ISO_IR 192"
INSTALLATION_FILE = "installation-uid"


def installation_uuid(data_dir: Path) -> str:
    """A random UUID made once per installation and kept in the data dir (shared by every
    worker of a deployment, as the spool and the outbox are)."""
    path = Path(data_dir) / INSTALLATION_FILE
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_name(f".{INSTALLATION_FILE}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    try:
        os.link(tmp, path)  # atomic create-if-absent: the first writer wins
    except FileExistsError:
        value = str(uuid.UUID(path.read_text().strip()))
    finally:
        tmp.unlink(missing_ok=True)
    return value


def device_observer_uid(settings: Settings, model_ref: str) -> str:
    """The SR's Device Observer UID: one per installation and model@version (IHE AIR: a
    device is one running algorithm, not the same UID at every site)."""
    return derive_uid("device", installation_uuid(settings.data_dir), model_ref)


def _charset_values(ds: Dataset) -> list[str]:
    current = ds.get("SpecificCharacterSet")
    if current is None:
        return []
    return [str(current)] if isinstance(current, str) else [str(v) for v in current]


def _standard_term(value: str) -> bool:
    """A Defined Term of Specific Character Set (PS3.3 C.12.1.1.2) as written."""
    try:
        hd.enum.SpecificCharacterSetValues(value)
    except ValueError:
        return False
    return True


def _relabelled(values: list[str]) -> bool:
    """Whether the decoded values must be written as UTF-8 instead: several sets, ISO 2022
    code extensions, or a term outside the standard's (``ISO-IR 100``, ``UTF-8``: pydicom
    decodes them with a warning; highdicom and the PACS would refuse the label)."""
    return len(values) > 1 or any(
        v.strip().upper().startswith("ISO 2022") or (v.strip() and not _standard_term(v.strip()))
        for v in values
    )


# Single standard sets kept in a wider one: dicom3tools' dciodvfy (and archives built the
# same way) reject their bytes, while GB18030 holds GBK's byte for byte
_WIDER = {"GBK": "GB18030", "ISO_IR 13": UTF8}
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


def normalise_character_set(ds: Dataset) -> Dataset:
    """Decode every text value of ``ds`` with its own character set and re-label it.

    A single standard character set without ISO 2022 code extensions is kept (the PACS
    already handles it); multi-valued sets, ISO 2022 escapes, an empty first value (e.g.
    ``\\ISO 2022 IR 87``) and terms that are not the standard's become UTF-8
    (ISO_IR 192), which holds every decoded value exactly and which highdicom writes
    without code extensions. So does a set that cannot hold what was decoded: 8-bit bytes
    with no Specific Character Set (pydicom reads them as Latin-1; written back unlabelled
    they are invalid), or bytes invalid in their set (decoded as U+FFFD). GBK is written as
    GB18030 and ISO_IR 13 as UTF-8 (see ``_WIDER``). Values stay identical as text; only
    their encoding changes.
    """
    values = _charset_values(ds)
    ds.decode()  # text values are str from here on, whatever the source encoding
    if _relabelled(values):
        ds.SpecificCharacterSet = UTF8
        return ds
    kept = values[0].strip() if values else ""
    if kept in _WIDER:
        kept = ds.SpecificCharacterSet = _WIDER[kept]
    elif values and not kept:
        del ds.SpecificCharacterSet  # a single empty value: the default repertoire
    encodings = _python_encodings([kept] if kept else [])
    if not all(any(_encodes(t, e) for e in encodings) for t in _decoded_texts(ds)):
        ds.SpecificCharacterSet = UTF8
    return ds


def _python_encodings(values: list[str]) -> list[str]:
    """The codecs a (normalised) set writes with. The default repertoire is ASCII: pydicom
    decodes it leniently as Latin-1, but unlabelled bytes above 0x7F are invalid."""
    from pydicom.charset import convert_encodings

    if not values or values[0].strip() in ("", "ISO_IR 6"):
        return ["ascii"]
    return list(convert_encodings(values))


def _decoded_texts(ds: Dataset) -> Iterator[str]:
    """Every decoded text value of ``ds``, its sequences' included."""
    for elem in ds.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        multiple = isinstance(elem.value, (list, tuple, MultiValue))
        for value in elem.value if multiple else [elem.value]:
            yield str(value)


def output_character_set(source: Dataset, texts: list[str]) -> str | list[str] | None:
    """The (normalised) source's character set, or UTF-8 (ISO_IR 192) when our own texts
    (a configured disclaimer in another script, say) cannot be encoded in it."""
    values = _charset_values(source)
    if _relabelled(values):
        return UTF8  # never hand highdicom code extensions (it rejects an empty value)
    current: str | None = values[0] if values else None
    try:
        encodings = _python_encodings(values)
    except Exception:  # an unknown term: UTF-8 holds whatever was decoded
        return UTF8
    for text in texts:
        if not any(_encodes(text, enc) for enc in encodings):
            return "ISO_IR 192"
    return current


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def read_source_header(ref: SourceImageRef) -> Dataset | None:
    """The source instance without pixels, or None when there is no readable file."""
    if not ref.file_path or not Path(ref.file_path).is_file():
        return None
    try:
        ds = pydicom.dcmread(ref.file_path, stop_before_pixels=True)
    except Exception:  # an unreadable source is reported in the SR, not raised here
        return None
    if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        return None
    normalise_character_set(ds)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            # Type 2 in the source's IOD, sometimes missing in the wild: present and
            # empty in ours, as the SR/SC/PM IODs require
            setattr(ds, keyword, "")
    conform_type2_values(ds)
    return ds


def _conformant_date(value: str) -> str:
    """A DA value as YYYYMMDD (the ACR-NEMA ``YYYY.MM.DD`` form too); "" if it is none."""
    try:
        parsed = DA(value.strip())
    except (ValueError, TypeError):
        return ""
    return "" if parsed is None else parsed.strftime("%Y%m%d")


def _conformant_time(value: str) -> str:
    """A TM value as written, without the ACR-NEMA colons; "" if it is none."""
    text = value.strip().replace(":", "")
    try:
        parsed = TM(text)
    except (ValueError, TypeError):
        return ""
    return "" if parsed is None else text


def conform_type2_values(ds: Dataset) -> None:
    """Patient sex, birth date, study date and time as the output IODs take them.

    Sources in the wild carry ``U``, ``MALE``, ``1980-01-02``, ``19800000`` or
    ``12:30:00``; copied as they are they made highdicom refuse the heatmap SC (and with
    it the study's SR), or went out as values a PACS may reject. They are Type 2 in every
    object written here: an unusable value becomes empty, a legacy form is rewritten;
    the source itself is never changed.
    """
    sex = str(ds.get("PatientSex") or "").strip().upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    for keyword in ("PatientBirthDate", "StudyDate"):
        ds[keyword].value = _conformant_date(str(ds.get(keyword) or ""))
    ds.StudyTime = _conformant_time(str(ds.get("StudyTime") or ""))


# Patient and General Study attributes that are Type 2 (present, may be empty)
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def reference_dataset(ref: SourceImageRef) -> Dataset:
    """A minimal stand-in for a source whose file cannot be read: its UIDs only."""
    ds = Dataset()
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.StudyInstanceUID = ref.study_instance_uid
    return ds


PNEUMONIA_RULE = "present when it is the most probable class"


def pneumonia_present(probabilities: dict[str, float]) -> bool:
    """Pneumonia has no calibrated threshold: Present when it is the most probable class.
    One function, so the SR and the heatmap SC can never disagree on the call."""
    return max(probabilities, key=lambda k: probabilities[k]) == "pneumonia"
