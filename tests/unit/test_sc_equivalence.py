"""The heatmap SC built with plain pydicom equals the one highdicom's ``SCImage`` built,
element for element and byte for byte.

``highdicom_sc`` below is ``build_heatmap_sc`` as ``screener/reports/heatmap.py`` had it
before :mod:`screener.reports.sc_document` replaced highdicom's constructor, kept here
verbatim so the comparison stays real. The only differences allowed are the values both
paths take from the clock when they run: Instance Creation Date and Time, Date and Time of
Secondary Capture, and the Contribution DateTime of highdicom's Contributing Equipment
item. The test checks they are well formed and close, then sets them equal before
comparing.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DT
from pynetdicom.dsutils import encode

from screener.reports.common import (
    SC_SERIES_NUMBER,
    common_attributes,
    disclaimer_of,
    output_character_set,
    processing_equipment,
    read_source_header,
)
from screener.reports.heatmap import SERIES_DESCRIPTION, build_heatmap_sc, render
from screener.reports.operating_point import OperatingPointStatement, statement_for
from screener.reports.output_uids import OutputUids
from screener.reports.writer import build_image_objects
from screener.results import ImageResult, StudyResult
from screener.settings import Settings
from tests.dicom_validation import assert_valid
from tests.report_results import MODEL, make_result, named_charset_files

# ---- the highdicom-built SC, as screener/reports/heatmap.py built it before (reference) --


def highdicom_sc(
    image: ImageResult,
    source: Dataset,
    result: StudyResult,
    settings: Settings,
    uids: OutputUids,
    *,
    instance_number: int,
    created_at: datetime,
    statement: OperatingPointStatement | None = None,
) -> hd.sc.SCImage:
    """The RGB Secondary Capture of one screened image, in the source's study."""
    disclaimer = disclaimer_of(result, settings)
    statement = statement or statement_for(result.threshold, result.model, settings)
    rendering = render(image, result, disclaimer, settings.reports.heatmap_max_size, statement)
    orientation = source.get("PatientOrientation")
    pixels = rendering.pixels
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        # highdicom checks the array (uint8, 3 samples, RGB) and would encode it with two
        # full copies (flatten, then tobytes): it gets the first row only, and the whole
        # frame is set below with one copy (Rows too; Columns is already the frame's)
        pixel_array=pixels[:1],
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance(image.source.sop_instance_uid),
        instance_number=instance_number,
        manufacturer=settings.reports.manufacturer,
        patient_orientation=(
            tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
        ),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(result, settings)],
        series_description=SERIES_DESCRIPTION,
        specific_character_set=output_character_set(
            source,
            [disclaimer, settings.reports.manufacturer, settings.reports.institution_name],
        ),
        content_date=created_at.date(),
        content_time=created_at.time(),
        **common_attributes(result, settings),  # type: ignore[arg-type]
    )
    sc.Rows = pixels.shape[0]
    sc.PixelData = np.ascontiguousarray(pixels).tobytes()  # colour-by-pixel, as PlanarConfig 0
    if orientation is None or len(orientation) != 2:
        sc["PatientOrientation"].value = ""  # unknown: Type 2, left empty rather than guessed
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"
    sc.DerivationDescription = (
        f"Class activation map of {result.model.ref} blended over the source image inside "
        f"the body and the classifier's crop; lung contour; text in margins around the "
        f"image (it starts at row {rendering.top}, column {rendering.left}); "
        f"{statement.headline()}"
    )[:1024]
    sc.ImageComments = "\n".join(text for text in rendering.text.lines)[:10240]
    sc.LossyImageCompression = source.get("LossyImageCompression", "00") or "00"
    src = Dataset()
    src.ReferencedSOPClassUID = image.source.sop_class_uid
    src.ReferencedSOPInstanceUID = image.source.sop_instance_uid
    sc.SourceImageSequence = [src]
    # a screened image is a chest radiograph (the screenability gate takes an empty Body
    # Part Examined for one): said so when the source leaves it out, or a validator must
    # ask for the series' Laterality (Type 2C, required for a paired body part)
    sc.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    if source.get("StudyDescription"):
        sc.StudyDescription = source.StudyDescription
    sc.ConversionType = "WSD"  # workstation: rendered by the screener, not digitised film
    return sc


# ---- the inputs, as build_image_objects gathers them ------------------------------------


