"""Synthetic DICOM factory: real chest X-rays from the corpus wrapped as CR/DX studies.

Used by the tests of every part of the project and by the bundled demo studies. The
pixels are real (../shared/data/cxr); the headers are realistic but invented, with knobs for
what goes wrong in practice: ViewPosition missing or wrong, MONOCHROME1, 12- to 16-bit data
with window tags, compressed transfer syntaxes, lateral views in the same study.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1.1")

#: Transfer syntaxes the factory can write (JPEG lossless needs dcmtk's dcmcjpeg).
SUPPORTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
)


@dataclass
class StudyIdentity:
    """Patient and study level attributes shared by every instance of a study."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    patient_sex: str = "O"
    patient_birth_date: str = "19600101"
    accession_number: str = ""
    study_id: str = "1"
    study_date: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d"))
    study_time: str = field(default_factory=lambda: datetime.now().strftime("%H%M%S"))
    study_description: str = "XR CHEST"
    referring_physician_name: str = ""

    @classmethod
    def new(
        cls,
        patient_id: str | None = None,
        patient_name: str | None = None,
        **kw: Any,
    ) -> StudyIdentity:
        uid = generate_uid()
        suffix = uid.rsplit(".", 1)[-1][-8:]
        return cls(
            patient_id=patient_id or f"PID{suffix}",
            patient_name=patient_name or f"TEST^PATIENT{suffix}",
            study_instance_uid=uid,
            accession_number=kw.pop("accession_number", f"ACC{suffix}"[:16]),
            **kw,
        )


# --------------------------------------------------------------------------- corpus access


@lru_cache(maxsize=4)
def _manifest(cxr_dir: str) -> tuple[dict[str, str], ...]:
    with open(Path(cxr_dir) / "manifest.csv", newline="") as fh:
        return tuple(csv.DictReader(fh))


def corpus_rows(cxr_dir: Path) -> list[dict[str, str]]:
    """All manifest rows of the corpus (see ../shared/data/cxr/README.md)."""
    return list(_manifest(str(cxr_dir)))


def corpus_image(cxr_dir: Path, image_id: str) -> np.ndarray:
    """The corpus image ``image_id`` as uint8 MONOCHROME2 (HxW)."""
    path = Path(cxr_dir) / "images" / f"{image_id}.png"
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def pick_images(
    cxr_dir: Path,
    n: int,
    *,
    label: str | None = None,
    view: str | None = None,
    split: str | None = "test",
    source_contains: str | None = None,
    license_contains: str | None = None,
) -> list[dict[str, str]]:
    """The first ``n`` manifest rows matching the filters (deterministic order by id)."""
    rows = [
        r
        for r in corpus_rows(cxr_dir)
        if (label is None or r["label"] == label)
        and (view is None or r["view"] == view)
        and (split is None or r["split"] == split)
        and (source_contains is None or source_contains in r["source"])
        and (license_contains is None or license_contains in r["license"])
    ]
    rows.sort(key=lambda r: r["id"])
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} corpus images match, {n} requested")
    return rows[:n]


# --------------------------------------------------------------------------- pixel helpers


def _to_stored_values(
    pixels: np.ndarray, bits_stored: int, target_size: tuple[int, int] | None
) -> np.ndarray:
    """Scale 8-bit display pixels to the stored range of ``bits_stored`` (uint8/uint16)."""
    img = pixels
    if target_size is not None and tuple(img.shape) != tuple(target_size):
        rows, cols = target_size
        img = np.asarray(
            Image.fromarray(img).resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.uint8
        )
    if bits_stored <= 8:
        return img.astype(np.uint8)
    max_value = (1 << bits_stored) - 1
    scaled = img.astype(np.float64) / 255.0 * max_value
    # a little detector noise so 16-bit data is not just 8-bit data shifted
    rng = np.random.default_rng(int(img[:8, :8].sum()) + bits_stored)
    scaled += rng.normal(0.0, max_value / 4096.0, size=scaled.shape)
    return np.clip(np.rint(scaled), 0, max_value).astype(np.uint16)


def _set_patient_and_study(ds: Dataset, study: StudyIdentity) -> None:
    """Patient and General Study modules: the same for every object of the study."""
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyDescription = study.study_description


