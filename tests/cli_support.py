"""The CLI run in-process through its boundary (typer's exit, stdout, stderr), for tests
that check exit codes and the one ``error:`` line without a subprocess per call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from screener.cli import app


@dataclass
class Done:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one ``error:`` line (and no traceback)."""
        assert "Traceback" not in self.err, self.err
        errors = [line for line in self.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, self.err
        return errors[0]


Cli = Callable[..., Done]


def in_process_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Cli:
    """A runner with its own data folder and a wide console (rich does not wrap lines)."""
    monkeypatch.setenv("SCREENER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> Done:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            app(args=list(args))
        captured = capsys.readouterr()
        return Done(int(stop.value.code or 0), captured.out, captured.err)

    return run


SHIPPED_NETWORKS = ("segmenter.onnx", "classifier-crop.onnx", "classifier-segment.onnx")


def linked_weights(tmp_path: Path, *, sidecars: bool = False) -> Path:
    """A model folder of links to the shipped networks (with ``sidecars``: their torch
    sidecars too) under a copy of the shipped manifest: a model to break or swap."""
    import shutil

    from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
    from engines.runtime.torch_engine import sidecar_name

    folder = tmp_path / "weights"
    folder.mkdir()
    for network in SHIPPED_NETWORKS:
        for name in (network, sidecar_name(network)) if sidecars else (network,):
            (folder / name).symlink_to(SHIPPED_WEIGHTS_DIR / name)
    shutil.copy(SHIPPED_WEIGHTS_DIR / MANIFEST_NAME, folder / MANIFEST_NAME)
    return folder
