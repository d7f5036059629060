"""torch backend: the reference implementation (and what the ONNX parity test compares to).

Built from the network definitions in :mod:`engines.networks`, the packaged ImageNet
backbone and the small ``<model>.torch.pt`` sidecar saved beside each ONNX file (only the
tensors that differ from ImageNet, so the shipped weights stay small).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.efficientnet_lite import load_imagenet_lite0
from engines.networks import (
    CLASSIFIER_OUTPUTS,
    SEGMENTER_OUTPUTS,
    ClassifierCamNet,
    SegmenterViewNet,
)
from engines.runtime.base import InputSpec, check_batch, file_sha256

KINDS = ("segmenter", "classifier")


def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".torch.pt")


def build_network(kind: str) -> nn.Module:
    """A fresh network of ``kind`` on the packaged ImageNet backbone."""
    encoder = load_imagenet_lite0()
    if kind == "segmenter":
        return SegmenterViewNet(encoder)
    if kind == "classifier":
        return ClassifierCamNet(encoder)
    raise ValueError(f"unknown network kind {kind!r}")


def save_sidecar(model: nn.Module, kind: str, path: Path, input_shape: tuple[int, ...]) -> None:
    """Save the tensors of ``model`` that differ from a fresh ImageNet-backed network."""
    reference = build_network(kind).state_dict()
    state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if key not in reference
        or reference[key].shape != value.shape
        or not torch.equal(reference[key], value)
    }
    torch.save({"kind": kind, "input_shape": list(input_shape), "state_dict": state}, path)


def load_sidecar(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network: ImageNet backbone + the sidecar's tensors, all keys accounted for."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = build_network(payload["kind"])
    result = model.load_state_dict(payload["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    return model.eval(), payload


class TorchEngine:
    """Runs the torch network in eval mode; outputs named like the ONNX export."""

    def __init__(
        self, model: nn.Module, kind: str, input_shape: tuple[int, ...], model_hash: str = ""
    ) -> None:
        self.model = model.eval()
        self.input_spec = InputSpec(name="image", shape=input_shape)
        self.output_names: tuple[str, ...] = (
            SEGMENTER_OUTPUTS if kind == "segmenter" else CLASSIFIER_OUTPUTS
        )
        self.version = f"torch-{torch.__version__}"
        self.model_hash = model_hash

    @classmethod
    def from_onnx_sidecar(cls, onnx_path: Path, *, intra_op_threads: int = 1) -> TorchEngine:
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        model, payload = load_sidecar(sidecar_path(onnx_path))
        return cls(
            model, payload["kind"], tuple(payload["input_shape"]), file_sha256(Path(onnx_path))
        )

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_batch(self.input_spec, batch)
        outputs = self.model(torch.from_numpy(batch))
        return {name: out.numpy() for name, out in zip(self.output_names, outputs, strict=True)}
