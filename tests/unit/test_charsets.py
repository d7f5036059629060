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

from screener.reports.writer import write_study_outputs
from screener.settings import Settings
from tests.dicom_validation import assert_valid, dsrdump
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
