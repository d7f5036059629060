"""ONNX export of the screener's networks: dynamic batch axis, named outputs.

Output names are the engine contract: segmenter -> ``lung_probability`` (N, S, S),
``lateral_probability`` (N,); classifier -> ``probabilities`` (N, 3), ``cam`` (N, 3, s, s),
``features`` (N, 1280). The input is ``image`` (N, 1, S, S), float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engines.networks import CLASSIFIER_OUTPUTS, SEGMENTER_OUTPUTS
from engines.runtime.torch_engine import save_sidecar, sidecar_path
from screener import atomic_files

OPSET = 17


def export_onnx(model: nn.Module, kind: str, path: Path, input_shape: tuple[int, ...]) -> Path:
    """Write ``path`` (ONNX) and its torch sidecar; returns the ONNX path. The manifest
    written after the export (:func:`engines.manifest.write_manifest`) records the SHA-256
    of both, and the engines refuse either file when it differs: export the networks and
    write ``model.json`` together, never copy one without the other."""
    output_names = list(SEGMENTER_OUTPUTS if kind == "segmenter" else CLASSIFIER_OUTPUTS)
    model = model.eval()
    example = torch.rand(2, *input_shape)
    dynamic_axes = {"image": {0: "batch"}} | {name: {0: "batch"} for name in output_names}

    def write(target: Path) -> None:
        torch.onnx.export(
            model,
            (example,),
            str(target),
            input_names=["image"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )

    # an export killed half-way leaves the previous file, never a torn one under its name
    atomic_files.write_by_path(path, write)
    save_sidecar(model, kind, sidecar_path(path), input_shape)
    return path
