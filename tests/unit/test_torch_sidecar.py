"""The torch engine runs the ``*.torch.pt`` sidecar's weights but reports the ONNX file's
SHA-256 (the one the manifest checks): the manifest records each sidecar's SHA-256 too, and
a stale or swapped sidecar is refused at load, naming the file, instead of running other
weights under the manifest's name, calibration and threshold."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from engines.manifest import (
    MANIFEST_NAME,
    SHIPPED_WEIGHTS_DIR,
    load_manifest,
    sidecar_name,
    write_manifest,
)
from engines.runtime.base import file_sha256, load_engine
from tests.cli_support import SHIPPED_NETWORKS, Cli, in_process_cli, linked_weights

pytestmark = pytest.mark.skipif(
    not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists(), reason="no shipped weights"
)
ONE_STUDY = (
    Path(__file__).resolve().parents[2] / "screener/demo_data/2.25.270418300000000000001.1.dcm"
)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


def _swap_crop_sidecar(folder: Path) -> Path:
    """The segment scheme's sidecar under the crop classifier's sidecar name (same kind,
    same input: it loads and runs, with other weights)."""
    swapped = folder / sidecar_name("classifier-crop.onnx")
    swapped.unlink()
    swapped.symlink_to(SHIPPED_WEIGHTS_DIR / sidecar_name("classifier-segment.onnx"))
    return swapped


def test_the_shipped_manifest_records_every_shipped_sidecar() -> None:
    manifest = load_manifest()
    for network in manifest.networks:
        sidecar = SHIPPED_WEIGHTS_DIR / sidecar_name(network)
        assert manifest.sidecar_sha256(network) == file_sha256(sidecar), sidecar


def test_a_swapped_sidecar_is_refused_naming_the_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = linked_weights(tmp_path, sidecars=True)
    load_engine("torch", folder / "classifier-crop.onnx")  # the shipped one loads
    swapped = _swap_crop_sidecar(folder)
    with pytest.raises(ValueError, match="is not the torch sidecar") as refused:
        load_engine("torch", folder / "classifier-crop.onnx")
    assert str(swapped) in str(refused.value) and "\n" not in str(refused.value)
    load_engine("torch", folder / "classifier-segment.onnx")  # the others still load

    from engines.runtime.torch_engine import load_sidecar

    with pytest.raises(ValueError, match="is not the torch sidecar"):
        load_sidecar(swapped)  # training's starting point (robust fine-tuning) too


def test_a_swapped_sidecar_makes_screening_exit_3(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same exit as any other broken weights ("cannot load models", exit 3)."""
    pytest.importorskip("torch")
    folder = linked_weights(tmp_path, sidecars=True)
    swapped = _swap_crop_sidecar(folder)
    monkeypatch.setenv("SCREENER_MODEL__MODEL_DIR", str(folder))
    done = cli("screen", str(ONE_STUDY), "--format", "jsonl", "--engine", "torch")
    assert done.code == 3, done.err
    line = done.error_line()
    assert "cannot load models" in line and str(swapped) in line
    assert done.out == ""  # nothing screened


def test_a_manifest_without_sidecar_digests_still_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Manifests written before sidecars were recorded keep working (nothing to check)."""
    pytest.importorskip("torch")
    folder = linked_weights(tmp_path, sidecars=True)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["sha256"] = {k: v for k, v in data["sha256"].items() if k.endswith(".onnx")}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(folder).sidecar_sha256("classifier-crop.onnx") is None
    with caplog.at_level(logging.WARNING, logger="engines.runtime.torch_engine"):
        engine = load_engine("torch", folder / "classifier-crop.onnx")
    assert engine.model_hash == data["sha256"]["classifier-crop.onnx"]
    assert "records no SHA-256" in caplog.text and "classifier-crop.torch.pt" in caplog.text


def test_write_manifest_records_the_sidecars_as_exported(tmp_path: Path) -> None:
    """What training's writers (install, robust install, calibrate) get without a change of
    theirs: a sidecar exported again over the old one is recorded anew, a stale digest carried
    over from the old manifest is not kept, and a sidecar that is gone is not recorded."""
    folder = tmp_path / "w"
    folder.mkdir()
    for network in SHIPPED_NETWORKS:
        (folder / network).symlink_to(SHIPPED_WEIGHTS_DIR / network)
    crop = folder / sidecar_name("classifier-crop.onnx")
    crop.write_bytes(b"first export")
    seg = folder / sidecar_name("segmenter.onnx")
    seg.write_bytes(b"segmenter sidecar")
    shipped = load_manifest()  # carries the shipped sidecars' digests
    write_manifest(shipped, folder)
    written = load_manifest(folder)
    assert written.sidecar_sha256("classifier-crop.onnx") == file_sha256(crop)
    assert written.sidecar_sha256("segmenter.onnx") == file_sha256(seg)
    assert written.sidecar_sha256("classifier-segment.onnx") is None  # none in the folder
    assert os.listdir(folder).count(MANIFEST_NAME) == 1 and not any(
        n.endswith(".tmp") for n in os.listdir(folder)
    )

    tmp = crop.with_name("new")  # exported again: a new file under the same name
    tmp.write_bytes(b"second export")
    os.replace(tmp, crop)
    write_manifest(written, folder)
    assert load_manifest(folder).sidecar_sha256("classifier-crop.onnx") == file_sha256(crop)
    assert file_sha256(crop) != written.sidecar_sha256("classifier-crop.onnx")


def test_file_sha256_hashes_a_replaced_file_again(tmp_path: Path) -> None:
    """The cache was keyed by the path: a file replaced in a running process kept the old
    file's digest (a swapped sidecar or network would have passed the check)."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    old = file_sha256(path)
    replacement = tmp_path / "g"
    replacement.write_bytes(b"new")
    os.replace(replacement, path)
    assert file_sha256(path) != old
