"""Optional Parametric Map of the class activation map (``reports.parametric_map``).

Viewers that support parametric maps overlay it on the source radiograph with their own
colour map and opacity; the quantity is DCM 130402 "Class activation" and the unit UCUM
``1``. The map is stored at the *source* geometry (the CAM is resampled from the display
geometry), so the overlay lines up pixel for pixel. Values are stored as uint16 with a
real world value mapping (slope 1/65535) rather than float pixels: smaller, and accepted
by more archives.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.identity import PRODUCT_NAME
from screener.reports.common import (
    PMAP_SERIES_NUMBER,
    clip_lo,
    output_character_set,
    processing_equipment,
    software_versions,
)
from screener.reports.output_uids import OutputUids
from screener.results import ImageResult, StudyResult
from screener.settings import Settings

CLASS_ACTIVATION = hd.sr.CodedConcept("130402", "DCM", "Class activation")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
STORED_MAX = 65535
SERIES_DESCRIPTION = "AI class activation map (not for diagnosis)"


def pixel_spacing_of(source: Dataset) -> list[float]:
    """Row/column spacing in mm: PixelSpacing, else ImagerPixelSpacing, else 1.0 nominal."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return [float(value[0]), float(value[1])]
    return [1.0, 1.0]


def with_nominal_geometry(source: Dataset, frame_of_reference_uid: str) -> Dataset:
    """A copy of the source header with the plane geometry a Parametric Map requires.

    A projection radiograph has no patient coordinate system, but the Parametric Map IOD
    mandates Frame of Reference, Plane Position and Plane Orientation. The map gets its
    own Frame of Reference UID (never the source's, which does not exist) and a nominal
    plane at the origin with the source's pixel spacing: map pixel (r, c) is source pixel
    (r, c), which the Derivation Image Sequence (Spatial Locations Preserved YES) states.
    """
    ds = Dataset()
    ds.update(source)
    if hasattr(source, "file_meta"):
        ds.file_meta = source.file_meta
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = pixel_spacing_of(source)
        ds.SliceThickness = 1.0
    return ds


def resample_cam(cam: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The CAM (float, 0..1) bilinearly resampled to ``rows`` x ``cols``."""
    cam = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    if cam.shape == (rows, cols):
        return cam
    image = Image.fromarray(cam, mode="F").resize((cols, rows), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def build_parametric_map(
    image: ImageResult,
    source: Dataset,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    *,
    instance_number: int,
    created_at: datetime,
) -> hd.pm.ParametricMap:
    """A single-frame Parametric Map of ``image.cam`` on the source image's grid."""
    if image.cam is None:
        raise ValueError(f"image {image.source.sop_instance_uid} has no CAM")
    rows, cols = int(source.Rows), int(source.Columns)
    cam = resample_cam(image.cam, rows, cols)
    stored = np.rint(cam * STORED_MAX).astype(np.uint16)
    geometry_source = with_nominal_geometry(
        source, uids.pmap_frame_of_reference(image.source.sop_instance_uid)
    )
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="CAM",
        lut_explanation=f"Class activation of {result.model.ref} for COVID-19",
        unit=NO_UNITS,
        value_range=(0, STORED_MAX),
        slope=1.0 / STORED_MAX,
        intercept=0.0,
        quantity_definition=CLASS_ACTIVATION,
    )
    pmap = hd.pm.ParametricMap(
        source_images=[geometry_source],
        pixel_array=stored,
        series_instance_uid=uids.pmap_series,
        series_number=PMAP_SERIES_NUMBER,
        sop_instance_uid=uids.pmap_instance(image.source.sop_instance_uid),
        instance_number=instance_number,
        manufacturer=settings.reports.manufacturer,
        manufacturer_model_name=PRODUCT_NAME,
        software_versions=software_versions(result)[0],
        device_serial_number=clip_lo(result.model.engine_hash) or "unknown",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=STORED_MAX / 2, window_width=STORED_MAX)
        ],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=f"COVID-19 class activation, {result.model.ref}"[:64],
        content_label="CAM",
        contributing_equipment=[processing_equipment(result, settings)],
        series_description=SERIES_DESCRIPTION,
        specific_character_set=output_character_set(
            source, [settings.reports.manufacturer, settings.reports.institution_name]
        ),
        content_date=created_at.date(),
        content_time=created_at.time(),
    )
    # General Series Laterality (Type 2C) is left out: the Frame Anatomy functional group
    # says what was imaged (the chest, screened only when it is the chest) and that it is
    # unpaired (Frame Laterality U), which is what the condition asks for
    if "Laterality" in pmap:
        del pmap.Laterality
    pmap.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [frame_anatomy(source)]
    return pmap


def frame_anatomy(source: Dataset) -> Dataset:
    """Frame Anatomy item: the source's Anatomic Region Sequence, else SCT Chest; laterality
    U (unpaired) unless the source's Image Laterality says otherwise."""
    item = Dataset()
    regions = list(source.get("AnatomicRegionSequence", []) or [])
    if regions:
        region = Dataset()
        for keyword in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"):
            if keyword in regions[0]:
                setattr(region, keyword, regions[0].get(keyword))
    else:
        region = Dataset()
        region.CodeValue = "43799004"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Chest"
    item.AnatomicRegionSequence = [region]
    laterality = str(source.get("ImageLaterality", "") or "").strip().upper()
    item.FrameLaterality = laterality if laterality in ("R", "L", "B", "U") else "U"
    return item
