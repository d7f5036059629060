"""Offline screening and training commands end in the README's exit codes with one
``error:`` line (review #5, #6, #7, #8, #9): broken or old weights are "models cannot be
loaded" (3), a missing input file or a mistyped option is a usage error (2), exception text
keeps its brackets, and `export` never writes a manifest whose production scheme it does
not ship. The real CLI boundary runs in-process (``ScreenerTyper``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
from screener.offline_screening import screening_settings
from tests.cli_support import Cli, in_process_cli, linked_weights

pytestmark = pytest.mark.skipif(
    not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists(), reason="no shipped weights"
)
DEMO = Path(__file__).resolve().parents[2] / "screener" / "demo_data"
ONE_STUDY = DEMO / "2.25.270418300000000000001.1.dcm"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


def _missing_classifier(folder: Path) -> str:
    (folder / "classifier-crop.onnx").unlink()
    return "classifier-crop.onnx"


def _truncated_classifier(folder: Path) -> str:
    head = (SHIPPED_WEIGHTS_DIR / "classifier-crop.onnx").read_bytes()[:4096]
    (folder / "classifier-crop.onnx").unlink()
    (folder / "classifier-crop.onnx").write_bytes(head)
    return "classifier-crop.onnx"


def _old_manifest(folder: Path) -> str:
    old = {"name": "cxr-covid-effnetlite0", "version": "1.0.0", "threshold": 0.5}
    (folder / MANIFEST_NAME).write_text(json.dumps(old | {"classifier": "classifier-crop.onnx"}))
    return "'classifiers'"


@pytest.mark.parametrize("breakage", [_missing_classifier, _truncated_classifier, _old_manifest])
def test_weights_that_cannot_be_loaded_exit_3_naming_the_file(
    cli: Cli, breakage: Callable[[Path], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = linked_weights(tmp_path)
    named = breakage(folder)
    monkeypatch.setenv("SCREENER_MODEL__MODEL_DIR", str(folder))
    done = cli("screen", str(ONE_STUDY), "--format", "jsonl")
    assert done.code == 3, done.err
    line = done.error_line()
    assert "cannot load models" in line and str(folder) in line and named in line
    assert done.out == ""  # nothing screened


def test_an_old_manifest_names_the_missing_key() -> None:
    from engines.manifest import ModelManifest

    with pytest.raises(ValueError, match=r"model\.json is missing 'classifiers'.*another version"):
        ModelManifest.from_json({"name": "x", "version": "1", "segmenter": "s.onnx"}, Path("/w"))
    shipped = json.loads((SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).read_text())
    del shipped["operating_points"], shipped["thresholds"]
    with pytest.raises(ValueError, match="no threshold for scheme"):
        ModelManifest.from_json(shipped, Path("/w"))


@pytest.mark.parametrize(("option", "value"), [("--engine", "foo"), ("--heatmap", "occlusionn")])
def test_a_mistyped_engine_or_heatmap_is_a_usage_error(cli: Cli, option: str, value: str) -> None:
    done = cli("screen", str(ONE_STUDY), "--format", "jsonl", option, value)
    assert done.code == 2, done.err
    assert option in done.error_line() and value in done.error_line()
    assert done.out == ""  # not screened with CAM instead


def test_overrides_are_validated_like_settings() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        screening_settings(heatmap="occlusionn")
    with pytest.raises(ValidationError):
        screening_settings(engine="foo")
    assert screening_settings(heatmap="occlusion", engine="torch").model.heatmap == "occlusion"


def test_the_install_hint_keeps_its_brackets(cli: Cli) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    done = cli("screen", str(ONE_STUDY), "--engine", "tensorrt")
    assert done.code == 3
    assert "pip install 'pacs-screener[gpu]'" in done.error_line()


def test_training_inputs_that_are_missing_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    work = tmp_path / "nowork"
    done = cli("export", "--work-dir", str(work), "--weights-dir", str(tmp_path / "w"))
    assert done.code == 2
    line = done.error_line()
    assert "metrics.json" in line and "screener train classifier" in line
    done = cli("train", "view", "--work-dir", str(work), "--threads", "1")
    assert done.code == 2
    line = done.error_line()
    assert "decoder.pt" in line and "screener train segmenter" in line
    corpus = tmp_path / "nocorpus"
    done = cli("train", "segmenter", "--corpus", str(corpus), "--work-dir", str(work))
    assert done.code == 2
    assert str(corpus) in done.error_line() and "--corpus" in done.error_line()


def _work_dir(tmp_path: Path, production: str) -> Path:
    """A training work dir as `train classifier` leaves it (the shipped networks)."""
    work = tmp_path / "work"
    (work / "export").mkdir(parents=True)
    for name in ("segmenter", "classifier-crop", "classifier-segment"):
        for suffix in (".onnx", ".torch.pt"):
            (work / "export" / f"{name}{suffix}").symlink_to(
                SHIPPED_WEIGHTS_DIR / f"{name}{suffix}"
            )
    metrics = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())
    (work / "metrics.json").write_text(json.dumps(metrics | {"production_scheme": production}))
    return work


def test_export_never_ships_a_manifest_without_its_production_scheme(
    cli: Cli, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    work = _work_dir(tmp_path, "segment")
    target = tmp_path / "weights"
    export = ("export", "--work-dir", str(work), "--weights-dir", str(target), "--scheme", "crop")
    done = cli(*export)
    assert done.code == 2
    line = done.error_line()
    assert "'segment'" in line and "--scheme segment" in line
    assert "--production-scheme crop" in line
    assert not (target / MANIFEST_NAME).exists()
    done = cli(*export, "--production-scheme", "crop")
    assert done.code == 0, done.err
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["production_scheme"] == "crop" and list(manifest["classifiers"]) == ["crop"]
