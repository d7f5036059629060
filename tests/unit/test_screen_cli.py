"""`screener screen` and `screener evaluate` end to end on synthetic DICOM studies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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


@pytest.fixture
def two_studies(cxr_dir: Path, tmp_path: Path) -> tuple[Path, list]:
    covid = corpus_image(cxr_dir, pick_images(cxr_dir, 1, label="covid", view="PA")[0]["id"])
    lateral = corpus_image(cxr_dir, pick_images(cxr_dir, 1, view="LATERAL", split=None)[0]["id"])
    normal = corpus_image(cxr_dir, pick_images(cxr_dir, 1, label="normal", view="AP")[0]["id"])
    a = make_study([(covid, "PA"), (lateral, "LATERAL")])
    b = make_study([(normal, "AP")], modality="DX")
    folder = tmp_path / "in"
    write_datasets(a + b, folder)
    return folder, a + b


def test_screen_jsonl_prints_one_object_per_study(
    two_studies: tuple[Path, list], tmp_path: Path
) -> None:
    folder, datasets = two_studies
    out = tmp_path / "out"
    result = _runner().invoke(app, ["screen", str(folder), "--out", str(out), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    by_uid = {obj["study_instance_uid"]: obj for obj in lines}
    first = by_uid[datasets[0].StudyInstanceUID]
    assert first["status"] == "screened" and first["reason"] is None
    assert first["model"].startswith("cxr-covid-effnetlite0@")
    assert isinstance(first["threshold"], float)
    views = {im["sop_instance_uid"]: im for im in first["images"]}
    frontal = views[datasets[0].SOPInstanceUID]
    lateral = views[datasets[1].SOPInstanceUID]
    assert frontal["screened"] and frontal["view"] == "PA" and frontal["view_source"] == "tag"
    assert set(frontal["probabilities"]) == {"covid", "pneumonia", "normal"}
    assert 0.0 <= frontal["heatmap_lung_fraction"] <= 1.0
    assert first["study_covid_score"] == pytest.approx(frontal["probabilities"]["covid"], abs=1e-6)
    assert first["study_covid_positive"] == (first["study_covid_score"] >= first["threshold"])
    assert not lateral["screened"] and lateral["view"] == "LATERAL"
    assert first["outputs"] and all(Path(p).exists() for p in first["outputs"])


def test_screen_table_and_empty_input(two_studies: tuple[Path, list], tmp_path: Path) -> None:
    folder, _ = two_studies
    result = _runner().invoke(app, ["screen", str(folder)])
    assert result.exit_code == 0, result.output
    assert "NOT FOR DIAGNOSTIC USE" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _runner().invoke(app, ["screen", str(empty), "--format", "jsonl"]).exit_code == 3


def test_evaluate_with_labels(two_studies: tuple[Path, list], tmp_path: Path) -> None:
    folder, datasets = two_studies
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "label", "modality"])
        writer.writerow([datasets[0].SOPInstanceUID, "covid", "CR"])
        writer.writerow([datasets[1].SOPInstanceUID, "pneumonia", "CR"])  # lateral: not screened
        writer.writerow([datasets[2].SOPInstanceUID, "normal", "DX"])
    plots = tmp_path / "plots"
    result = _runner().invoke(
        app, ["evaluate", str(folder), "--labels", str(labels), "--out", str(plots), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 2 and report["n_positive"] == 1
    assert report["interval"].startswith("Wilson")
    assert {r["value"] for r in report["subgroups"]} == {"CR", "DX"}
    assert len(report["threshold_table"]) == 9
    assert all(Path(p).exists() for p in report["plots"])
    text = _runner().invoke(app, ["evaluate", str(folder), "--labels", str(labels)])
    assert text.exit_code == 0 and "Wilson" in text.stdout and "threshold table" in text.stdout