@dataclasses.dataclass
class ScInputs:
    """What ``build_heatmap_sc`` is called with for one image (as the writer calls it)."""

    image: ImageResult
    source: Dataset
    result: StudyResult
    settings: Settings
    uids: OutputUids
    instance_number: int
    created_at: datetime
    statement: OperatingPointStatement

    def _kwargs(self) -> dict[str, object]:
        return {
            "instance_number": self.instance_number,
            "created_at": self.created_at,
            "statement": self.statement,
        }

    def new(self) -> Dataset:
        """The SC as ``build_heatmap_sc`` builds it."""
        args = (self.image, self.source, self.result, self.settings, self.uids)
        return build_heatmap_sc(*args, **self._kwargs())  # type: ignore[arg-type]

    def old(self) -> Dataset:
        """The SC as highdicom's ``SCImage.from_ref_dataset`` built it."""
        args = (self.image, self.source, self.result, self.settings, self.uids)
        return highdicom_sc(*args, **self._kwargs())  # type: ignore[arg-type]


def sc_inputs(
    result: StudyResult, settings: Settings, headers: dict[str, Dataset] | None = None
) -> list[ScInputs]:
    """One per screened image, numbered and dated as ``build_image_objects`` does;
    ``headers`` (by SOP Instance UID) replace the sources' own files."""
    headers = headers or {}
    uids = OutputUids.for_result(result)
    created_at = datetime.now().astimezone()
    statement = statement_for(result.threshold, result.model, settings)
    out = []
    screened = [im for im in result.images if im.screened]
    for number, image in enumerate(screened, start=1):
        header = headers.get(image.source.sop_instance_uid) or read_source_header(image.source)
        assert header is not None
        out.append(ScInputs(image, header, result, settings, uids, number, created_at, statement))
    return out


def headers_of(result: StudyResult) -> dict[str, Dataset]:
    """The screened images' source headers as the writer reads them, to be edited."""
    headers = {}
    for image in result.images:
        header = read_source_header(image.source)
        if image.screened and header is not None:
            headers[image.source.sop_instance_uid] = header
    return headers


# ---- the comparison ---------------------------------------------------------------------

HIGHDICOM_MANUFACTURER = "Highdicom open-source contributors"


def _highdicom_item(ds: Dataset) -> Dataset:
    (item,) = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.Manufacturer == HIGHDICOM_MANUFACTURER
    ]
    return item


def _clock_values(ds: Dataset) -> list[datetime]:
    """The values taken from the clock, parsed; each must be a valid DA/TM/DT."""

    def parse(date: object, time: object) -> datetime:
        day = datetime.strptime(str(date), "%Y%m%d")
        clock = datetime.strptime(str(time), "%H%M%S.%f")
        return day.replace(hour=clock.hour, minute=clock.minute, second=clock.second)

    contributed = DT(str(_highdicom_item(ds).ContributionDateTime))
    return [
        parse(ds.InstanceCreationDate, ds.InstanceCreationTime),
        parse(ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture),
        contributed.replace(tzinfo=None, microsecond=0),
    ]


def _freeze_clock(ds: Dataset) -> None:
    ds.InstanceCreationDate = "20000101"
    ds.InstanceCreationTime = "000000.000000"
    ds.DateOfSecondaryCapture = "20000101"
    ds.TimeOfSecondaryCapture = "000000.000000"
    _highdicom_item(ds).ContributionDateTime = "20000101000000.000000"


def _elements(ds: Dataset) -> Iterator[DataElement]:
    return iter(ds)


def assert_same_elements(new: Dataset, old: Dataset, where: str = "") -> None:
    """Same tags, VRs, value types and values, recursively through sequences."""
    assert [e.tag for e in _elements(new)] == [e.tag for e in _elements(old)], where
    for a, b in zip(_elements(new), _elements(old), strict=True):
        at = f"{where}/{a.keyword or a.tag}"
        assert a.VR == b.VR, at
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), at
            for index, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                assert_same_elements(x, y, f"{at}[{index}]")
            continue
        assert type(a.value) is type(b.value), (at, type(a.value), type(b.value))
        assert a.value == b.value, (at, a.value, b.value)
        if isinstance(a.value, list | pydicom.multival.MultiValue):
            assert [type(v) for v in a.value] == [type(v) for v in b.value], at


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def assert_same_sc(inputs: ScInputs) -> Dataset:
    """Build both SCs from the same inputs; equal but for the clock. Returns the new one."""
    old = inputs.old()
    new = inputs.new()
    for when in (*_clock_values(old), *_clock_values(new)):
        assert abs(when - datetime.now()) < timedelta(minutes=1)
    _freeze_clock(old)
    _freeze_clock(new)
    assert_same_elements(new, old)
    assert_same_elements(new.file_meta, old.file_meta, "file_meta")
    assert new.preamble == old.preamble
    assert _encoded(new) == _encoded(old)
    assert new.to_json_dict() == old.to_json_dict()
    assert_same_elements(new, old)  # writing changed neither
    # as a C-STORE encodes it when the peer accepts only implicit VR (pynetdicom's encoder)
    implicit = encode(new, True, True)
    assert implicit is not None and implicit == encode(old, True, True)
    return new


