"""The SR's content tree, encoded by ``sr_document.ItemEncoder``, is byte for byte what
pydicom's own writer makes of the same document.

``build_sr`` hands the content to the document as raw elements it encoded itself (explicit
VR little endian, the document's character set; see ``sr_document``). The reference here
is pydicom: the written SR is read back, every element decoded (none left raw) and written
again by pydicom's writer, which must give the same bytes, for every character set pydicom
ships a file for and for non-ASCII text of our own. ``test_sr_equivalence.py`` compares the
same bytes with the highdicom-built SR.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.uid import ImplicitVRLittleEndian
from pydicom.valuerep import DS

from screener.reports import sr_document
from screener.reports.common import PredecessorRef
from screener.reports.sr import build_sr
from screener.reports.sr_document import ItemEncoder, ds_text
from screener.reports.writer import build_image_objects
from screener.results import StudyResult
from screener.settings import Settings
from tests.dicom_validation import assert_valid
from tests.report_results import (
    MODEL,
    concept_meaning,
    content_items,
    make_result,
    named_charset_files,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def _sr(result: StudyResult, settings: Settings) -> Dataset:
    return build_image_objects(result, settings).sr(result, settings)


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _decode_all(ds: Dataset) -> int:
    """Decode every element of ``ds`` and its items (pydicom converts a raw element when it
    is read); returns how many there are."""
    count = 0
    for elem in ds:
        count += 1
        if elem.VR == "SQ":
            count += sum(_decode_all(item) for item in elem.value)
    assert not any(isinstance(e, RawDataElement) for e in ds._dict.values())
    return count


def assert_pydicom_writes_the_same(sr: Dataset) -> bytes:
    """The SR's bytes equal pydicom's encoding of the same document, decoded."""
    assert isinstance(sr._dict[sr_document._CONTENT_SEQ], RawDataElement)  # the fast path
    written = _encoded(sr)
    back = pydicom.dcmread(io.BytesIO(written))
    assert _decode_all(back) > 100
    assert _encoded(back) == written
    return written


@pytest.fixture
def settings_(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.mark.parametrize(
    ("views", "undecodable"),
    [(["PA"], set()), (["PA", "AP", "LATERAL", "PA"], {3}), (["LATERAL"], set()), (["PA"], {0})],
    ids=["one", "four", "no_frontal", "failed"],
)
def test_statuses(
    tmp_path: Path, settings_: Settings, views: list[str | None], undecodable: set[int]
) -> None:
    scores = [0.7, 0.2, 0.0, 0.5][: len(views)]
    result, _ = make_result(tmp_path, views, scores=scores, undecodable=undecodable)
    sr = _sr(result, settings_)
    written = assert_pydicom_writes_the_same(sr)
    # a reader sees an ordinary content tree, and reading it does not change the bytes
    assert sr.ContentSequence[-1].ConceptNameCodeSequence[0].CodeMeaning == (
        "Qualitative Evaluations"
    )
    assert _encoded(sr) == written


@pytest.mark.parametrize("charset_file", named_charset_files(), ids=lambda p: p.name)
def test_every_character_set(tmp_path: Path, settings_: Settings, charset_file: Path) -> None:
    """Each pydicom charset file's name and character set in the source; a manufacturer
    outside ASCII in our own text (Latin-1, or UTF-8 where the set cannot hold it)."""
    settings_.reports.manufacturer = "Ünïcode Labs"
    chars = pydicom.dcmread(charset_file, stop_before_pixels=True, force=True)
    result, paths = make_result(tmp_path, ["PA", "AP"], scores=[0.5, 0.2])
    ds = pydicom.dcmread(paths[0])
    ds.SpecificCharacterSet = chars.SpecificCharacterSet
    ds.PatientName = chars.PatientName
    ds.save_as(paths[0], enforce_file_format=True)
    sr = _sr(result, settings_)
    written = assert_pydicom_writes_the_same(sr)
    back = pydicom.dcmread(io.BytesIO(written))
    assert str(back.PatientName) == str(chars.PatientName)
    texts = {
        concept_meaning(item): item.get("TextValue")
        for item in content_items(list(back.ContentSequence))
    }
    assert texts["Algorithm Manufacturer"] == "Ünïcode Labs"
    assert texts["Device Observer Manufacturer"] == "Ünïcode Labs"


def test_no_character_set_and_utf8_text(tmp_path: Path, settings_: Settings) -> None:
    """A source without Specific Character Set: ASCII texts stay in the default repertoire;
    a non-ASCII manufacturer makes it UTF-8 (unlabelled 8-bit bytes are invalid; they were
    written as Latin-1); then a non-Latin disclaimer (UTF-8), parametric maps, no serial."""
    settings_.reports.manufacturer = "Unicode Labs"
    result, paths = make_result(tmp_path / "a", ["PA"], scores=[0.45])
    ds = pydicom.dcmread(paths[0])
    del ds.SpecificCharacterSet
    ds.save_as(paths[0], enforce_file_format=True)
    sr = _sr(result, settings_)
    assert "SpecificCharacterSet" not in sr
    assert_pydicom_writes_the_same(sr)
    settings_.reports.manufacturer = "Ünïcode Labs"
    sr = _sr(result, settings_)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and sr.Manufacturer == "Ünïcode Labs"
    assert_pydicom_writes_the_same(sr)
    path = tmp_path / "latin.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path)

    settings_.disclaimer = "研究用 - not for diagnostic use"
    settings_.reports.parametric_map = True
    model = dataclasses.replace(MODEL, engine_hash="")
    result, _ = make_result(tmp_path / "b", ["PA", "AP"], scores=[0.9, 0.2], model=model)
    sr = _sr(result, settings_)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert_pydicom_writes_the_same(sr)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path)


def _pydicom_value(tag: int, vr: str, value: object, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, DataElement(tag, vr, value), encodings)
    return fp.getvalue()[12 if vr in ("UT", "SQ") else 8 :]


TEXTS = ["", "A", "Lung", "a\\b", "tab\there", "Ünïcode", "Привет", "研究用", "¥~\\"]


@pytest.mark.filterwarnings("ignore:Failed to encode value")  # replacement characters
@pytest.mark.parametrize("term", sorted(python_encoding))
def test_item_encoder_strings_are_pydicoms(term: str) -> None:
    """Every string element the encoder writes, in every character set pydicom knows (the
    ones it does not take the fast path for included), is pydicom's encoding."""
    if term.startswith("ISO 2022"):
        charset: str | list[str] = ["", term]  # code extensions come multi-valued
    else:
        charset = term
    encoder = ItemEncoder.for_charset(charset)
    for text in TEXTS:
        for vr in ("UT", "LO", "SH"):
            try:
                expected = _pydicom_value(0x0040A160, vr, text, list(encoder.encodings))
            except (UnicodeError, ValueError):
                continue
            assert encoder.element(0x0040A160, vr, text)[2] == expected, (term, vr, text)
    for vr, value in (("CS", "CONTAINS"), ("CS", "A"), ("UI", "1.2.3"), ("UI", "1.23")):
        expected = _pydicom_value(0x0040A010, vr, value, list(encoder.encodings))
        assert encoder.element(0x0040A010, vr, value)[2] == expected


