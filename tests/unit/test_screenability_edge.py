"""Hostile headers at the gate and in prepare: a header claiming an enormous image is refused
before any pixel is read (and prepare's memory stays small), and a UID element with a wrong
VR is a skipped image, never an exception out of prepare_instance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from screener.screenability import screenability, screenability_of_file
from screener.screening.prepare import prepare_dataset, prepare_instance
from screener.settings import ScreeningSettings, Settings
from screener.testing.dicom_factory import StudyIdentity, make_instance, write_datasets
from tests.report_results import synthetic_pixels

REPO = Path(__file__).resolve().parents[2]


def _cr(**kw: object) -> Dataset:
    return make_instance(synthetic_pixels(320, 288), study=StudyIdentity.new(), **kw)  # type: ignore[arg-type]


def test_the_gate_refuses_more_pixels_than_max_pixels() -> None:
    settings = ScreeningSettings()
    assert settings.max_pixels == 50_000_000
    ds = _cr()
    assert screenability(ds, settings) is None
    ds.Rows, ds.Columns = 40000, 40000
    refusal = screenability(ds, settings)
    assert refusal is not None and refusal.code == "too_large"
    assert refusal.reason == "too large (40000 x 40000 = 1600000000 pixels, maximum 50000000)"
    exact = ScreeningSettings(max_pixels=320 * 288)
    assert screenability(_cr(), exact) is None
    below = screenability(_cr(), ScreeningSettings(max_pixels=320 * 288 - 1))
    assert below is not None and below.code == "too_large"
    with pytest.raises(pydantic.ValidationError):
        ScreeningSettings(max_pixels=0)


def _lying_rle(directory: Path) -> Path:
    """A ~160 KB RLE chest CR whose header claims 40000 x 40000 (the frame is 320 x 288)."""
    ds = _cr()
    ds.compress(RLELossless)
    ds.Rows, ds.Columns = 40000, 40000
    [path] = write_datasets([ds], directory)
    return path


_MEASURE = """
import json, resource, sys
from pathlib import Path
from screener.screening.prepare import prepare_instance
from screener.settings import Settings
settings = Settings()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepared = prepare_instance(Path(sys.argv[1]), settings)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"skip_reason": prepared.skip_reason, "refused": prepared.refused,
                  "extra_mb": (after - before) / 1024}))
"""


def test_a_header_claiming_a_huge_image_is_refused_without_allocating_it(tmp_path: Path) -> None:
    path = _lying_rle(tmp_path)
    assert path.stat().st_size < 1 << 20
    refusal = screenability_of_file(path, ScreeningSettings())
    assert refusal is not None and refusal.code == "too_large"
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["skip_reason"].startswith("too large (40000 x 40000"), result
    assert result["refused"] is True
    assert result["extra_mb"] < 200, result


def test_prepare_dataset_skips_a_huge_header_that_bypasses_the_gate(tmp_path: Path) -> None:
    """prepare_dataset's decode check uses screening.max_pixels too (defence in depth)."""
    ds = _cr()
    settings = Settings()
    settings.screening.max_pixels = 320 * 288 - 1
    prepared = prepare_dataset(ds, tmp_path / "x.dcm", settings)
    assert prepared.skip_reason is not None and prepared.skip_reason.startswith("too large")


def _with_wrong_vr(directory: Path, vr: bytes) -> Path:
    """A chest CR whose SOP Instance UID (0008,0018) carries the explicit VR ``vr``."""
    ds = _cr()
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"  # 14 bytes: not a multiple of 8 for FD
    [path] = write_datasets([ds], directory)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x08\x00\x18\x00UI")  # in the data set, not the meta's (0002,0003)
    raw[at + 4 : at + 6] = vr
    bad = path.with_name(f"sop_uid_vr_{vr.decode()}.dcm")
    bad.write_bytes(raw)
    return bad


@pytest.mark.parametrize("vr", [b"FD", b"AT"])
def test_a_uid_with_a_wrong_vr_is_a_skip_not_an_exception(tmp_path: Path, vr: bytes) -> None:
    path = _with_wrong_vr(tmp_path, vr)
    prepared = prepare_instance(path, Settings())  # must not raise
    assert prepared.skip_reason is not None
    assert prepared.skip_reason.startswith("decode failed: bad header (SOPInstanceUID"), (
        prepared.skip_reason
    )
    assert prepared.source.sop_instance_uid == f"unknown:{path.name}"
    assert prepared.source.study_instance_uid.startswith("1.")  # the readable UIDs are kept
    assert prepared.network_input is None