def assert_same_scs(items: list[ScInputs]) -> list[Dataset]:
    assert items, "no screened image: nothing compared"
    return [assert_same_sc(inputs) for inputs in items]


@pytest.fixture
def settings_(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


# ---- the cases --------------------------------------------------------------------------


def test_one_screened_image_is_valid(tmp_path: Path, settings_: Settings) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.8])
    (new,) = assert_same_scs(sc_inputs(result, settings_))
    assert new.ConversionType == "WSD" and new.BurnedInAnnotation == "YES"
    path = tmp_path / "sc.dcm"
    new.save_as(path, enforce_file_format=True)
    assert_valid(path)


@pytest.mark.parametrize(
    ("views", "scores", "undecodable"),
    [
        (["PA", "AP", None], [0.9, 0.1, 0.42], set()),  # positive, negative, at threshold
        (["AP"], [0.0], set()),
        (["PA", "LATERAL", "PA"], [0.3, 0.0, 0.6], {2}),  # a lateral, a failed decode
        (["LATERAL", "PA", "AP", "PA"], [0.0, 0.99, 0.5, 0.01], set()),
    ],
    ids=["three_views", "one_ap", "lateral_and_failed", "four_images"],
)
def test_statuses_and_views(
    tmp_path: Path,
    settings_: Settings,
    views: list[str | None],
    scores: list[float],
    undecodable: set[int],
) -> None:
    result, _ = make_result(tmp_path, views, scores=scores, undecodable=undecodable)
    news = assert_same_scs(sc_inputs(result, settings_))
    assert [int(sc.InstanceNumber) for sc in news] == list(range(1, len(news) + 1))
    assert len(news) == len([v for i, v in enumerate(views) if v != "LATERAL"]) - len(undecodable)


@pytest.mark.parametrize(
    "orientation",
    [None, ["P", "F"], ["A", "H"], ["L"], "RF", ""],
    ids=["absent", "P_F", "A_H", "one_value", "one_string", "empty"],
)
def test_patient_orientation(
    tmp_path: Path, settings_: Settings, orientation: list[str] | str | None
) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.6])
    headers = headers_of(result)
    for header in headers.values():
        if orientation is None:
            if "PatientOrientation" in header:
                del header.PatientOrientation
        else:
            header.PatientOrientation = orientation
    (new,) = assert_same_scs(sc_inputs(result, settings_, headers))
    if orientation == ["P", "F"]:
        assert list(new.PatientOrientation) == ["P", "F"]
    if orientation is None:
        assert new.PatientOrientation == ""


def test_orientation_highdicom_refuses_is_refused(tmp_path: Path, settings_: Settings) -> None:
    """An oblique value ('FR') is not one of highdicom's biped terms: both refuse it."""
    result, _ = make_result(tmp_path, ["PA"], scores=[0.6])
    headers = headers_of(result)
    for header in headers.values():
        header.PatientOrientation = ["A", "FR"]
    (inputs,) = sc_inputs(result, settings_, headers)
    with pytest.raises(ValueError):
        inputs.old()
    with pytest.raises(ValueError):
        inputs.new()


def _acquisition(header: Dataset, case: str) -> None:
    for keyword in ("Manufacturer", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime"):
        if keyword in header:
            delattr(header, keyword)
    if case == "no_manufacturer":
        return
    if case == "empty_manufacturer":
        header.Manufacturer = ""
        return
    header.Manufacturer = "Acme Radiography"
    if case == "datetime":
        header.AcquisitionDateTime = "20240102030405.123456"
    elif case == "date_and_time_strings":  # not dates: highdicom leaves the time out
        header.AcquisitionDate = "20240102"
        header.AcquisitionTime = "030405"
    elif case == "date_and_time_values":
        header.AcquisitionDate = pydicom.valuerep.DA("20240102")
        header.AcquisitionTime = pydicom.valuerep.TM("030405.5")
    elif case == "everything":
        header.AcquisitionDateTime = "20240102030405"
        header.ManufacturerModelName = "CR 2000"
        header.SoftwareVersions = ["1.2", "3.4"]
        header.DeviceSerialNumber = "SN-7"
        header.InstitutionName = "Hôpital Test"
        header.InstitutionalDepartmentName = "Radiologie"
        header.InstitutionAddress = "1 rue du Test"
        header.StationName = "CR1"


@pytest.mark.parametrize(
    "case",
    [
        "no_manufacturer",
        "empty_manufacturer",
        "manufacturer_only",
        "datetime",
        "date_and_time_strings",
        "date_and_time_values",
        "everything",
    ],
)
def test_acquisition_equipment(tmp_path: Path, settings_: Settings, case: str) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.6])
    headers = headers_of(result)
    for header in headers.values():
        _acquisition(header, case)
    (new,) = assert_same_scs(sc_inputs(result, settings_, headers))
    purposes = [
        i.PurposeOfReferenceCodeSequence[0].CodeMeaning for i in new.ContributingEquipmentSequence
    ]
    acquired = case not in ("no_manufacturer", "empty_manufacturer")
    assert purposes == [
        *(["Acquisition Equipment"] if acquired else []),
        "Processing Equipment",
        "Processing Equipment",
    ]
    if case == "date_and_time_values":
        when = new.ContributingEquipmentSequence[0].ContributionDateTime
        assert str(when) == "20240102030405.500000"


