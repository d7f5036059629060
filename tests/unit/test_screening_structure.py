"""The screening stages' layout (issue 11): one module per stage, no way back to the old
monolith, the model manifest read through engines.manifest only, no torch at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("screener", "workers", "benchmarks", "tests", "engines")


def _python_files() -> list[Path]:
    return [p for top in SOURCES for p in (REPO / top).rglob("*.py") if ".venv" not in p.parts]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_nothing_imports_the_old_pipeline_module() -> None:
    assert not (REPO / "screener" / "pipeline.py").exists()
    offenders = [
        path.relative_to(REPO).as_posix()
        for path in _python_files()
        if any(
            n == "screener.pipeline" or n.startswith("screener.pipeline.") for n in _imports(path)
        )
    ]
    assert offenders == [], f"import the stage modules (screener.screening.*) instead: {offenders}"


def test_the_weights_folder_is_found_by_engines_manifest_only() -> None:
    hacks = [
        p.relative_to(REPO).as_posix()
        for p in _python_files()
        if p != Path(__file__).resolve() and '"engines" / "weights"' in p.read_text()
    ]
    assert hacks == []


def test_the_screening_stages_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import screener.offline_screening, screener.screening.models, "
        "screener.screening.prepare, screener.screening.study_result\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
