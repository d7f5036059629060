"""Every Specific Character Set pydicom decodes survives into the SR, SC and parametric map.

pydicom ships 15 charset test files with a Patient Name (single- and multi-valued sets,
ISO 2022 code extensions with an empty first value, UTF-8, GB18030...). Each name is put,
byte for byte as the file encodes it, into a factory CR study; the outputs must decode to
exactly the same text and be valid DICOM. Before the fix, 4 of them crashed report writing
(highdicom refused the empty first value of ``\\ISO 2022 IR 87``).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from screener.reports.common import UTF8
from screener.reports.writer import write_study_outputs
from screener.settings import Settings
from tests.dicom_validation import assert_valid, dciodvfy, dsrdump
from tests.report_results import make_result, named_charset_files

CHARSET_FILES = named_charset_files()


def test_pydicom_ships_the_charset_files() -> None:
    names = {p.name for p in CHARSET_FILES}
    assert len(CHARSET_FILES) >= 15
    assert {"chrH31.dcm", "chrI2.dcm", "chrJapMulti.dcm", "chrX2.dcm"} <= names


def _with_name_of(source: Path, charset_file: Path) -> str:
    """Give ``source`` the charset file's Specific Character Set and raw Patient Name."""
    chars = pydicom.dcmread(charset_file, stop_before_pixels=True, force=True)
    expected = str(chars.PatientName)  # decoded with the file's own character set
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = chars.SpecificCharacterSet
    ds.PatientName = chars.PatientName  # PersonName keeps the original encoded bytes
    ds.save_as(source, enforce_file_format=True)
    back = pydicom.dcmread(source, stop_before_pixels=True)
    assert str(back.PatientName) == expected  # the source itself is faithful
    return expected


@pytest.mark.parametrize("charset_file", CHARSET_FILES, ids=lambda p: p.name)
def test_names_survive_into_every_output(tmp_path: Path, charset_file: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.reports.parametric_map = True
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    expected = _with_name_of(sources[0], charset_file)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    kinds = sorted(p.name.split("_", 1)[0] for p in paths)
    assert kinds == ["pmap", "sc", "sr"]
    for path in paths:
        out = pydicom.dcmread(path)
        assert str(out.PatientName) == expected, (path.name, out.SpecificCharacterSet)
        assert out.StudyDescription == "XR CHEST" or path.name.startswith("pmap")


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrI2.dcm", "chrX2.dcm"])
def test_iso2022_and_gb18030_outputs_are_valid(tmp_path: Path, name: str) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.reports.parametric_map = True
    (charset_file,) = [p for p in CHARSET_FILES if p.name == name]
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    expected = _with_name_of(sources[0], charset_file)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    for path in paths:
        assert_valid(path)
    sr = next(p for p in paths if p.name.startswith("sr_"))
    charset = pydicom.dcmread(sr, stop_before_pixels=True).SpecificCharacterSet
    # code extensions are written as UTF-8; a single non-2022 set (GB18030) is kept
    assert charset == ("GB18030" if name == "chrX2.dcm" else "ISO_IR 192")
    dump = dsrdump(sr)
    assert "Imaging Measurement Report" in dump
    if name == "chrH31.dcm":
        assert expected == "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize("term", ["ISO-IR 100", "ISO IR 192", "UTF-8", "ISO_IR 6"])
def test_a_term_outside_the_standard_is_written_as_utf8(tmp_path: Path, term: str) -> None:
    """pydicom decodes these with a warning; highdicom refused the label, and report writing
    crashed (no SR, no SC). The decoded name goes out as UTF-8, every object valid."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.reports.parametric_map = True
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    ds = pydicom.dcmread(sources[0])
    ds.SpecificCharacterSet = term
    ds.PatientName = "Muller^Jurgen" if term == "ISO_IR 6" else "Müller^Jürgen"
    ds.save_as(sources[0], enforce_file_format=True)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    assert sorted(p.name.split("_", 1)[0] for p in paths) == ["pmap", "sc", "sr"]
    for path in paths:
        out = pydicom.dcmread(path)
        assert out.SpecificCharacterSet == "ISO_IR 192"
        assert str(out.PatientName) == str(ds.PatientName)
        assert_valid(path)


ODD_VALUES = {
    # keyword: (value in the source, value in every output)
    "PatientSex": [("U", ""), ("m", "M"), ("MALE", ""), ("F", "F")],
    "PatientBirthDate": [
        ("19800000", ""),
        ("1980-01-02", ""),
        ("UNKNOWN", ""),
        ("1980.01.02", "19800102"),
    ],
    "StudyDate": [("2020.01.02", "20200102"), ("20201302", ""), ("20200102", "20200102")],
    "StudyTime": [("12:30:00", "123000"), ("noon", ""), ("123000.5", "123000.5")],
}


@pytest.mark.parametrize(
    ("keyword", "value", "written"),
    [(k, v, w) for k, cases in ODD_VALUES.items() for v, w in cases],
)
def test_odd_patient_and_study_values_never_stop_the_report(
    tmp_path: Path, keyword: str, value: str, written: str
) -> None:
    """Values seen in the wild made highdicom refuse the heatmap SC, and with it the whole
    study's outputs; now an unusable one is left empty (Type 2), a legacy form rewritten."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    settings = Settings(data_dir=tmp_path / "data")
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    ds = pydicom.dcmread(sources[0])
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)
    ds.save_as(sources[0], enforce_file_format=True)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    assert sorted(p.name.split("_", 1)[0] for p in paths) == ["sc", "sr"]
    for path in paths:
        out = pydicom.dcmread(path)
        assert str(out.get(keyword) or "") == written, path.name
        check = dciodvfy(path)
        assert not check.errors, check.output
        # an empty Study Date or Time is valid (Type 2); dciodvfy notes only that a DICOMDIR
        # wants one
        dicomdir = "needed to build DICOMDIR - Study"
        left = [w for w in check.warnings if not (written == "" and dicomdir in w)]
        assert not left, check.output
    assert str(pydicom.dcmread(sources[0]).get(keyword)) == value  # the source untouched