def test_settings_and_model_variants(tmp_path: Path, settings_: Settings) -> None:
    """An institution, no engine hash, a non-Latin disclaimer (UTF-8), sources without
    study description or patient's sex (one without body part), lossy sources, and an
    odd-sized display."""
    settings_.reports.institution_name = "Hôpital du Test"
    settings_.disclaimer = "研究用 - not for diagnostic use"
    model = dataclasses.replace(MODEL, engine_hash="")
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, size=(301, 257), dtype=np.uint8)
    result, _ = make_result(tmp_path, ["PA", "AP"], scores=[0.7, 0.2], model=model, pixels=pixels)
    headers = headers_of(result)
    first, second = headers.values()
    for header in (first, second):
        del header.StudyDescription
        header.PatientSex = ""
        header.LossyImageCompression = "01"
    # no body part: the SC says CHEST (a validator would otherwise ask for Laterality)
    del second.BodyPartExamined
    news = assert_same_scs(sc_inputs(result, settings_, headers))
    assert news[0].SpecificCharacterSet == "ISO_IR 192"
    assert "DeviceSerialNumber" not in news[0]
    assert [sc.BodyPartExamined for sc in news] == [first.BodyPartExamined, "CHEST"]
    for index, sc in enumerate(news):
        path = tmp_path / f"sc{index}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert_valid(path)


def test_writer_objects_equal_the_reference(tmp_path: Path, settings_: Settings) -> None:
    """The SCs the writer itself builds (``build_image_objects``) equal highdicom's."""
    result, _ = make_result(tmp_path, ["PA", "AP"], scores=[0.9, 0.3])
    objects = build_image_objects(result, settings_)
    screened = [im for im in result.images if im.screened]
    for number, image in enumerate(screened, start=1):
        source = read_source_header(image.source)
        assert source is not None
        old = highdicom_sc(
            image,
            source,
            result,
            settings_,
            objects.uids,
            instance_number=number,
            created_at=objects.created_at,
            statement=objects.statement,
        )
        new = objects.heatmaps[image.source.sop_instance_uid]
        _freeze_clock(old)
        _freeze_clock(new)
        assert _encoded(new) == _encoded(old)


CHARSET_FILES = named_charset_files()


def test_enough_character_sets() -> None:
    names = {p.name for p in CHARSET_FILES}
    assert len(CHARSET_FILES) >= 12
    assert {"chrH31.dcm", "chrX2.dcm", "chrJapMulti.dcm", "chrI2.dcm"} <= names


@pytest.mark.parametrize("charset_file", CHARSET_FILES, ids=lambda p: p.name)
def test_patient_names_in_other_character_sets(
    tmp_path: Path, settings_: Settings, charset_file: Path
) -> None:
    chars = pydicom.dcmread(charset_file, stop_before_pixels=True, force=True)
    result, paths = make_result(tmp_path, ["PA"], scores=[0.5])
    ds = pydicom.dcmread(paths[0])
    ds.SpecificCharacterSet = chars.SpecificCharacterSet
    ds.PatientName = chars.PatientName  # the file's own bytes
    ds.save_as(paths[0], enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns of one-component names
        (new,) = assert_same_scs(sc_inputs(result, settings_))
    assert str(new.PatientName) == str(chars.PatientName)
    if charset_file.name in ("chrH31.dcm", "chrX2.dcm", "chrI2.dcm"):
        path = tmp_path / "sc.dcm"
        new.save_as(path, enforce_file_format=True)
        assert_valid(path)
        assert pydicom.dcmread(path).SpecificCharacterSet == (
            "GB18030" if charset_file.name == "chrX2.dcm" else "ISO_IR 192"
        )
