"""The style standard is enforced, not hoped for: ruff (lint + format) and mypy stay clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_ruff_lint_and_format() -> None:
    if not (BIN / "ruff").exists():
        pytest.skip("ruff not installed (pip install -e '.[test]')")
    lint = _run(BIN / "ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run(BIN / "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy(tmp_path: Path) -> None:
    if not (BIN / "mypy").exists():
        pytest.skip("mypy not installed (pip install -e '.[test]')")
    result = _run(BIN / "mypy", "--cache-dir", tmp_path / "mypy", "screener", "workers", "engines")
    assert result.returncode == 0, result.stdout + result.stderr
