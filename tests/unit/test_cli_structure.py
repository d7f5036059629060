"""The CLI's shape: commands parse and print, the work is in domain modules.

Checked from the source (no private names of another package, no numeric or database
libraries in command modules) and by behaviour (the database helper's one error line,
the labels reader and the evaluation report as plain data).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import screener
from screener.cli import app
from screener.offline_evaluation import (
    LabelsError,
    evaluation_report,
    read_labels,
    strict_json,
)
from screener.offline_screening import screening_settings

ROOT = Path(screener.__file__).resolve().parent.parent
CLI = sorted((ROOT / "screener" / "cli").glob("*.py"))
DOMAIN = [
    ROOT / "screener" / name
    for name in (
        "offline_screening.py",
        "offline_evaluation.py",
        "training_runs.py",
        "threshold_tuning.py",
        "reprocess.py",
        "status.py",
        "study_assembler.py",
        "timeutil.py",
    )
]
OUR_PACKAGES = {"screener", "engines", "workers", "tests", "benchmarks"}
# the work belongs in domain modules: a command module that needs these is doing it
# (app.py, the error boundary, names sqlalchemy's errors to map them to exit codes)
DOMAIN_LIBRARIES = {"numpy", "torch", "pydicom", "sqlalchemy", "sqlmodel", "csv", "matplotlib"}
UNREACHABLE = "postgresql+psycopg://screener:hunter2@127.0.0.1:1/screener"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("path", CLI + DOMAIN, ids=lambda p: p.name)
def test_no_private_names_of_our_other_modules(path: Path) -> None:
    own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for module, names in _imports(path):
        if module.split(".")[0] not in OUR_PACKAGES or module == own:
            continue
        assert not any(_private(part) for part in module.split(".")), (path.name, module)
        assert not [n for n in names if _private(n)], (path.name, module, names)


@pytest.mark.parametrize("path", [p for p in CLI if p.name != "app.py"], ids=lambda p: p.name)
def test_command_modules_leave_the_work_to_domain_modules(path: Path) -> None:
    used = {module.split(".")[0] for module, _ in _imports(path)}
    assert not used & DOMAIN_LIBRARIES, (path.name, used & DOMAIN_LIBRARIES)


@pytest.mark.parametrize(
    "command",
    [
        ["threshold", "show"],
        ["users", "list"],
        ["reprocess", "--since", "2020-01-01", "--dry-run"],
        ["deliveries", "destinations"],
    ],
)
def test_unusable_database_is_one_error_line_and_exit_4(
    command: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCREENER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCREENER_DATABASE_URL", UNREACHABLE)
    from screener.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, command)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 4, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not usable" in errors[0], result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_labels_csv_is_read_case_insensitively(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(" SOP_Instance_UID ,Label,View\n 1.2.3 , COVID ,PA\n1.2.4,normal,\n")
    rows = read_labels(csv_path)
    assert set(rows) == {"1.2.3", "1.2.4"}
    assert rows["1.2.3"]["label"] == "covid" and rows["1.2.3"]["view"] == "PA"
    excel = tmp_path / "excel.csv"  # "CSV UTF-8" from a spreadsheet: a byte order mark
    excel.write_bytes(b"\xef\xbb\xbfsop_instance_uid,label\n1.2.5,Pneumonia\n")
    assert read_labels(excel)["1.2.5"]["label"] == "pneumonia"
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,label\n1,covid\n")
    with pytest.raises(LabelsError, match="bad.csv.*sop_instance_uid,label"):
        read_labels(bad)


def test_evaluation_report_is_plain_strict_json() -> None:
    rows = [
        {"label": "covid", "score": 0.9, "modality": "CR"},
        {"label": "covid", "score": 0.4, "modality": "DX"},
        {"label": "normal", "score": 0.2, "modality": "CR"},
        {"label": "pneumonia", "score": 0.6, "modality": "CR"},
    ]
    report = evaluation_report(rows, 0.5, "covid")
    assert (report["n"], report["n_positive"], report["n_negative"]) == (4, 2, 2)
    assert report["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert report["sensitivity"]["k"] == 1 and report["sensitivity"]["n"] == 2
    groups = {(g["group"], g["value"]): g for g in report["subgroups"]}
    assert set(groups) == {("modality", "CR"), ("modality", "DX")}
    dx = groups[("modality", "DX")]
    assert dx["n"] == 1 and math.isnan(dx["auc"])  # one class only: no AUC
    json.dumps(strict_json(report), allow_nan=False)  # NaN became null


def test_run_overrides_only_what_is_given() -> None:
    base = screening_settings()
    assert screening_settings(settings=base) is base
    changed = screening_settings("crop", None, "occlusion", settings=base)
    assert changed.model.scheme == "crop" and changed.model.heatmap == "occlusion"
    assert changed.model.engine == base.model.engine