@pytest.mark.parametrize(
    "value",
    [0, 1, 512, 3000, 0.8, 0.123456, 1e-7, 0.1 + 0.2, 123456789.123, DS("0.139"), DS("0.1")],
)
def test_numeric_value_is_pydicoms(value: float) -> None:
    """The NUM item's DS and FD values as pydicom writes the element highdicom made."""
    expected = _pydicom_value(0x0040A30A, "DS", DS(value, auto_format=True), [])
    assert (ds_text(value) + " " * (len(ds_text(value)) % 2)).encode() == expected


def test_shared_parts_are_per_character_set() -> None:
    """The cached parts (code sequences) of one concept differ by character set where its
    text does, and are the same objects where nothing varies."""
    concept = sr_document.Concept("1", "99TEST", "Größe")
    latin = ItemEncoder.for_charset("ISO_IR 100")
    utf8 = ItemEncoder.for_charset("ISO_IR 192")
    assert latin.code_sequence(0x0040A043, concept) != utf8.code_sequence(0x0040A043, concept)
    assert latin.code_sequence(0x0040A043, concept) is latin.code_sequence(0x0040A043, concept)
    assert sr_document._code_sequence.cache_info().maxsize is not None


def test_only_explicit_vr_little_endian(tmp_path: Path, settings_: Settings) -> None:
    """The content is encoded explicit VR little endian: another transfer syntax for the
    document is refused rather than written wrong."""
    result, _ = make_result(tmp_path, ["PA"])
    objects = build_image_objects(result, settings_)
    with pytest.raises(ValueError, match="explicit VR little endian"):
        sr_document.comprehensive_sr(
            root=[],
            encoder=ItemEncoder.for_charset(None),
            evidence=objects.sources,
            series_instance_uid="1.2.3",
            series_number=1,
            series_description="x",
            sop_instance_uid="1.2.3.4",
            instance_number=1,
            equipment=sr_document.Equipment("m", "n", ["1"]),
            is_complete=True,
            previous_versions=[],
            specific_character_set=None,
            content_datetime=objects.created_at,
            transfer_syntax_uid=ImplicitVRLittleEndian,
        )


def test_references_to_other_studies_and_predecessors(tmp_path: Path, settings_: Settings) -> None:
    """Pertinent Other Evidence (an instance of another study) and predecessors in two
    studies: the encoded reference sequences, as pydicom writes them."""
    result, _ = make_result(tmp_path, ["PA"], scores=[0.6])
    objects = build_image_objects(result, settings_)
    other = Dataset()
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    other.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    other.StudyInstanceUID = "1.2.826.0.1.3680043.8.498"
    predecessors = [
        PredecessorRef(result.study_instance_uid, "1.2.9", "1.2.9.1", SR_CLASS),
        PredecessorRef(result.study_instance_uid, "1.2.9", "1.2.9.22", SR_CLASS),
        PredecessorRef("1.2.8", "1.2.8.1", "1.2.8.1.1", SR_CLASS),
    ]
    sr = build_sr(
        result,
        [*objects.sources, other],
        objects.heatmaps,
        settings_,
        objects.uids,
        created_at=objects.created_at,
        predecessors=predecessors,
        statement=objects.statement,
    )
    assert_pydicom_writes_the_same(sr)
    (pertinent,) = sr.PertinentOtherEvidenceSequence
    assert pertinent.StudyInstanceUID == other.StudyInstanceUID
    assert [len(s.ReferencedSeriesSequence) for s in sr.PredecessorDocumentsSequence] == [1, 1]
    assert (
        len(sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence)
        == 2
    )
