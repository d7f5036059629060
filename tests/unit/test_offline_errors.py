"""`screener screen --out`: one study whose outputs cannot be written fails that study with
its reason; the run goes on and the other studies are screened, written and printed."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
from screener.cli import app
from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets

pytestmark = pytest.mark.skipif(
    not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists(), reason="no shipped weights"
)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


def test_a_file_without_a_study_uid_fails_only_its_own_study(cxr_dir: Path, tmp_path: Path) -> None:
    rows = pick_images(cxr_dir, 3, view="PA", split="test")
    folder = tmp_path / "in"
    for i, name in ((0, "a_good"), (2, "c_good")):
        write_datasets(make_study([(corpus_image(cxr_dir, rows[i]["id"]), "PA")]), folder / name)
    odd = write_datasets(
        make_study([(corpus_image(cxr_dir, rows[1]["id"]), "PA")]), folder / "b_odd"
    )[0]
    ds = pydicom.dcmread(odd)
    del ds.StudyInstanceUID
    ds.save_as(odd)
    out = tmp_path / "out"

    result = _runner().invoke(app, ["screen", str(folder), "--out", str(out), "--format", "jsonl"])

    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    by_status: dict[str, list[dict]] = {}
    for line in lines:
        by_status.setdefault(line["status"], []).append(line)
    screened = by_status.get("screened", [])
    assert len(screened) == 2
    assert all(s["outputs"] and all(Path(p).exists() for p in s["outputs"]) for s in screened)
    (failed,) = by_status["failed"]
    assert failed["study_instance_uid"] == f"unknown:{odd.name}"
    assert "no Study Instance UID" in failed["reason"] and "outputs not written" in failed["reason"]
    assert failed["outputs"] == []
    assert result.exit_code == 1  # a study failed (README, "Exit codes")