def make_instance(
    pixels: np.ndarray,
    *,
    study: StudyIdentity,
    modality: str = "CR",
    view_position: str | None = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    series_description: str = "",
    body_part_examined: str | None = "CHEST",
    patient_orientation: tuple[str, str] | None = None,
    with_window: bool = True,
    target_size: tuple[int, int] | None = None,
    sop_instance_uid: str | None = None,
    for_processing: bool = False,
    manufacturer: str = "ACME Radiography",
    manufacturer_model_name: str = "CXR-Sim 1",
) -> Dataset:
    """One CR or DX image instance holding ``pixels`` (uint8 MONOCHROME2 display values).

    ``view_position=None`` leaves ViewPosition out; pass a wrong value to simulate tag errors.
    MONOCHROME1 stores inverted values, as a real MONOCHROME1 detector does.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, not {modality}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported photometric interpretation {photometric}")
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be 8..16")
    if pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D grayscale image")

    stored = _to_stored_values(pixels, bits_stored, target_size)
    max_value = (1 << bits_stored) - 1
    if photometric == "MONOCHROME1":
        stored = (max_value - stored.astype(np.int64)).astype(stored.dtype)

    if modality == "CR":
        sop_class = CR_IMAGE_STORAGE
    else:
        sop_class = DX_PROCESSING_STORAGE if for_processing else DX_PRESENTATION_STORAGE
    sop_uid = sop_instance_uid or generate_uid()
    now = datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _set_patient_and_study(ds, study)
    # series / equipment
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    if series_description:
        ds.SeriesDescription = series_description
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    ds.InstanceNumber = instance_number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.PatientOrientation = list(patient_orientation) if patient_orientation else ""
    if body_part_examined:
        ds.BodyPartExamined = body_part_examined
    if view_position is not None:
        ds.ViewPosition = view_position
    if modality == "DX":
        ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.BurnedInAnnotation = "NO"
        ds.ImageLaterality = "U"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.KVP = 120
        ds.ExposureTime = 10
        ds.AnatomicRegionSequence = _anatomic_region(body_part_examined)
        if not patient_orientation:
            # Type 1C in the DX Image module: rows run to the feet; columns to the patient's
            # left on a frontal image as displayed, anterior on a lateral
            lateral = (view_position or "").upper() in ("LL", "RL", "LAT", "LATERAL")
            ds.PatientOrientation = ["A", "F"] if lateral else ["L", "F"]
    else:
        ds.ImagerPixelSpacing = [0.15, 0.15]
    # image pixel module
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    if with_window:
        # a window that covers the image: what a modality's default presentation would set
        ds.WindowCenter = int((max_value + 1) // 2)
        ds.WindowWidth = int(max_value + 1)
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return _encode(ds, transfer_syntax)


def _anatomic_region(body_part: str | None) -> list[Dataset]:
    """Anatomic Region Sequence for a Body Part Examined (empty when it is unknown)."""
    codes = {"CHEST": ("43799004", "Chest"), "HAND": ("85562004", "Hand")}
    if not body_part or body_part.upper() not in codes:
        return []
    value, meaning = codes[body_part.upper()]
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return [item]


def _encode(ds: Dataset, transfer_syntax: UID) -> Dataset:
    """Return ``ds`` in ``transfer_syntax`` (pixel data compressed where asked)."""
    ts = UID(transfer_syntax)
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        return ds
    if ts == JPEGLosslessSV1:
        return _encode_with_dcmcjpeg(ds)
    if ts in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        ds.compress(ts, generate_instance_uid=False)
        return ds
    raise ValueError(f"the factory cannot write transfer syntax {ts} ({ts.name})")


def _encode_with_dcmcjpeg(ds: Dataset) -> Dataset:
    """JPEG Lossless SV1 through dcmtk (pydicom has no JPEG lossless encoder)."""
    import pydicom

    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise RuntimeError("JPEG lossless needs dcmtk's dcmcjpeg (apt-get install dcmtk)")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        subprocess.run([exe, "+e1", str(src), str(dst)], check=True, capture_output=True)
        return pydicom.dcmread(dst)


def make_study(
    images: list[tuple[np.ndarray, str | None]],
    *,
    study: StudyIdentity | None = None,
    **kw: Any,
) -> list[Dataset]:
    """A study with one series per image: ``images`` = [(pixels, view_position), ...].

    Keyword arguments go to :func:`make_instance` for every image.
    """
    study = study or StudyIdentity.new()
    return [
        make_instance(
            pixels,
            study=study,
            view_position=view,
            series_number=number,
            series_description=f"CHEST {view or ''}".strip(),
            **kw,
        )
        for number, (pixels, view) in enumerate(images, start=1)
    ]


def write_datasets(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write DICOM Part 10 files named by SOP Instance UID; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: What a PACS sends beside the radiographs (issue 10): dose report, key objects, a
#: presentation state. The classes are all in pynetdicom's storage SCU list.
COMPANION_CLASSES: dict[str, tuple[str, str]] = {
    "dose_sr": ("1.2.840.10008.5.1.4.1.1.88.67", "SR"),  # X-Ray Radiation Dose SR
    "kos": ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),  # Key Object Selection Document
    "gsps": ("1.2.840.10008.5.1.4.1.1.11.1", "PR"),  # Grayscale Softcopy Presentation State
}


def make_companion(kind: str, *, study: StudyIdentity, instance_number: int = 1) -> Dataset:
    """A minimal non-image object of the study (no pixel data): enough for a PACS to store
    it and for the screener to recognise that it is not an image."""
    sop_class, modality = COMPANION_CLASSES[kind]
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    _set_patient_and_study(ds, study)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 100 + instance_number
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "ACME Radiography"
    now = datetime.now()
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    if modality in ("SR", "KO"):
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        title = Dataset()
        title.CodeValue = "113701" if kind == "dose_sr" else "113000"
        title.CodingSchemeDesignator = "DCM"
        title.CodeMeaning = "X-Ray Radiation Dose Report" if kind == "dose_sr" else "Of Interest"
        ds.ConceptNameCodeSequence = [title]
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ContentSequence = []
    else:
        ds.ContentLabel = "DEFAULT"
        ds.PresentationCreationDate = ds.ContentDate
        ds.PresentationCreationTime = ds.ContentTime
        ds.PresentationLUTShape = "IDENTITY"
    return ds
