"""Run the standard validators (dicom3tools ``dciodvfy``, dcmtk ``dsrdump``) on files."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# Warnings we accept, each with the reason (everything else fails the test). The SR and
# the heatmap SC have none; this one concerns only the optional Parametric Map:
ACCEPTED_WARNINGS: dict[str, str] = {
    "Unrecognized defined term <QUANTITY>": (
        "ImageType/FrameType value 4 QUANTITY is what highdicom writes for a parametric map "
        "of a physical quantity (Derived Pixel Contrast); dicom3tools' term list lacks it"
    ),
}


@dataclass
class Validation:
    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy(path: Path) -> Validation:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [
        ln
        for ln in lines
        if ln.startswith("Warning") and not any(key in ln for key in ACCEPTED_WARNINGS)
    ]
    return Validation(errors=errors, warnings=warnings, output=text)


def assert_valid(path: Path) -> Validation:
    """Zero dciodvfy errors and no warning outside ACCEPTED_WARNINGS."""
    result = dciodvfy(path)
    assert not result.errors, result.output
    assert not result.warnings, result.output
    return result


def dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) not installed")
    proc = subprocess.run(
        ["dsrdump", "+Pl", "+U8", str(path)],  # text in UTF-8, whatever the character set
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Error" not in proc.stderr, proc.stderr
    return proc.stdout
