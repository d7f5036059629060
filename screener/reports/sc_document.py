"""The Secondary Capture Image document around given RGB pixels (plain pydicom).

Why not highdicom's ``SCImage.from_ref_dataset``: ``ContributingEquipment.
for_image_acquisition`` scans the source's IOD for pixel data, ``SOPClass`` scans the SC
IOD twice for Content Date and Time and writes the file meta to measure it, on every
call: 2.5 ms of CPU per heatmap for the document alone, against 1.0 ms here with the scans
and the file meta length cached (``sr_document``), both including the one copy of a
1400 x 896 RGB frame; ``build_heatmap_sc`` at a 1024-pixel display 14.4 -> 13.0 ms
(``time.process_time``, interleaved, medians). What is left is mostly pydicom's validating
setters and highdicom's three ``ContributingEquipment`` items (~0.1 ms each). The output
does not change: the element-for-element and byte-for-byte comparison with the
highdicom-built SC is ``tests/unit/test_sc_equivalence.py``.

What is copied from highdicom's ``SCImage.__init__``/``from_ref_dataset`` and
``SOPClass.__init__`` (0.28), for the arguments the heatmap passes (RGB, 8 bits, PATIENT
coordinate system, an uncompressed transfer syntax), so that a later highdicom release
changing them shows up in that test rather than silently: the file meta (highdicom's
implementation UID and version name, ``sr_document.file_meta``); the Patient and General
Study attributes read from the source one by one (Type 2: present, empty when the source
lacks them; dates and times as ``DA``/``TM``; Patient's Sex through highdicom's enum; the
names through highdicom's check); the series (Modality OT), equipment and SOP Common
attributes; Instance Creation and Date/Time of Secondary Capture from the clock; the
contributing equipment (the source's acquisition equipment, ours, highdicom's); the
Patient Orientation through highdicom's biped enum; Conversion Type DI; Image Type
DERIVED\\SECONDARY\\OTHER; the Image Pixel module of an 8-bit RGB, colour-by-pixel image.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

import highdicom as hd
import numpy as np
from highdicom.enum import PatientOrientationValuesBiped, PatientSexValues
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import DA, TM

from screener.reports.sr_document import (
    Equipment,
    acquisition_equipment,
    check_lo,
    file_meta,
    highdicom_character_set,
)

# what highdicom's SCImage writes uncompressed (the compressed ones are not made here)
_UNCOMPRESSED: Final = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_IMAGE_TYPE: Final = ("DERIVED", "SECONDARY", "OTHER")
_CONVERSION_TYPE: Final = "DI"  # highdicom's: digitised image (a caller may say otherwise)


def _positive(name: str, value: int) -> int:
    if value is None:
        raise TypeError(f'Argument "{name}" is required.')
    if value < 1:
        raise ValueError(f'Argument "{name}" should be a positive integer.')
    return value


def secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    patient_orientation: tuple[str, str],
    series_description: str,
    equipment: Equipment,
    specific_character_set: str | list[str] | None,
    content_datetime: dt.datetime,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Dataset:
    """An SC Image (PATIENT coordinate system) of ``pixels`` (rows x columns x 3, uint8,
    RGB) in the study of ``source``, as ``hd.sc.SCImage.from_ref_dataset`` builds it.

    Pixel Data is the array's bytes, colour-by-pixel, copied once. Contributing equipment:
    the source's acquisition equipment (when it is an image stating a manufacturer), then
    ``equipment.contributing``, then highdicom's item.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax not in _UNCOMPRESSED:
        raise ValueError(f'Transfer syntax "{syntax}" is not supported here')
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError("an RGB Secondary Capture needs rows x columns x 3 pixels")
    if pixels.dtype != np.uint8:
        raise TypeError(f"an 8-bit RGB image needs uint8 pixels, not {pixels.dtype}")
    orientation = [PatientOrientationValuesBiped(v).value for v in patient_orientation]
    # highdicom's check_person_name is left out: it only warns, with the name in the text
    patient_name = source.get("PatientName")
    referring = source.get("ReferringPhysicianName")
    charset = highdicom_character_set(specific_character_set)
    contributing = [*acquisition_equipment(source), *equipment.contributing]

    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = file_meta(SecondaryCaptureImageStorage, sop_instance_uid, syntax)

    # Patient and General Study: the source's values, Type 2 (empty when it lacks them)
    ds.PatientID = source.get("PatientID")
    ds.PatientName = patient_name
    ds.PatientBirthDate = DA(source.get("PatientBirthDate"))
    sex = source.get("PatientSex")
    ds.PatientSex = PatientSexValues(sex).value if sex is not None and sex != "" else sex
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    ds.AccessionNumber = source.get("AccessionNumber")
    ds.StudyID = source.get("StudyID")
    study_date, study_time = source.get("StudyDate"), source.get("StudyTime")
    ds.StudyDate = DA(study_date) if study_date is not None else None
    ds.StudyTime = TM(study_time) if study_time is not None else None
    ds.ReferringPhysicianName = referring

    # General Series and General Equipment
    ds.SeriesInstanceUID = str(series_instance_uid)
    ds.SeriesNumber = _positive("series_number", series_number)
    ds.Modality = "OT"
    ds.SeriesDescription = check_lo(series_description)
    equipment.apply(ds)

    # SOP Common and the content's date and time
    ds.SOPInstanceUID = str(sop_instance_uid)
    ds.SOPClassUID = str(SecondaryCaptureImageStorage)
    ds.InstanceNumber = _positive("instance_number", instance_number)
    now = dt.datetime.now()  # highdicom's clock for the instance creation
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.ContentDate = DA(content_datetime.date())
    ds.ContentTime = TM(content_datetime.time())
    ds.ContributingEquipmentSequence = [*contributing, hd.ContributingEquipment.for_highdicom()]

    # General Image, SC Equipment, SC Image
    ds.PatientOrientation = orientation
    ds.ConversionType = _CONVERSION_TYPE
    captured = dt.datetime.now()  # highdicom's second reading of the clock
    ds.DateOfSecondaryCapture = DA(captured.date())
    ds.TimeOfSecondaryCapture = TM(captured.time())

    # Image Pixel: 8-bit RGB, colour-by-pixel
    ds.ImageType = list(_IMAGE_TYPE)
    ds.Rows = int(pixels.shape[0])
    ds.Columns = int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.HighBit = 7
    ds.BitsStored = 8
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()  # the one copy of the frame
    return ds