RAW_NAMES = {
    # case: (Specific Character Set of the source or None, raw Patient Name bytes,
    #        the outputs' character set, the name they carry)
    "no set, Latin-1 bytes": (None, "Müller^Jürgen".encode("latin-1"), UTF8, "Müller^Jürgen"),
    "GBK": ("GBK", "王^小东".encode("gbk"), "GB18030", "王^小东"),
    "ISO_IR 13": ("ISO_IR 13", b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3", UTF8, "ﾔﾏﾀﾞ^ﾀﾛｳ"),
    "ISO_IR 100 (kept)": ("ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "ISO_IR 100", None),
}


def _with_raw_name(source: Path, charset: str | None, raw: bytes) -> None:
    """Put ``raw`` into the source's Patient Name byte for byte, under ``charset``."""
    ds = pydicom.dcmread(source)
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    raw += b" " * (len(raw) % 2)
    placeholder = ("QZ" * len(raw))[: len(raw)]
    ds.PatientName = placeholder
    ds.save_as(source, enforce_file_format=True)
    data = source.read_bytes()
    assert data.count(placeholder.encode()) == 1
    source.write_bytes(data.replace(placeholder.encode(), raw))


@pytest.mark.parametrize("case", list(RAW_NAMES))
def test_a_set_that_cannot_hold_the_decoded_name_is_widened(tmp_path: Path, case: str) -> None:
    """8-bit bytes with no Specific Character Set were written back unlabelled, GBK and
    ISO_IR 13 names kept in sets dciodvfy refuses: every output invalid. Now the decoded
    name goes out in a set that holds it (GB18030 for GBK), every object valid."""
    charset, raw, written, name = RAW_NAMES[case]
    settings = Settings(data_dir=tmp_path / "data")
    settings.reports.parametric_map = True
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    _with_raw_name(sources[0], charset, raw)
    expected = name or str(pydicom.dcmread(sources[0], stop_before_pixels=True).PatientName)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    assert sorted(p.name.split("_", 1)[0] for p in paths) == ["pmap", "sc", "sr"]
    for path in paths:
        out = pydicom.dcmread(path)
        assert out.SpecificCharacterSet == written, path.name
        assert str(out.PatientName) == expected, path.name
        assert_valid(path)
