"""`screener demo` on embedded defaults (SQLite, onnxruntime, the SQLite broker), as a user
runs it on a fresh machine: a subprocess, no SCREENER_* variables, a new data dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom

from screener.demo import bundled_studies
from tests.workers_support import require_models, screener_cmd

REPO = Path(__file__).resolve().parents[2]


def test_bundled_studies_are_small_licensed_and_complete() -> None:
    studies = bundled_studies()
    files = [f for s in studies for f in s.files]
    assert len(studies) >= 5 and all(f.exists() for f in files)
    assert sum(f.stat().st_size for f in files) < 3_000_000
    catalogue = json.loads((REPO / "screener" / "demo_data" / "catalogue.json").read_text())
    for entry in catalogue:
        for image in entry["images"]:
            licence = image["license"]
            assert licence.startswith("NIH ChestX-ray14") or licence == "CC BY 3.0", licence
    notice = (REPO / "NOTICE").read_text()
    assert "NIH Clinical Center" in notice and "CC BY 3.0" in notice
    for study in studies:
        for path in study.files:
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert str(ds.PatientName).startswith("DEMO^")  # no real patient identity
    tags = [pydicom.dcmread(f).get("ViewPosition") for s in studies for f in s.files]
    assert "LATERAL" in tags and None in tags  # the study whose tags are wrong or missing


def test_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    model_dir = require_models()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    if model_dir:
        env["SCREENER_MODEL__MODEL_DIR"] = model_dir
    env["HOME"] = str(tmp_path / "home")  # a fresh user: nothing from a previous run
    done = subprocess.run(
        screener_cmd("demo", "--data-dir", str(tmp_path / "demo"), "--json", "--timeout", "150"),
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["sent_instances"] == 6
    by_key = {s["key"]: s for s in report["studies"]}
    assert set(by_key) == {s.key for s in bundled_studies()}
    for key, study in by_key.items():
        # the demo configures no destination: reported and complete, nothing acknowledged
        assert study["state"] == "completed", (key, study)
        result = study["result"]
        assert result["status"] == "screened", (key, result)
        assert "NOT FOR DIAGNOSTIC USE" in result["disclaimer"]
        assert "@" in result["model"] and result["threshold_version"] == 0
        outputs = [Path(p) for p in result["outputs"]]
        assert outputs and all(p.exists() for p in outputs)
        modalities = sorted(str(pydicom.dcmread(p).Modality) for p in outputs)
        assert "SR" in modalities
        screened = [im for im in result["images"] if im["screened"]]
        assert len(modalities) == 1 + len(screened)  # one SR + one heatmap per screened image
    wrong_tags = by_key["nih-view-tags-wrong"]["result"]["images"]
    # Both images are frontal: the pixels overrule the wrong LATERAL tag and the absent one.
    assert [im["screened"] for im in wrong_tags] == [True, True]
    assert {im["view_source"] for im in wrong_tags} == {"image"}
